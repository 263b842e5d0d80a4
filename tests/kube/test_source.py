"""The API source as the engine runs it, against a real kube-apiserver that
goes away for a while: the last state stays, the outage is reported, and a
change made after it returns arrives."""

import threading
import time
import uuid

import pytest

from engine.kube.client import path_for
from engine.kube.source import ApiSource


def svc(ns, name):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"ports": [{"port": 80, "protocol": "TCP"}]}}


@pytest.fixture
def own_control_plane():
    from conftest import start_control_plane
    cp = start_control_plane()
    yield cp
    cp.stop()


def test_api_server_outage(own_control_plane):
    cp = own_control_plane
    ns = f"t-{uuid.uuid4().hex[:8]}"
    cp.ensure_namespace(ns)
    cp.admin.create(path_for("Service", ns), svc(ns, "before"))
    cp.admin.create(path_for("Node"), {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}})
    keys, states = [], []
    cond = threading.Condition()

    def on_event(kind, key, old, new):
        with cond:
            keys.append((kind, key, new is None))
            cond.notify_all()

    def on_state(up, err):
        with cond:
            states.append(up)
            cond.notify_all()

    src = ApiSource.from_config(cp.admin_kubeconfig, "Node-A", on_event, resync_period=900,
                                read_timeout=5, on_state=on_state, backoff_cap=1.0).start()
    try:
        assert src.wait_synced(30)
        assert ("Service", f"{ns}/before", False) in keys and ("Node", "node-a", False) in keys
        assert src.connected and states == [True]
        cp.stop_process("kube-apiserver")
        with cond:
            assert cond.wait_for(lambda: states[-1] is False, 20)
        time.sleep(3)
        assert not src.connected and src.reflector("Service").counts["errors"] >= 1
        assert f"{ns}/before" in src.reflector("Service").snapshot()        # the last state stays
        cp.start_apiserver()
        cp.admin.create(path_for("Service", ns), svc(ns, "after"))
        with cond:
            assert cond.wait_for(lambda: ("Service", f"{ns}/after", False) in keys, 30), keys
            assert cond.wait_for(lambda: states[-1] is True, 10)
        assert src.connected
        assert src.metrics()["connected"] == 1 and src.metrics()["Service_objects"] >= 2
    finally:
        src.stop()
