"""Large YAML is parsed in a child process (in `engine run`,
engine.config._yaml_docs sends text over ISOLATE_BYTES here): the engine's process spends no CPU and holds
no GIL on it, so its fast-path workers and DNS threads never wait on a
parse, and a hostile file is bounded by a deadline and a memory limit
(killed, and refused with a clear error) instead of by patience.

The child answers with one pickle per document, so the engine turns them
into objects a document at a time (a switch of the GIL between each).

Run as `python -m engine.yamlchild NAME`: YAML on stdin, the answer on stdout.
"""
from __future__ import annotations

import os
import pickle
import resource
import subprocess
import sys

PARSE_DEADLINE = 20.0               # seconds for one file's parse
PARSE_MEMORY = 2 << 30              # bytes of address space for the parsing child
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (PARSE_MEMORY, PARSE_MEMORY))
    os.nice(10)                     # the engine's own threads first


def parse(text, name, deadline=PARSE_DEADLINE):
    """The documents of text, parsed by a child; ValueError with the reason
    when the text is not YAML, or when its parse outgrows the deadline or
    the memory limit."""
    try:
        r = subprocess.run([sys.executable, "-m", "engine.yamlchild", name], input=text.encode("utf-8"),
                           capture_output=True, timeout=deadline, cwd=_ROOT, preexec_fn=_limit)
    except subprocess.TimeoutExpired:
        raise ValueError(f"YAML not parsed within {deadline:.0f}s (refused)") from None
    if r.returncode != 0 or not r.stdout:
        if b"MemoryError" in r.stderr:
            raise ValueError(f"YAML needs more than {PARSE_MEMORY >> 20} MB to parse (refused)")
        raise ValueError("YAML parser failed: " + r.stderr.decode(errors="replace").strip()[-300:])
    ok, payload = pickle.loads(r.stdout)
    if not ok:
        raise ValueError(payload)
    return [pickle.loads(d) for d in payload]


def main():
    from .config import ConfigError, _yaml_docs
    text = sys.stdin.buffer.read().decode("utf-8")
    try:
        out = (True, [pickle.dumps(d, protocol=pickle.HIGHEST_PROTOCOL)
                      for d in _yaml_docs(text, sys.argv[1], isolate=False)])
    except ConfigError as e:
        out = (False, e.msg)
    except MemoryError:
        sys.stderr.write("MemoryError\n")
        sys.exit(1)
    sys.stdout.buffer.write(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))


if __name__ == "__main__":
    main()
