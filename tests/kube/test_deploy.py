"""deploy/ against a real kube-apiserver: the manifests pass server-side
apply with strict validation, and the ServiceAccount's real token can do
exactly what the engine does (follow Services, EndpointSlices and its Node,
write LoadBalancer status, hold the Lease) and no more."""

import os
import uuid

import pytest
import yaml

from engine.kube.client import ApiError, Client, path_for
from engine.kube.kubeconfig import load_kubeconfig
from engine.kube.lease import LeaderElector
from engine.kube.reflector import Reflector

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def manifests(name):
    with open(os.path.join(ROOT, "deploy", name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


@pytest.fixture(scope="module")
def deployed(control_plane):
    for name in ("rbac.yaml", "daemonset.yaml"):
        for doc in manifests(name):
            control_plane.admin.apply(doc, field_manager="engine-tests")
    return Client(load_kubeconfig(control_plane.service_account_kubeconfig("kube-system", "engine")))


def test_manifests_are_accepted_as_written(control_plane, deployed):
    ds = control_plane.admin.get(path_for("DaemonSet", "kube-system", "engine"))
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["serviceAccountName"] == "engine"
    c = pod["containers"][0]
    assert "NET_ADMIN" in c["securityContext"]["capabilities"]["add"]
    tun = next(v for v in pod["volumes"] if v["name"] == "dev-net-tun")
    assert tun["hostPath"] == {"path": "/dev/net/tun", "type": "CharDevice"}
    cm = control_plane.admin.get(path_for("ConfigMap", "kube-system", "engine"))
    assert yaml.safe_load(cm["data"]["config.yaml"])["kind"] == "EngineConfiguration"


def test_strict_validation_would_catch_a_mistake(control_plane):
    doc = manifests("daemonset.yaml")[1]
    doc["spec"]["template"]["spec"]["hostNetwrok"] = True
    doc["metadata"]["name"] = "engine-typo"
    with pytest.raises(ApiError) as e:
        control_plane.admin.apply(doc)
    # server-side apply answers 500 "field not declared in schema" for an unknown field
    assert e.value.status in (400, 500) and "hostNetwrok" in str(e.value)


def test_service_account_can_do_what_the_engine_does(control_plane, deployed):
    sa, admin = deployed, control_plane.admin
    ns = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.ensure_namespace(ns)
    admin.create(path_for("Service", ns), {"apiVersion": "v1", "kind": "Service",
                                           "metadata": {"name": "lb", "namespace": ns},
                                           "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}})
    # follow: list + watch of each resource (a reflector syncs and watches)
    seen = []
    refl = [Reflector(sa, "Service", lambda *e: seen.append(e[1]), resync_period=0,
                      label_selector="!service.kubernetes.io/service-proxy-name").start(),
            Reflector(sa, "EndpointSlice", lambda *e: None, resync_period=0).start(),
            Reflector(sa, "Node", lambda *e: None, resync_period=0, field_selector="metadata.name=node-a").start()]
    try:
        for r in refl:
            assert r.synced.wait(20), r.last_error
        assert f"{ns}/lb" in seen
        # write the LoadBalancer status
        sa.merge_patch(path_for("Service", ns, "lb", "status"),
                       {"status": {"loadBalancer": {"ingress": [{"ip": "172.18.255.1", "ipMode": "VIP"}]}}})
        got = admin.get(path_for("Service", ns, "lb"))
        assert got["status"]["loadBalancer"]["ingress"][0]["ip"] == "172.18.255.1"
        # hold the Lease
        e = LeaderElector(sa, "kube-system", "engine-lb-ipam", "node-a", 3, 2, 0.5)
        assert e.try_acquire_or_renew() and e.try_acquire_or_renew()
        assert admin.get(path_for("Lease", "kube-system", "engine-lb-ipam"))["spec"]["holderIdentity"] == "node-a"
        for r in refl:
            assert r.counts["errors"] == 0, r.last_error
    finally:
        for r in refl:
            r.stop()


@pytest.mark.parametrize("method, path, body", [
    ("GET", path_for("Service", "default", "kubernetes"), None),                 # get is not needed
    ("GET", "/api/v1/secrets", None),
    ("DELETE", path_for("Service", "default", "kubernetes"), None),
    ("PATCH", path_for("Service", "default", "kubernetes"), {"metadata": {"labels": {"x": "y"}}}),
    ("PATCH", path_for("Node", name="node-a"), {"metadata": {"labels": {"x": "y"}}}),
    ("GET", path_for("Lease", "kube-system"), None),                             # no list of leases
    ("GET", path_for("Lease", "kube-system", "kube-controller-manager"), None),   # only its own Lease
    ("POST", path_for("Lease", "default"), {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                             "metadata": {"name": "x"}}),
])
def test_service_account_can_do_nothing_more(deployed, method, path, body):
    with pytest.raises(ApiError) as e:
        deployed.request(method, path, body=body,
                         content_type="application/merge-patch+json" if method == "PATCH" else "application/json")
    assert e.value.status == 403
