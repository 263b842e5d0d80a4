"""API events into the engine: parsed as file objects, one refused object
left out on its own, syncs batched, this node's addresses from its Node."""

import threading
import time

from engine.kube.feed import EngineFeed, node_addresses


class FakeEngine:
    """Records what the feed hands over (the real engine's change tracker is
    tested with it in tests/kube)."""

    def __init__(self, fail=False):
        self.updates, self.syncs, self.fail = [], [], fail
        self.synced = threading.Event()

    def update(self, kind, key, obj, source="api"):
        self.updates.append((kind, key, obj, source))

    def sync(self, noticed=None):
        self.syncs.append(noticed)
        self.synced.set()
        if self.fail:
            raise RuntimeError("boom")


def service(name, **spec):
    # as the API server serves it (fields filled in by defaulting)
    s = {"ports": [{"protocol": "TCP", "port": 80, "targetPort": 8080, "nodePort": 31781}],
         "selector": {"app": "x"}, "clusterIP": "10.108.215.249", "clusterIPs": ["10.108.215.249"],
         "type": "LoadBalancer", "sessionAffinity": "None", "externalTrafficPolicy": "Cluster",
         "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "allocateLoadBalancerNodePorts": True,
         "internalTrafficPolicy": "Cluster"}
    s.update(spec)
    return {"kind": "Service", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": "default", "resourceVersion": "7", "uid": "u",
                         "creationTimestamp": "2026-12-03T15:00:00Z",
                         "managedFields": [{"manager": "kubectl", "operation": "Update"}]},
            "spec": s, "status": {"loadBalancer": {}}}


def test_events_become_engine_updates_and_one_batched_sync():
    eng = FakeEngine()
    feed = EngineFeed(eng, min_sync_period=0.2).start()
    try:
        feed("Service", "default/a", None, service("a"))
        feed("EndpointSlice", "default/a-1", None, {
            "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": "a-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "a"}},
            "addressType": "IPv4", "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.1.2"], "conditions": {"ready": True}, "nodeName": "n1"}]})
        feed("Service", "default/b", service("b"), None)
        assert eng.synced.wait(5)
        time.sleep(0.3)
        assert len(eng.syncs) == 1                        # one sync for the burst
        (k1, key1, svc, src), (k2, key2, sl, _), (k3, key3, gone, _) = eng.updates
        assert (k1, key1, src) == ("Service", ("default", "a"), "api")
        assert svc.cluster_ip == "10.108.215.249" and svc.ports[0].node_port == 31781
        assert (k2, key2) == ("EndpointSlice", ("default", "a-1")) and sl.service_name == "a"
        assert [e.ip for e in sl.endpoints] == ["10.244.1.2"]
        assert (k3, key3, gone) == ("Service", ("default", "b"), None)
    finally:
        feed.stop()


def test_a_refused_object_is_left_out_alone_and_reported_once():
    eng = FakeEngine()
    feed = EngineFeed(eng)
    bad = service("bad", type="Weird")
    feed("Service", "default/bad", None, bad)
    feed("Service", "default/bad", bad, bad)               # a resync: reported once
    feed("Service", "default/ok", None, service("ok"))
    assert [(k, key, obj is None) for k, key, obj, _ in eng.updates] == [
        ("Service", ("default", "bad"), True), ("Service", ("default", "bad"), True),
        ("Service", ("default", "ok"), False)]
    assert feed.counts["refused"] == 1 and "spec.type" in feed.refused["Service default/bad"]
    feed("Service", "default/bad", bad, service("bad"))    # fixed
    assert "Service default/bad" not in feed.refused and eng.updates[-1][2] is not None


def test_node_addresses_come_from_the_node():
    seen = []
    feed = EngineFeed(FakeEngine(), on_node=seen.append)
    node = {"kind": "Node", "metadata": {"name": "n1"}, "status": {"addresses": [
        {"type": "Hostname", "address": "n1"}, {"type": "ExternalIP", "address": "203.0.113.9"},
        {"type": "InternalIP", "address": "192.168.50.1"}]}}
    feed("Node", "n1", None, node)
    feed("Node", "n1", node, node)                         # unchanged: no call
    feed("Node", "n1", node, None)
    assert seen == [["192.168.50.1", "203.0.113.9"], None]
    assert node_addresses({}) == []


def test_a_failing_sync_is_counted_and_retried_on_the_next_event():
    eng = FakeEngine(fail=True)
    feed = EngineFeed(eng, min_sync_period=0.01).start()
    try:
        feed("Service", "default/a", None, service("a"))
        assert eng.synced.wait(5)
        eng.synced.clear()
        feed("Service", "default/a", service("a"), service("a", sessionAffinity="ClientIP"))
        assert eng.synced.wait(5)
        time.sleep(0.1)
        assert feed.counts["sync_errors"] == 2
    finally:
        feed.stop()


def test_the_ip_in_status_is_served_as_if_requested():
    eng = FakeEngine()
    feed = EngineFeed(eng, lb_pools=["172.18.255.0/24"])
    s = service("a")
    s["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}, {"ip": "172.18.255.9", "ipMode": "VIP"}]}}
    feed("Service", "default/a", None, s)
    pinned = dict(service("b"), status=s["status"])
    pinned["spec"] = dict(pinned["spec"], loadBalancerIP="172.18.255.20")
    feed("Service", "default/b", None, pinned)
    other = dict(service("c", loadBalancerClass="example.com/lb"), status=s["status"])
    feed("Service", "default/c", None, other)
    got = [u[2].load_balancer_ip for u in eng.updates]
    assert got == ["172.18.255.9", "172.18.255.20", None]
    assert "loadBalancerIP" not in s["spec"]          # the event's object is not changed
