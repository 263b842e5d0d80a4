"""kube-controller-manager's EndpointSlice controller on the real API
server: slices made from Pods whose status the test sets (no kubelet), as
the engine will see them in a cluster."""

import time
import uuid

import pytest

from engine.kube.client import path_for


@pytest.fixture(scope="module")
def cp_with_kcm():
    from conftest import start_control_plane
    cp = start_control_plane(controller_manager=True)
    yield cp
    cp.stop()


def pod(ns, name, node):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
            "spec": {"nodeName": node, "containers": [{"name": "web", "image": "web",
                                                       "ports": [{"name": "http", "containerPort": 8080}]}]}}


def set_ready(cp, ns, name, ip, ready):
    cp.admin.merge_patch(path_for("Pod", ns, name, "status"), {"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}})


def endpoints(cp, ns):
    out = {}
    for s in cp.admin.get(path_for("EndpointSlice", ns), {"labelSelector": "kubernetes.io/service-name=web"})["items"]:
        for e in s.get("endpoints") or ():
            out[e["addresses"][0]] = (e.get("nodeName"), e["conditions"].get("ready"),
                                      [(p["name"], p["port"]) for p in s["ports"]])
    return out


def wait_for(fn, want, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got == want:
            return
        time.sleep(0.2)
    assert got == want


def test_endpointslice_controller_makes_slices_from_pods(cp_with_kcm):
    cp = cp_with_kcm
    ns = f"t-{uuid.uuid4().hex[:8]}"
    cp.ensure_namespace(ns)
    cp.admin.create(path_for("Service", ns), {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": ns},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    for name, node in (("web-1", "node-a"), ("web-2", "node-b")):
        if not cp.admin.get(path_for("Node"), {"fieldSelector": f"metadata.name={node}"})["items"]:
            cp.admin.create(path_for("Node"), {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
        cp.admin.create(path_for("Pod", ns), pod(ns, name, node))
    set_ready(cp, ns, "web-1", "10.244.1.2", True)
    set_ready(cp, ns, "web-2", "10.244.2.2", True)
    wait_for(lambda: endpoints(cp, ns), {"10.244.1.2": ("node-a", True, [("http", 8080)]),
                                         "10.244.2.2": ("node-b", True, [("http", 8080)])})
    set_ready(cp, ns, "web-2", "10.244.2.2", False)
    wait_for(lambda: endpoints(cp, ns)["10.244.2.2"][1], False)
