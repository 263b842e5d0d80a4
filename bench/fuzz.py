#!/usr/bin/env python3
"""Fuzz the packet path: the command line of engine/lab/fuzz.py (read its
docstring for what is mutated and checked).

    python3 bench/fuzz.py --packets 1000000            # the in-place build
    python3 bench/fuzz.py --packets 1000000 --debug    # a debug build first
"""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# which engine: the debug build a parent run made (--use-build DIR), else this checkout's
for path in (REPO_ROOT, sys.argv[sys.argv.index("--use-build") + 1] if "--use-build" in sys.argv[:-1] else None):
    if path and path not in sys.path:
        sys.path.insert(0, path)

from engine.lab import fuzz  # noqa: E402

if __name__ == "__main__":
    sys.exit(fuzz.main())
