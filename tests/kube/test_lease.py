"""Leader election on a real Lease and the LoadBalancer status writer: one
leader at a time, a crashed leader is replaced after the lease duration, a
released one at once, and allocations survive leader changes."""

import time
import uuid

import pytest

from engine.kube.client import path_for
from engine.kube.lbstatus import StatusWriter
from engine.kube.lease import LeaderElector
from engine.kube.reflector import Reflector

FAST = dict(lease_duration=3.0, renew_deadline=2.0, retry_period=0.3)


def wait(cond, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def ns(control_plane):
    name = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.ensure_namespace(name)
    return name


def test_one_leader_crash_takeover_and_release(control_plane, ns):
    a = control_plane.admin
    started = []
    e1 = LeaderElector(a, ns, "ipam", "node-1", on_started_leading=lambda: started.append("node-1"), **FAST).start()
    assert wait(lambda: e1.is_leader)
    e2 = LeaderElector(a, ns, "ipam", "node-2", on_started_leading=lambda: started.append("node-2"), **FAST).start()
    try:
        time.sleep(4)                     # longer than the lease: e1 keeps renewing, e2 never wins
        assert e1.is_leader and not e2.is_leader and e2.leader == "node-1"
        # e1 crashes (no release): e2 takes over once the lease has not moved for 3 s
        t = time.monotonic()
        e1.stop(release=False)
        assert wait(lambda: e2.is_leader, 15)
        took = time.monotonic() - t
        assert 2.5 < took < 8, took
        spec = a.get(path_for("Lease", ns, "ipam"))["spec"]
        assert spec["holderIdentity"] == "node-2" and spec["leaseTransitions"] == 1
        # e2 leaves cleanly: a new candidate takes over at once
        e3 = LeaderElector(a, ns, "ipam", "node-3", **FAST).start()
        time.sleep(1)
        assert not e3.is_leader
        t = time.monotonic()
        e2.stop(release=True)
        assert wait(lambda: e3.is_leader, 10)
        assert time.monotonic() - t < 2.5
        e3.stop()
        assert started == ["node-1", "node-2"]
    finally:
        for e in (e1, e2):
            e.stop(release=False)


def lb_service(ns, name):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]}}


class Node:
    """What one engine runs for LB IPAM: a Service reflector, an elector and a writer."""

    def __init__(self, cp, ns, name, pool):
        self.reflector = Reflector(cp.admin, "Service", self.changed, namespace=ns, resync_period=0)
        self.elector = LeaderElector(cp.admin, ns, "lb-ipam", name, on_started_leading=self.changed, **FAST)
        self.writer = StatusWriter(cp.admin, self.reflector.snapshot, [pool], self.elector, period=5)
        self.reflector.start()
        assert self.reflector.synced.wait(20)
        self.writer.start()
        self.elector.start()

    def changed(self, *_):
        self.writer.changed()

    def crash(self):
        self.elector.stop(release=False)
        self.writer.stop()
        self.reflector.stop()


def ingress(cp, ns):
    out = {}
    for s in cp.admin.get(path_for("Service", ns))["items"]:
        ing = ((s.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        out[s["metadata"]["name"]] = [i["ip"] for i in ing]
    return out


def test_lb_status_is_written_once_and_stays_across_leader_changes(control_plane, ns):
    cp = control_plane
    pool = "172.18.255.0/28"
    for name in ("s1", "s2", "s3"):
        cp.admin.create(path_for("Service", ns), lb_service(ns, name))
    n1 = Node(cp, ns, "node-1", pool)
    n2 = None
    try:
        assert wait(lambda: all(ingress(cp, ns).values()))
        first = ingress(cp, ns)
        assert sorted(ip for ips in first.values() for ip in ips) == \
            ["172.18.255.1", "172.18.255.2", "172.18.255.3"]
        n2 = Node(cp, ns, "node-2", pool)
        time.sleep(1)
        assert n1.elector.is_leader and not n2.elector.is_leader and n2.writer.writes == 0
        # leader crashes; meanwhile a service goes and a new one comes
        n1.crash()
        cp.admin.delete(path_for("Service", ns, "s1"))
        cp.admin.create(path_for("Service", ns), lb_service(ns, "s4"))
        assert wait(lambda: n2.elector.is_leader, 15)
        assert wait(lambda: ingress(cp, ns).get("s4"))
        after = ingress(cp, ns)
        assert after["s2"] == first["s2"] and after["s3"] == first["s3"]   # unchanged
        assert after["s4"] == first["s1"]                                  # the freed IP, lowest free
        time.sleep(1)
        assert n2.writer.writes == 1 and n2.writer.errors == 0
        # a restarted node-1 follows and writes nothing
        n1 = Node(cp, ns, "node-1", pool)
        time.sleep(2)
        assert not n1.elector.is_leader and n1.writer.writes == 0
        assert ingress(cp, ns) == after
    finally:
        n1.crash()
        if n2:
            n2.crash()
