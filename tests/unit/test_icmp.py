"""ICMP through the fast path and the reference: echo to a VIP, errors about
tracked flows translated (outer and inner headers, all checksums valid).
Every test runs against both modules; the Katran-style ICMP fixtures are in
packets.py (icmp_*), and test_same_bytes below holds the two to each other."""
import ipaddress

import pytest
from scapy.all import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror, raw

from engine import _fastpath, refpath

ip = lambda s: int(ipaddress.IPv4Address(s))
VIP, CLIENT, BACKEND, MASQ = "10.96.0.1", "192.168.50.2", "10.244.1.2", "169.254.100.1"
MODULES = [pytest.param(_fastpath, id="fastpath"), pytest.param(refpath, id="refpath")]


def make(mod):
    t = mod.Tables([dict(name="t", vip=ip(VIP), port=80, proto=6, backends=[(ip(BACKEND), 8080)]),
                    dict(name="u", vip=ip(VIP), port=53, proto=17, backends=[(ip(BACKEND), 5353)])],
                   vips=[ip(VIP)], drop_cidrs=[(ip("10.96.0.0"), 12)])
    return mod.Dataplane(ip(MASQ), tables=t, max_flows=64)


@pytest.fixture(params=MODULES)
def dp(request):
    return make(request.param)


def valid(pkt_bytes):
    """Every checksum scapy can recompute equals the one we wrote."""
    p = IP(pkt_bytes)
    q = IP(pkt_bytes)
    del q.chksum
    if ICMP in q:
        del q[ICMP].chksum
    if IPerror in q:
        del q[IPerror].chksum
    return raw(IP(raw(q))) == pkt_bytes or (p, IP(raw(q)))


def test_echo_to_vip_is_answered(dp):
    req = IP(src=CLIENT, dst=VIP, ttl=63) / ICMP(type=8, id=7, seq=3) / b"ping-payload"
    v, _, out = dp.process(raw(req), 1)
    assert v == "reply"
    o = IP(out)
    assert (o.src, o.dst, o[ICMP].type, o[ICMP].id, o[ICMP].seq) == (VIP, CLIENT, 0, 7, 3)
    assert bytes(o[ICMP].payload) == b"ping-payload"
    assert valid(out) is True


def test_echo_elsewhere_is_dropped(dp):
    assert dp.process(raw(IP(src=CLIENT, dst="10.96.9.9") / ICMP()), 1)[:2] == ("drop", "unallocated")
    assert dp.process(raw(IP(src=CLIENT, dst=MASQ) / ICMP()), 1)[:2] == ("drop", "spoofed")


def test_port_unreachable_from_backend_reaches_client(dp):
    q = IP(src=CLIENT, dst=VIP) / UDP(sport=40000, dport=53) / b"query"
    _, _, fwd = dp.process(raw(q), 1)
    f = IP(fwd)
    err = IP(src=BACKEND, dst=MASQ) / ICMP(type=3, code=3) / raw(f)[:28]
    v, _, out = dp.process(raw(err), 1)
    assert v == "forward"
    o = IP(out)
    assert (o.src, o.dst) == (VIP, CLIENT)
    inner = o[IPerror]
    assert (inner.src, inner.dst, o[UDPerror].sport, o[UDPerror].dport) == (CLIENT, VIP, 40000, 53)
    assert valid(out) is True


def test_frag_needed_from_a_router_keeps_router_source_and_mtu(dp):
    s = IP(src=CLIENT, dst=VIP) / TCP(sport=40001, dport=80, flags="S")
    _, _, fwd = dp.process(raw(s), 1)
    err = IP(src="10.244.9.1", dst=MASQ) / ICMP(type=3, code=4, nexthopmtu=1400) / raw(IP(fwd))[:48]
    v, _, out = dp.process(raw(err), 1)
    assert v == "forward"
    o = IP(out)
    assert (o.src, o.dst, o[ICMP].nexthopmtu) == ("10.244.9.1", CLIENT, 1400)
    assert (o[IPerror].src, o[IPerror].dst, o[TCPerror].sport, o[TCPerror].dport) == (CLIENT, VIP, 40001, 80)
    assert valid(out) is True


def test_time_exceeded_from_client_side_reaches_backend(dp):
    q = IP(src=CLIENT, dst=VIP) / UDP(sport=40002, dport=53) / b"q"
    _, _, fwd = dp.process(raw(q), 1)
    f = IP(fwd)
    reply = IP(src=BACKEND, dst=MASQ) / UDP(sport=5353, dport=f[UDP].sport) / b"answer"
    _, _, back = dp.process(raw(reply), 1)
    err = IP(src=CLIENT, dst=VIP) / ICMP(type=11, code=0) / raw(IP(back))
    v, _, out = dp.process(raw(err), 1)
    assert v == "forward"
    o = IP(out)
    assert (o.src, o.dst) == (MASQ, BACKEND)
    assert (o[IPerror].src, o[IPerror].dst, o[UDPerror].sport, o[UDPerror].dport) == (BACKEND, MASQ, 5353, f[UDP].sport)
    assert valid(out) is True


def test_error_about_no_flow_is_dropped(dp):
    bogus = IP(src=MASQ, dst=BACKEND) / UDP(sport=1111, dport=5353)
    err = IP(src=BACKEND, dst=MASQ) / ICMP(type=3, code=3) / raw(bogus)
    assert dp.process(raw(err), 1)[:2] == ("drop", "spoofed")


@pytest.mark.parametrize("cut", [0, 8, 19, 27])
def test_truncated_quote_is_malformed(dp, cut):
    q = IP(src=CLIENT, dst=VIP) / UDP(sport=40003, dport=53)
    _, _, fwd = dp.process(raw(q), 1)
    err = IP(src=BACKEND, dst=MASQ) / ICMP(type=3, code=3) / raw(IP(fwd))[:cut]
    assert dp.process(raw(err), 1)[:2] == ("drop", "malformed")


def test_error_about_expired_flow_is_dropped(dp):
    """A flow past its timeout is gone for ICMP errors too, swept or not."""
    q = IP(src=CLIENT, dst=VIP) / UDP(sport=40004, dport=53)
    _, _, fwd = dp.process(raw(q), 1)
    err = IP(src=BACKEND, dst=MASQ) / ICMP(type=3, code=3) / raw(IP(fwd))
    assert dp.process(raw(err), 1 + 29)[0] == "forward"
    assert dp.process(raw(err), 1 + 31)[:2] == ("drop", "spoofed")
    assert dp.expire(1 + 31) == 1
    assert dp.process(raw(err), 1 + 31)[:2] == ("drop", "spoofed")


def test_error_counts_for_the_flows_service(dp):
    q = IP(src=CLIENT, dst=VIP) / UDP(sport=40005, dport=53) / b"q"
    _, _, fwd = dp.process(raw(q), 1)
    err = IP(src=BACKEND, dst=MASQ) / ICMP(type=3, code=3) / raw(IP(fwd))
    _, _, out = dp.process(raw(err), 1)
    assert dp.service_counters([1])[1] == {"packets": 2, "bytes": len(raw(q)) + len(out),
                                           "flows": 1, "rejects": 0, "denied": 0}
    assert dp.service_counters([0])[0]["packets"] == 0


def _exchange(mod):
    """A run through echo, errors both ways, and drops; everything that came out."""
    dp = make(mod)
    out = []
    for sport in (40010, 40011):
        q = IP(src=CLIENT, dst=VIP) / UDP(sport=sport, dport=53) / b"query"
        _, _, fwd = dp.process(raw(q), 1)
        out.append(fwd)
        back = raw(IP(src=BACKEND, dst=MASQ) / UDP(sport=5353, dport=IP(fwd)[UDP].sport) / b"a")
        out.append(dp.process(back, 2))
        for pkt in (IP(src=BACKEND, dst=MASQ) / ICMP(type=3, code=3) / fwd,
                    IP(src="10.244.0.1", dst=MASQ) / ICMP(type=3, code=4, nexthopmtu=1280) / fwd[:28],
                    IP(src=CLIENT, dst=VIP) / ICMP(type=11) / out[-1][2],
                    IP(src=CLIENT, dst=VIP) / ICMP(type=8, id=sport, seq=1) / b"ping",
                    IP(src=CLIENT, dst="10.96.3.3") / ICMP(type=8),
                    IP(src=CLIENT, dst=VIP) / ICMP(type=3) / fwd[:27]):
            out.append(dp.process(raw(pkt), 3))
    s = IP(src=CLIENT, dst=VIP) / TCP(sport=40020, dport=80, flags="S")
    _, _, fwd = dp.process(raw(s), 4)
    out.append(dp.process(raw(IP(src=BACKEND, dst=MASQ) / ICMP(type=12, ptr=9) / fwd), 4))
    out.append(dp.process(raw(IP(src=BACKEND, dst=MASQ) / ICMP(type=3, code=13) / fwd[:28]), 4))
    return out, dp.counters(), dp.flows(4), dp.service_counters([0, 1])


def test_same_bytes():
    assert _exchange(_fastpath) == _exchange(refpath)


@pytest.mark.parametrize("modname", ["_fastpath", "refpath"])
def test_port_unreachables_are_rate_limited(modname):
    """At most icmp_rate errors a second: the engine is no reflector."""
    import importlib
    mod = importlib.import_module(f"engine.{modname}")
    t = mod.Tables([dict(name="e", vip=ip(VIP), port=80, proto=6, backends=[])], vips=[ip(VIP)])
    dp = mod.Dataplane(ip(MASQ), tables=t, icmp_rate=5)
    verdicts = [dp.process(raw(IP(src=CLIENT, dst=VIP) / TCP(sport=50000 + k, dport=80, flags="S")), 7)[:2]
                for k in range(8)]
    assert verdicts == [("reply", "none")] * 5 + [("drop", "icmp_rate")] * 3
    assert dp.process(raw(IP(src=CLIENT, dst=VIP) / TCP(sport=50009, dport=80, flags="S")), 8)[0] == "reply"
    assert dp.counters()["drops_by_reason"]["icmp_rate"] == 3


@pytest.mark.parametrize("modname", ["_fastpath", "refpath"])
def test_port_unreachables_have_a_budget_per_source(modname):
    """One source flooding refused ports spends only its own budget
    (icmp_source_rate a second): other clients still get "connection refused"
    at once. The global cap still holds over all sources."""
    import importlib
    mod = importlib.import_module(f"engine.{modname}")
    t = mod.Tables([dict(name="e", vip=ip(VIP), port=80, proto=6, backends=[])], vips=[ip(VIP)])
    dp = mod.Dataplane(ip(MASQ), tables=t, icmp_rate=20, icmp_source_rate=4)

    def syn(src, k, now=7):
        return dp.process(raw(IP(src=src, dst=VIP) / TCP(sport=50000 + k, dport=80, flags="S")), now)[:2]

    flood = [syn("192.168.50.66", k) for k in range(10)]
    assert flood == [("reply", "none")] * 4 + [("drop", "icmp_rate")] * 6
    others = [syn(f"192.168.50.{10 + k}", k) for k in range(4)]      # the flooder left them budget
    assert others == [("reply", "none")] * 4
    assert syn("192.168.50.66", 99, now=8) == ("reply", "none")      # a new second, a new budget
    # the global cap: 20 a second whatever the sources
    spread = [syn(f"192.168.51.{k}", k, now=9) for k in range(25)]
    assert spread == [("reply", "none")] * 20 + [("drop", "icmp_rate")] * 5
    assert dp.counters()["drops_by_reason"]["icmp_rate"] == 11
