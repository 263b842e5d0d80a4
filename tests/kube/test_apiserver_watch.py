"""Reflectors against a real kube-apiserver: Services and EndpointSlices with
kube-proxy's selector (headless kept), this node's Node by field selector,
and a 410 Gone after etcd compaction whose relist reports the deletions
made in the gap."""

import base64
import json
import threading
import time
import urllib.request
import uuid

import pytest

from engine.kube.client import path_for
from engine.kube.reflector import Backoff, Reflector

SELECTOR = "!service.kubernetes.io/service-proxy-name"


class Events:
    def __init__(self):
        self.items = []
        self.cond = threading.Condition()

    def __call__(self, kind, key, old, new):
        with self.cond:
            self.items.append((kind, key, old, new))
            self.cond.notify_all()

    def wait(self, pred, timeout=20):
        with self.cond:
            assert self.cond.wait_for(lambda: any(pred(*e) for e in self.items), timeout), \
                [(k, key, o is None, n is None) for k, key, o, n in self.items]

    def of(self, key):
        return [(o, n) for _, k, o, n in self.items if k == key]


def service(ns, name, labels=None, **spec):
    spec.setdefault("ports", [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}])
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}}, "spec": spec}


def slice_for(ns, svc, name, ips, node="node-a"):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": node} for ip in ips]}


def node(name, ip):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def set_node_address(cp, name, ip):
    cp.admin.merge_patch(path_for("Node", name=name, subresource="status"),
                         {"status": {"addresses": [{"type": "InternalIP", "address": ip}]}})


@pytest.fixture
def ns(control_plane):
    name = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.ensure_namespace(name)
    return name


def start(cp, kind, events, **kw):
    r = Reflector(cp.admin, kind, events, read_timeout=30, resync_period=0,
                  backoff=Backoff(initial=0.1, cap=1), **kw)
    r.start()
    assert r.synced.wait(30), r.last_error
    return r


def test_services_slices_and_node(control_plane, ns):
    cp = control_plane
    a = cp.admin
    a.create(path_for("Service", ns), service(ns, "pre"))
    a.create(path_for("EndpointSlice", ns), slice_for(ns, "pre", "pre-1", ["10.244.1.2"]))
    for n, ip in (("node-a", "192.0.2.1"), ("node-b", "192.0.2.2")):
        a.create(path_for("Node"), node(n, "0.0.0.0"))
        set_node_address(cp, n, ip)
    ev = Events()
    refl = [start(cp, "Service", ev, label_selector=SELECTOR),
            start(cp, "EndpointSlice", ev, label_selector=SELECTOR),
            start(cp, "Node", ev, field_selector="metadata.name=node-a")]
    try:
        # the initial list, with kind and apiVersion filled into list items
        pre = ev.of(f"{ns}/pre")
        assert len(pre) == 1 and pre[0][0] is None
        assert (pre[0][1]["kind"], pre[0][1]["apiVersion"]) == ("Service", "v1")
        (_, sl), = ev.of(f"{ns}/pre-1")
        assert (sl["kind"], sl["apiVersion"]) == ("EndpointSlice", "discovery.k8s.io/v1")
        assert sl["endpoints"][0]["addresses"] == ["10.244.1.2"]
        (_, nd), = ev.of("node-a")
        assert nd["status"]["addresses"] == [{"type": "InternalIP", "address": "192.0.2.1"}]
        assert ev.of("node-b") == []

        # watch: adds (headless kept, other proxies' services not), updates, deletes
        a.create(path_for("Service", ns), service(ns, "headless", clusterIP="None"))
        a.create(path_for("Service", ns), service(ns, "theirs", {"service.kubernetes.io/service-proxy-name": "x"}))
        a.create(path_for("EndpointSlice", ns), slice_for(ns, "headless", "headless-1", ["10.244.2.2"]))
        a.merge_patch(path_for("Service", ns, "pre"), {"spec": {"ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}]}})
        set_node_address(cp, "node-a", "192.0.2.11")
        set_node_address(cp, "node-b", "192.0.2.12")
        ev.wait(lambda k, key, o, n: key == f"{ns}/headless" and k == "Service" and n is not None)
        ev.wait(lambda k, key, o, n: key == f"{ns}/headless-1" and n is not None)
        ev.wait(lambda k, key, o, n: key == f"{ns}/pre" and o is not None and n is not None)
        ev.wait(lambda k, key, o, n: key == "node-a" and o is not None)
        (old, new), = [e for e in ev.of(f"{ns}/pre") if e[0] is not None]
        assert len(old["spec"]["ports"]) == 1 and len(new["spec"]["ports"]) == 2
        assert new["kind"] == "Service"
        (_, hl), = ev.of(f"{ns}/headless")
        assert hl["spec"]["clusterIP"] == "None"
        n_old, n_new = ev.of("node-a")[-1]
        assert n_old["status"]["addresses"][0]["address"] == "192.0.2.1"
        assert n_new["status"]["addresses"][0]["address"] == "192.0.2.11"

        # a service that another proxy takes over leaves our view (DELETED by the selector)
        a.merge_patch(path_for("Service", ns, "pre"),
                      {"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": "x"}}})
        ev.wait(lambda k, key, o, n: key == f"{ns}/pre" and n is None)
        a.delete(path_for("Service", ns, "headless"))
        ev.wait(lambda k, key, o, n: key == f"{ns}/headless" and k == "Service" and n is None)
        time.sleep(1)
        assert ev.of(f"{ns}/theirs") == [] and ev.of("node-b") == []
        assert f"{ns}/headless" not in refl[0].snapshot() and f"{ns}/headless-1" in refl[1].snapshot()
        assert all(r.counts["errors"] == 0 and r.counts["lists"] == 1 for r in refl)
    finally:
        for r in refl:
            r.stop()


def etcd_post(cp, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{cp.etcd_port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def uncached_control_plane():
    """Watches straight from etcd (no watch cache), so compacting etcd
    makes an old resourceVersion 410 Gone, as a long outage does."""
    from conftest import start_control_plane
    cp = start_control_plane(apiserver_args=["--watch-cache=false"])
    yield cp
    cp.stop()


def test_gone_after_compaction_relists_and_applies_deletions_in_the_gap(uncached_control_plane):
    cp = uncached_control_plane
    ns = f"t-{uuid.uuid4().hex[:8]}"
    cp.ensure_namespace(ns)
    a = cp.admin
    for name in ("a", "b", "c"):
        a.create(path_for("Service", ns), service(ns, name))
    ev = Events()
    r = Reflector(a, "Service", ev, namespace=ns, read_timeout=30, resync_period=0,
                  backoff=Backoff(initial=0.1, cap=1))
    r.start()
    assert r.synced.wait(30)
    r.stop()                                  # away: the cache and resourceVersion stay
    old_rv = r.resource_version
    a.delete(path_for("Service", ns, "b"))
    a.merge_patch(path_for("Service", ns, "c"), {"metadata": {"labels": {"changed": "yes"}}})
    a.create(path_for("Service", ns), service(ns, "d"))
    # compact etcd to its current revision: old_rv can no longer be watched from
    rev = int(etcd_post(cp, "/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"])
    etcd_post(cp, "/v3/kv/compaction", {"revision": str(rev), "physical": True})
    n = len(ev.items)
    r.start()                                 # comes back: watch from old_rv -> 410 -> relist
    ev.wait(lambda k, key, o, n_: key == f"{ns}/d")
    ev.wait(lambda k, key, o, n_: key == f"{ns}/b" and n_ is None)
    try:
        got = sorted(("delete" if n_ is None else "add" if o is None else "update", key)
                     for _, key, o, n_ in ev.items[n:])
        assert got == [("add", f"{ns}/d"), ("delete", f"{ns}/b"), ("update", f"{ns}/c")]
        assert r.counts["relists_gone"] == 1 and r.counts["lists"] == 2
        assert int(r.resource_version) > int(old_rv)
        assert sorted(r.snapshot()) == [f"{ns}/a", f"{ns}/c", f"{ns}/d"]
    finally:
        r.stop()


def test_a_thousand_services_reach_the_reflector(control_plane, ns):
    """1,000 Services (with a slice each) created through the API: all
    reach the reflectors; prints how long from the first create."""
    import concurrent.futures
    cp = control_plane
    done = {"Service": set(), "EndpointSlice": set()}
    all_in = threading.Event()

    def cb(kind, key, old, new):
        if new is not None and key.startswith(ns + "/"):
            done[kind].add(key)
            if len(done["Service"]) == 1000 and len(done["EndpointSlice"]) == 1000:
                all_in.set()
    refl = [start(cp, "Service", cb, label_selector=SELECTOR), start(cp, "EndpointSlice", cb, label_selector=SELECTOR)]
    try:
        def make(i):
            cp.admin.create(path_for("Service", ns), service(ns, f"s{i}"))
            cp.admin.create(path_for("EndpointSlice", ns),
                            slice_for(ns, f"s{i}", f"s{i}-1", [f"10.244.{i // 250}.{i % 250 + 2}"]))
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(make, range(1000)))
        created = time.monotonic() - t0
        assert all_in.wait(60), {k: len(v) for k, v in done.items()}
        seen = time.monotonic() - t0
        print(f"\n1000 services + 1000 slices: created in {created:.1f}s, all watched by {seen:.1f}s")
        assert all(r.counts["lists"] == 1 and r.counts["errors"] == 0 for r in refl)
    finally:
        for r in refl:
            r.stop()
