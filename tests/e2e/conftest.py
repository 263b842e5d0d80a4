"""Shared fixtures for end-to-end tests: a network-namespace lab (engine.lab)."""

import os
import sys

import pytest

# Make the repo root importable however pytest is started.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from engine.lab import Lab, cleanup_stale  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # Namespaces need root. Skip locally without it, but never under CI:
    # there a missing privilege must fail loudly, not pass silently.
    if os.geteuid() == 0 or os.environ.get("CI"):
        return
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason="e2e tests need root (network namespaces)")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def lab():
    """An up Lab with 3 pods (deploy-nginx-1..3 at 10.244.1.2..4)."""
    cleanup_stale()  # namespaces of crashed runs; live labs are left alone
    lab = Lab(pods=3)
    with lab:
        yield lab
