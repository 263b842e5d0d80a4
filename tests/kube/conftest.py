"""A real etcd + kube-apiserver for the tests of this folder (loopback, no
root needed), built by scripts/build_peers.sh. Without the built peers the
tests that need them skip locally; under CI (CI=true) they fail instead,
since CI's setup builds them."""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from apiserver import ControlPlane, PeersMissing  # noqa: E402


def start_control_plane(**kw):
    try:
        return ControlPlane(**kw).__enter__()
    except PeersMissing as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def control_plane():
    cp = start_control_plane()
    yield cp
    cp.stop()
