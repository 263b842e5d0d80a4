"""Make the repo root importable (engine, engine._fastpath) however pytest is
started; tests/e2e/conftest.py does the same for its own directory."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
