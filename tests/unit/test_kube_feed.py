"""What the API source hands the engine: Services and EndpointSlices to
Engine.on_api_event (tested with the engine in tests/unit/test_incremental.py
and tests/e2e/test_api.py), this node's addresses from its Node, and the
IPAM leader's LoadBalancer IP from status served as if requested."""

from engine.kube.feed import EngineFeed, node_addresses


class FakeEngine:
    def __init__(self):
        self.events, self.syncs = [], 0

    def on_api_event(self, kind, key, old, new):
        self.events.append((kind, key, old, new))

    def request_sync(self):
        self.syncs += 1


def service(name, **spec):
    s = {"ports": [{"protocol": "TCP", "port": 80}], "type": "LoadBalancer"}
    s.update(spec)
    return {"kind": "Service", "apiVersion": "v1", "metadata": {"name": name, "namespace": "default"}, "spec": s}


def test_services_and_slices_go_to_the_engine_and_wake_the_writer():
    eng, woken = FakeEngine(), []
    feed = EngineFeed(eng, on_service=lambda: woken.append(1))
    sl = {"kind": "EndpointSlice", "metadata": {"name": "a-1", "namespace": "default"}}
    feed("Service", "default/a", None, service("a"))
    feed("EndpointSlice", "default/a-1", None, sl)
    feed("Service", "default/a", service("a"), None)
    assert [(k, key, o is None, n is None) for k, key, o, n in eng.events] == [
        ("Service", "default/a", True, False), ("EndpointSlice", "default/a-1", True, False),
        ("Service", "default/a", False, True)]
    assert len(woken) == 2


def test_node_addresses_come_from_the_node():
    seen, eng = [], FakeEngine()
    feed = EngineFeed(eng, on_node=seen.append)
    node = {"kind": "Node", "metadata": {"name": "n1"}, "status": {"addresses": [
        {"type": "Hostname", "address": "n1"}, {"type": "ExternalIP", "address": "203.0.113.9"},
        {"type": "InternalIP", "address": "192.168.50.1"}]}}
    feed("Node", "n1", None, node)
    feed("Node", "n1", node, node)                         # unchanged: no call
    feed("Node", "n1", node, None)
    assert seen == [["192.168.50.1", "203.0.113.9"], None] and eng.syncs == 2
    assert node_addresses({}) == [] and eng.events == []


def test_the_ip_in_status_is_served_as_if_requested():
    eng = FakeEngine()
    feed = EngineFeed(eng, lb_pools=["172.18.255.0/24"])
    status = {"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}, {"ip": "172.18.255.9", "ipMode": "VIP"}]}}
    s = dict(service("a"), status=status)
    feed("Service", "default/a", None, s)
    feed("Service", "default/b", None, dict(service("b", loadBalancerIP="172.18.255.20"), status=status))
    feed("Service", "default/c", None, dict(service("c", loadBalancerClass="example.com/lb"), status=status))
    assert [n["spec"].get("loadBalancerIP") for _, _, _, n in eng.events] == ["172.18.255.9", "172.18.255.20", None]
    assert "loadBalancerIP" not in s["spec"]          # the event's object is not changed
