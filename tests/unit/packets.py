"""Katran-style packet fixtures for the fast path (engine._fastpath) and its
pure-Python reference (engine.refpath).

A fixture is a description, a setup (service tables, Dataplane options) and a
list of steps. A step is an input packet built with scapy (or a function of
the context, for replies that depend on an earlier output), the time it
arrives, and what must come out: verdict, drop reason, and checks on the
output parsed back with scapy. Every output is also checked for valid IP and
L4 checksums. Earlier steps establish the state a later step needs.

run_fixture(mod, fixture) runs one fixture against either module; the tests
run every fixture against both and compare the two byte for byte, and both
against the golden bytes of golden_outputs.json (every step's input and
expected output, as Katran's expectedOutputPacket): a change made to the
fast path and the reference alike still shows. After a deliberate change,
or a new fixture, regenerate that file from the repository root with

    python3 -m tests.unit.packets --write-golden

(it refuses while the fast path and the reference disagree, or a fixture's
own checks fail) and review its diff.
"""
import ipaddress
import json
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_Router_Alert, IPOption_NOP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet, Raw

from engine.lab.packets import csum, pseudo_sum


def ip(s):
    return int(ipaddress.IPv4Address(s))


# --- topology -------------------------------------------------------------------

MASQ = "169.254.100.1"
CLIENT = "10.0.0.1"                 # inside the LB source range
FAR_CLIENT = "10.1.0.1"             # outside it
BACKENDS = ["10.244.1.2", "10.244.1.3", "10.244.1.4"]
VIP = "10.96.100.100"               # TCP 80 -> :8080, UDP 53 -> :5353 on BACKENDS
VIP_NOEP = "10.96.100.101"          # TCP 80, UDP 53: no ready endpoint
VIP_MULTI = "10.96.100.102"         # http 80 -> MULTI_POD:8080, https 443 -> MULTI_POD:8443
MULTI_POD = "10.244.2.2"
VIP_ONE = "10.96.100.103"           # TCP 80 -> 10.244.1.2:8080, UDP 53 -> 10.244.1.2:5353
VIP_TWO = "10.96.100.104"           # UDP 53 -> 10.244.1.3:5353
LB_IP = "172.18.255.10"             # TCP 80 -> BACKENDS:8080, loadBalancerSourceRanges 10.0.0.0/24
NODE = "192.168.50.1"               # node address: node port TCP 30080 -> BACKENDS:8080
NOT_NODE = "192.168.50.2"
UNALLOCATED = "10.96.5.5"           # inside the service CIDR, not a VIP
OUTSIDE = "8.8.8.8"
SERVICE_CIDR = ("10.96.0.0", 12)
LB_CIDR = ("172.18.255.0", 24)
DEFAULT_PORTS = range(1024, 65536)
T0 = 1000                           # the dataplane clock at the first packet


def svc(name, vip, port, proto, backends, **kw):
    d = {"name": name, "vip": ip(vip) if vip else 0, "port": port, "proto": proto,
         "backends": [(ip(a), p) for a, p in backends], "scheduler": 0}
    d.update(kw)
    return d


def default_tables():
    """Keyword arguments of Tables(...) for the common topology."""
    return dict(
        services=[
            svc("default/web:http", VIP, 80, 6, [(b, 8080) for b in BACKENDS]),
            svc("default/web:dns", VIP, 53, 17, [(b, 5353) for b in BACKENDS]),
            svc("default/noep:http", VIP_NOEP, 80, 6, []),
            svc("default/noep:dns", VIP_NOEP, 53, 17, []),
            svc("default/multi:http", VIP_MULTI, 80, 6, [(MULTI_POD, 8080)]),
            svc("default/multi:https", VIP_MULTI, 443, 6, [(MULTI_POD, 8443)]),
            svc("default/one:http", VIP_ONE, 80, 6, [(BACKENDS[0], 8080)]),
            svc("default/one:dns", VIP_ONE, 53, 17, [(BACKENDS[0], 5353)]),
            svc("default/two:dns", VIP_TWO, 53, 17, [(BACKENDS[1], 5353)]),
            svc("default/lb:http", LB_IP, 80, 6, [(b, 8080) for b in BACKENDS],
                source_ranges=[(ip("10.0.0.0"), 24)]),
            svc("default/lb:http@node", None, 30080, 6, [(b, 8080) for b in BACKENDS],
                nodeport=True),
        ],
        vips=[ip(a) for a in (VIP, VIP_NOEP, VIP_MULTI, VIP_ONE, VIP_TWO, LB_IP)],
        drop_cidrs=[(ip(SERVICE_CIDR[0]), SERVICE_CIDR[1]), (ip(LB_CIDR[0]), LB_CIDR[1])],
        node_addrs=[ip(NODE)],
    )


# --- packet builders ---------------------------------------------------------------

def tcp(flags="S", src=CLIENT, dst=VIP, sport=40001, dport=80, seq=1000, ack=0,
        load=b"", **ipkw):
    p = IP(src=src, dst=dst, **ipkw) / TCP(sport=sport, dport=dport, flags=flags,
                                           seq=seq, ack=ack, window=64240)
    return p / Raw(load) if load else p


def udp(src=CLIENT, dst=VIP, sport=40001, dport=53, load=b"query", chksum=None, **ipkw):
    u = UDP(sport=sport, dport=dport)
    if chksum is not None:
        u.chksum = chksum
    return IP(src=src, dst=dst, **ipkw) / u / Raw(load)


def reply_to(name, flags="A", load=b"", chksum=None):
    """The backend's answer to the forwarded packet saved as `name`: the same
    tuple reversed (backend:port -> masquerade:port)."""
    def build(ctx):
        o = ctx[name]
        l4 = o.payload
        if isinstance(l4, TCP):
            p = IP(src=o.dst, dst=o.src) / TCP(sport=l4.dport, dport=l4.sport,
                                                flags=flags, seq=5000, ack=1001)
        else:
            u = UDP(sport=l4.dport, dport=l4.sport)
            if chksum is not None:
                u.chksum = chksum
            p = IP(src=o.dst, dst=o.src) / u
        return p / Raw(load) if load else p
    return build


def icmp_error(name, type=3, code=3, src=None, dst=None, quote=None, edit=None, **icmpkw):
    """An ICMP error about the output saved as `name` (a packet we sent),
    quoting its first `quote` bytes (all of it by default), from `src` (the
    packet's destination by default) to `dst` (its source by default).
    edit(bytearray quote) may damage the quote."""
    def build(ctx):
        o = ctx[name + "_raw"]
        q = bytearray(o if quote is None else o[:quote])
        if edit:
            edit(q)
        po = IP(o)
        return (IP(src=src or po.dst, dst=dst or po.src)
                / ICMP(type=type, code=code, **icmpkw) / Raw(bytes(q)))
    return build


def echo(dst=VIP, src=CLIENT, id=7, seq=1, load=b"ping", **kw):
    """ICMP echo request; keyword arguments go to ICMP (type, code, ...)."""
    kw.setdefault("type", 8)
    return IP(src=src, dst=dst) / ICMP(id=id, seq=seq, **kw) / Raw(load)


def as_partial(pkt):
    """The packet as the kernel hands it over with VIRTIO_NET_HDR_F_NEEDS_CSUM:
    the L4 checksum field holds the pseudo-header sum."""
    b = bytearray(bytes(pkt))
    ihl = (b[0] & 15) * 4
    tot = struct.unpack_from("!H", b, 2)[0]
    off = ihl + (16 if b[9] == 6 else 6)
    p = IP(bytes(b))
    struct.pack_into("!H", b, off, pseudo_sum(ip(p.src), ip(p.dst), b[9], tot - ihl))
    return bytes(b)


def raw_edit(pkt, **at):
    """bytes(pkt) with single bytes overwritten: raw_edit(p, b0=0x44)."""
    b = bytearray(bytes(pkt))
    for k, v in at.items():
        b[int(k[1:])] = v
    return bytes(b)


# --- checks ----------------------------------------------------------------------------

def _field(p, name):
    l4 = p.payload
    if name in ("src", "dst", "ttl", "ihl", "len", "proto", "tos", "id", "options"):
        return getattr(p, name)
    if name == "flags":
        return str(l4.flags)
    if name == "load":
        return bytes(l4.payload)
    if name.startswith("l4_"):          # an L4 field named like an IP one: l4_id
        return getattr(l4, name[3:])
    return getattr(l4, name)


def fields(**want):
    """Check output fields. An expected value may be a constant, a container
    (range, set, list: membership) or a function of the context."""
    def check(out, ctx):
        for name, exp in want.items():
            if callable(exp):
                exp = exp(ctx)
            got = _field(out, name)
            if isinstance(exp, (range, set, frozenset, list, tuple)):
                assert got in exp, f"{name}: {got!r} not in {exp!r}"
            else:
                assert got == exp, f"{name}: {got!r} != {exp!r}"
    return check


def same(name, field_name):
    """Expected value: a field of the output saved as `name`."""
    return lambda ctx: _field(ctx[name], field_name)


def icmp_unreachable(quote_len=None):
    """Port unreachable from the original destination to its source, quoting
    the original datagram (its first 548 bytes at most)."""
    def check(out, ctx):
        orig = ctx["in_raw"]
        q = quote_len if quote_len is not None else min(len(orig), 548)
        assert out.version == 4 and out.ihl == 5 and out.tos == 0xc0
        assert out.id == 0 and out.frag == 0 and out.flags == 0 and out.ttl == 64
        assert out.proto == 1 and out.len == 28 + q
        assert out.src == ctx["in"].dst and out.dst == ctx["in"].src
        ic = out[ICMP]
        assert (ic.type, ic.code) == (3, 3)
        assert ctx["out_raw"][28:] == orig[:q], "quote is not the original datagram"
    return check


def verify_inner(raw):
    """An ICMP error's quote: its IP header checksum is valid, and so is its
    L4 checksum when the whole datagram is quoted (a UDP 0 excepted)."""
    q = raw[28:]
    ihl = (q[0] & 15) * 4
    assert csum(q[:ihl]) == 0, "inner IP header checksum"
    tot = struct.unpack_from("!H", q, 2)[0]
    if tot == len(q) and q[9] in (6, 17):
        l4 = q[ihl:tot]
        if q[9] == 17 and struct.unpack_from("!H", l4, 6)[0] == 0:
            return
        pseudo = q[12:20] + struct.pack("!BBH", 0, q[9], len(l4))
        assert csum(pseudo + l4) == 0, "inner L4 checksum"


def verify_partial(raw):
    """A CHECKSUM_PARTIAL output: valid IP header checksum, and the L4 field
    holds the pseudo-header sum of the rewritten addresses."""
    p = IP(raw)
    ihl = p.ihl * 4
    assert csum(raw[:ihl]) == 0, "IP header checksum"
    off = ihl + (16 if p.proto == 6 else 6)
    got = struct.unpack_from("!H", raw, off)[0]
    want = pseudo_sum(ip(p.src), ip(p.dst), p.proto, p.len - ihl)
    assert got == want, f"partial L4 field {got:#06x}, want pseudo-header sum {want:#06x}"


def verify_checksums(raw):
    """Re-parse with scapy, delete the checksums, rebuild: scapy's checksums
    must equal ours, and nothing else may change. An ICMP error's quote must
    carry valid checksums too (verify_inner)."""
    p = IP(raw)
    assert p.len == len(raw), "IP total length does not match the output length"
    q = IP(raw)
    del q.chksum
    l4 = q.payload
    keep_zero = isinstance(l4, UDP) and l4.chksum == 0     # UDP: 0 means none
    if isinstance(l4, (TCP, UDP, ICMP)) and not keep_zero:
        del l4.chksum
    rebuilt = bytes(q)
    r = IP(rebuilt)
    assert p.chksum == r.chksum, f"IP checksum {p.chksum:#06x}, want {r.chksum:#06x}"
    if isinstance(l4, (TCP, UDP, ICMP)):
        got, want = p.payload.chksum, r.payload.chksum
        assert got == want, f"{l4.name} checksum {got:#06x}, want {want:#06x}"
    assert rebuilt == raw, "rebuilding with scapy changed more than the checksums"
    if isinstance(l4, ICMP) and l4.type in (3, 11, 12) and len(raw) >= 48 \
            and len(raw) >= 28 + (raw[28] & 15) * 4:
        verify_inner(raw)


# --- fixtures ------------------------------------------------------------------------

@dataclass
class Step:
    pkt: Any = None                 # scapy packet, bytes, or f(ctx) -> either
    verdict: str = "forward"
    reason: str = "none"
    now: float = T0
    check: Optional[Callable] = None    # check(out: scapy IP, ctx)
    state: Optional[str] = None     # conntrack state of this packet's flow afterwards ("gone": none)
    save: Optional[str] = None      # ctx[save] = the output, parsed
    action: Optional[Callable] = None   # action(dp, ctx) in place of a packet
    after: Optional[Callable] = None    # after(dp, ctx): checks on the dataplane
    partial: bool = False           # process(..., partial=True): CHECKSUM_PARTIAL input


def drop(pkt, reason, **kw):
    return Step(pkt, verdict="drop", reason=reason, **kw)


def reject(pkt, **kw):
    kw.setdefault("check", icmp_unreachable())
    return Step(pkt, verdict="reply", **kw)


@dataclass
class Fixture:
    id: str
    desc: str
    steps: list
    tables: Callable = default_tables
    dataplane: dict = field(default_factory=dict)   # more Dataplane(...) arguments


def counters_are(**want):
    def after(dp, ctx):
        c = dp.counters()
        for k, v in want.items():
            got = c["drops_by_reason"][k] if k in c["drops_by_reason"] else c[k]
            assert got == v, f"counter {k}: {got} != {v}"
    return after


def flow_count(n, now=T0):
    def after(dp, ctx):
        got = len(dp.flows(now))
        assert got == n, f"{got} live flows, want {n}"
    return after


FWD_TO_BACKEND = fields(src=MASQ, dst=BACKENDS, sport=DEFAULT_PORTS, dport=8080)


def handshake(sport=40001, dst=VIP, dport=80, src=CLIENT, name="syn", now=T0):
    """SYN, SYN-ACK, ACK: three steps leaving an ESTABLISHED flow."""
    return [
        Step(tcp("S", src=src, dst=dst, sport=sport, dport=dport), now=now,
             save=name, state="SYN_SENT"),
        Step(reply_to(name, "SA"), now=now, state="SYN_RECV"),
        Step(tcp("A", src=src, dst=dst, sport=sport, dport=dport, seq=1001, ack=5001),
             now=now, state="ESTABLISHED"),
    ]


def _swap_remove_backends(dp, ctx):
    """The control plane swaps in tables where web:http has no endpoint left."""
    kw = default_tables()
    for s in kw["services"]:
        if s["name"] == "default/web:http":
            s["backends"] = []
    dp.swap(ctx["mod"].Tables(**kw))


def _delete_udp_to_first_backend(dp, ctx):
    assert dp.delete_flows(17, ip(BACKENDS[0]), 9999) == 0     # wrong port: nothing
    assert dp.delete_flows(6, ip(BACKENDS[2])) == 0            # no such flow
    assert dp.delete_flows(17, ip(BACKENDS[0]), 5353) == 1
    flows = dp.flows(T0)
    assert len(flows) == 2
    assert {(f["proto"], f["reply"][0]) for f in flows} == {
        (6, ip(BACKENDS[0])), (17, ip(BACKENDS[1]))}


def _unique_reply_tuples(dp, ctx):
    replies = [f["reply"] for f in dp.flows(T0)]
    assert len(replies) == 4 and len(set(replies)) == 4
    assert sorted(r[3] for r in replies) == [40000, 40001, 40002, 40003]


def _expire(now, want):
    def action(dp, ctx):
        got = dp.expire(now)
        assert got == want, f"expire({now}) removed {got}, want {want}"
        return got
    return action


def quotes(name):
    """Check: an ICMP error's quote is what the sender of the packet saved as
    `name` sent (its first bytes), every NAT change undone."""
    def check(out, ctx):
        o, orig = ctx["out_raw"], ctx[name + "_in"]
        q = len(o) - 28
        assert q <= len(orig) and o[28:] == orig[:q], \
            f"quote {o[28:].hex()} is not the sender's datagram {orig[:q].hex()}"
    return check


def checks(*fns):
    def check(out, ctx):
        for f in fns:
            f(out, ctx)
    return check


def service_counters_are(want):
    """after: service_counters of the given ids equal want ({id: {name: n}},
    names left out must be 0)."""
    def after(dp, ctx):
        got = dp.service_counters(sorted(want))
        for i, w in want.items():
            exp = {k: w.get(k, 0) for k in ("packets", "bytes", "flows", "rejects", "denied")}
            assert got[i] == exp, f"service {i}: {got[i]} != {exp}"
    return after


def sched_tables(scheduler, affinity=0, n=3, ids=False):
    """One VIP (TCP 80 -> :8080, UDP 53 -> :5353 on the first n BACKENDS)
    with the given scheduler and session affinity timeout. ids: stable
    service ids 7 (TCP) and 9 (UDP), backend ids 100+ / 200+."""
    def tables():
        def backends(port, base):
            return [(ip(b), port, base + i) if ids else (ip(b), port)
                    for i, b in enumerate(BACKENDS[:n])]
        extra = {"affinity_timeout": affinity} if affinity else {}
        t = svc("s:http", VIP, 80, 6, [], scheduler=scheduler, **extra)
        u = svc("s:dns", VIP, 53, 17, [], scheduler=scheduler, **extra)
        t["backends"], u["backends"] = backends(8080, 100), backends(5353, 200)
        if ids:
            t["id"], u["id"] = 7, 9
        return dict(services=[t, u], vips=[ip(VIP)],
                    drop_cidrs=[(ip(SERVICE_CIDR[0]), SERVICE_CIDR[1])])
    return tables


def _swap_without(name):
    """action: tables of the same shape without the backend the output saved
    as `name` went to."""
    def action(dp, ctx):
        kw = ctx["tables"]()
        gone = ip(ctx[name].dst)
        for s in kw["services"]:
            s["backends"] = [b for b in s["backends"] if b[0] != gone]
        dp.swap(ctx["mod"].Tables(**kw))
    return action


def _delete_to(name, proto):
    def action(dp, ctx):
        return dp.delete_flows(proto, ip(ctx[name].dst))
    return action


def _spread_within_one(dp, ctx):
    counts = [dp.active_flows(b) for b in range(3, 6)]      # s:dns's backends
    assert max(counts) - min(counts) <= 1, f"lc spread {counts}"


FIXTURES = [
    # --- TCP through a ClusterIP -------------------------------------------------
    Fixture("tcp_syn_dnat_snat", "SYN to a VIP is DNATed to a backend and SNATed to the masquerade IP", [
        Step(tcp("S", load=b""), check=fields(src=MASQ, dst=BACKENDS, sport=DEFAULT_PORTS,
                                             dport=8080, flags="S", seq=1000, ttl=64),
             state="SYN_SENT", after=counters_are(flows_created=1, flows=1)),
    ]),
    Fixture("tcp_synack_unnat", "the backend's SYN-ACK to masq:port is un-NATed to VIP:80 -> client:40001", [
        Step(tcp("S"), save="syn"),
        Step(reply_to("syn", "SA"), check=fields(src=VIP, sport=80, dst=CLIENT, dport=40001,
                                                 flags="SA", seq=5000, ack=1001),
             state="SYN_RECV"),
    ]),
    Fixture("tcp_lifecycle", "handshake, data both ways, FIN from the client first, then TIME_WAIT", [
        *handshake(),
        Step(tcp("PA", seq=1001, ack=5001, load=b"GET / HTTP/1.1\r\n\r\n"),
             check=fields(src=MASQ, dst=same("syn", "dst"), sport=same("syn", "sport"),
                          dport=8080, load=b"GET / HTTP/1.1\r\n\r\n", flags="PA"),
             state="ESTABLISHED"),
        Step(reply_to("syn", "PA", load=b"HTTP/1.1 200 OK\r\n\r\n"),
             check=fields(src=VIP, sport=80, dst=CLIENT, dport=40001,
                          load=b"HTTP/1.1 200 OK\r\n\r\n"), state="ESTABLISHED"),
        Step(tcp("FA", seq=1019, ack=5020), state="FIN_WAIT", check=fields(flags="FA")),
        Step(reply_to("syn", "A"), state="FIN_WAIT"),
        Step(reply_to("syn", "FA"), state="TIME_WAIT"),
        Step(tcp("A", seq=1020, ack=5021), state="TIME_WAIT",
             after=lambda dp, ctx: _assert([f["timeout"] for f in dp.flows(T0)] == [120],
                                           "TIME_WAIT timeout is not 120 s")),
    ]),
    Fixture("tcp_close_wait", "FIN from the backend first: CLOSE_WAIT, then TIME_WAIT", [
        *handshake(),
        Step(reply_to("syn", "FA"), state="CLOSE_WAIT"),
        Step(tcp("FA", seq=1001, ack=5001), state="TIME_WAIT"),
    ]),
    Fixture("tcp_time_wait_reuse", "a new SYN on a tuple in TIME_WAIT opens a new connection", [
        *handshake(),
        Step(tcp("FA", seq=1001, ack=5001), state="FIN_WAIT"),
        Step(reply_to("syn", "FA"), state="TIME_WAIT"),
        Step(tcp("A", seq=1002, ack=5002), state="TIME_WAIT"),
        Step(tcp("S", seq=9000), now=T0 + 5, state="SYN_SENT", check=FWD_TO_BACKEND,
             after=lambda dp, ctx: (counters_are(flows_created=2, flows=1)(dp, ctx),
                                    flow_count(1, T0 + 5)(dp, ctx))),
    ]),
    Fixture("tcp_rst", "RST from the client closes the flow; a SYN on the tuple then reuses it", [
        Step(tcp("S"), save="syn"),
        Step(reply_to("syn", "SA"), state="SYN_RECV"),
        Step(tcp("R", seq=1001), state="CLOSE", check=fields(flags="R", dst=BACKENDS)),
        Step(tcp("A", seq=1001, ack=5001), state="CLOSE"),
        Step(tcp("S", seq=7000), now=T0 + 1, state="SYN_SENT",
             after=counters_are(flows_created=2, flows=1)),
    ]),
    Fixture("tcp_rst_from_backend", "a backend refusing with RST-ACK reaches the client as VIP:80", [
        Step(tcp("S"), save="syn"),
        Step(reply_to("syn", "RA"), state="CLOSE",
             check=fields(src=VIP, sport=80, dst=CLIENT, dport=40001, flags="RA")),
    ]),
    Fixture("tcp_not_syn", "a TCP packet other than a SYN without a flow is dropped", [
        drop(tcp("A", seq=1001, ack=1), "not_syn"),
        drop(tcp("SA"), "not_syn"),
        drop(tcp("FA"), "not_syn"),
        drop(tcp("R"), "not_syn"),
        drop(tcp("SR"), "not_syn", after=counters_are(not_syn=5, drops=5, flows=0)),
    ]),
    Fixture("tcp_ip_options", "IP options (IHL 6+) are kept and the L4 header found after them", [
        Step(tcp("S", options=[IPOption_Router_Alert()]), save="syn", state="SYN_SENT",
             check=lambda out, ctx: (FWD_TO_BACKEND(out, ctx), fields(ihl=6, flags="S")(out, ctx),
                                     _assert(bytes(out)[20:24] == bytes(ctx["in"])[20:24],
                                             "options changed"))),
        Step(tcp("PA", seq=1001, load=b"x" * 33,
                 options=[IPOption_NOP(), IPOption_NOP(), IPOption_Router_Alert(),
                          IPOption_Router_Alert()]),
             check=fields(ihl=8, dst=same("syn", "dst"), sport=same("syn", "sport"),
                          dport=8080, load=b"x" * 33)),
        Step(reply_to("syn", "SA"), check=fields(src=VIP, dst=CLIENT, sport=80, dport=40001)),
    ]),
    Fixture("tcp_padding", "link padding after the IP total length is not forwarded", [
        Step(bytes(tcp("S")) + b"\0" * 6, check=lambda out, ctx: _assert(out.len == 40, "length")),
    ]),

    # --- UDP -----------------------------------------------------------------------
    Fixture("udp_forward_reply", "UDP to VIP:53 goes to backend:5353; the answer comes back from VIP:53", [
        Step(udp(), save="q", state="UNREPLIED",
             check=fields(src=MASQ, dst=BACKENDS, sport=DEFAULT_PORTS, dport=5353, load=b"query")),
        Step(reply_to("q", load=b"answer"), state="ASSURED",
             check=fields(src=VIP, sport=53, dst=CLIENT, dport=40001, load=b"answer")),
        Step(udp(load=b"second"), state="ASSURED",
             check=fields(dst=same("q", "dst"), sport=same("q", "sport"))),
    ]),
    Fixture("udp_zero_checksum", "a UDP checksum of 0 (none) stays 0 in both directions", [
        Step(udp(chksum=0), save="q", check=fields(chksum=0, dport=5353, src=MASQ)),
        Step(reply_to("q", load=b"answer", chksum=0), check=fields(chksum=0, src=VIP, sport=53)),
        Step(udp(chksum=0, sport=40002), check=fields(chksum=0)),
    ]),

    # --- reject: ICMP port unreachable ------------------------------------------------
    Fixture("no_endpoints_tcp", "a service with zero backends answers port unreachable", [
        reject(tcp("S", dst=VIP_NOEP)),
        reject(tcp("S", dst=VIP_NOEP, options=[IPOption_Router_Alert()])),
        reject(tcp("A", dst=VIP_NOEP), after=counters_are(rejects=3, drops=0, flows=0)),
    ]),
    Fixture("no_endpoints_udp", "zero-backend UDP service: the quote stops at 548 bytes", [
        reject(udp(dst=VIP_NOEP, load=b"q" * 20)),
        reject(udp(dst=VIP_NOEP, load=bytes(range(256)) * 4), check=icmp_unreachable(548)),
        reject(udp(dst=VIP_NOEP, load=b"z" * 520)),          # 548 exactly
        reject(udp(dst=VIP_NOEP, load=b"z" * 521), check=icmp_unreachable(548)),
    ]),
    Fixture("vip_unserved_port", "a live VIP on a port it does not serve answers port unreachable", [
        reject(tcp("S", dst=VIP, dport=81)),
        reject(udp(dst=VIP, dport=80)),                      # TCP 80 only
        reject(tcp("S", dst=VIP_MULTI, dport=8080)),
    ]),

    # --- drops by address ----------------------------------------------------------------
    Fixture("unallocated", "an unallocated address in the service CIDR is dropped", [
        drop(tcp("S", dst=UNALLOCATED), "unallocated"),
        drop(udp(dst="172.18.255.99"), "unallocated"),
    ]),
    Fixture("spoofed", "a packet to the masquerade address with no flow is dropped", [
        drop(tcp("SA", src=BACKENDS[0], sport=8080, dst=MASQ, dport=40000), "spoofed"),
        drop(udp(src=BACKENDS[0], sport=5353, dst=MASQ, dport=40000), "spoofed"),
    ]),
    Fixture("no_service", "an address outside everything is dropped", [
        drop(tcp("S", dst=OUTSIDE), "no_service"),
        drop(udp(dst=OUTSIDE), "no_service"),
        drop(tcp("S", dst=NOT_NODE, dport=30080), "no_service"),
        drop(tcp("S", dst="0.0.0.0", dport=30080), "no_service"),
    ]),

    # --- parse errors ----------------------------------------------------------------------
    Fixture("malformed", "every length is checked", [
        drop(b"", "malformed"),
        drop(bytes(tcp("S"))[:19], "malformed"),                         # truncated IP header
        drop(raw_edit(tcp("S"), b0=0x44), "malformed"),                  # IHL 4
        drop(raw_edit(tcp("S"), b0=0x4f), "malformed"),                  # IHL 15 > total length
        drop(bytes(tcp("S", len=41)), "malformed"),                      # total length > buffer
        drop(bytes(tcp("S", len=19)), "malformed"),                      # total length < IHL
        drop(bytes(IP(dst=VIP, proto=6) / Raw(b"\0" * 19)), "malformed"),   # truncated TCP
        drop(bytes(tcp("S", len=39)), "malformed"),                      # TCP cut by total length
        drop(raw_edit(tcp("S"), b32=0x40), "malformed"),                 # data offset 4
        drop(raw_edit(tcp("S", load=b"abc"), b32=0x60), "malformed"),    # data offset 6 > 23 bytes
        drop(bytes(IP(dst=VIP, proto=17) / Raw(b"\0" * 7)), "malformed"),   # truncated UDP
        drop(raw_edit(udp(load=b"abc"), b24=0, b25=7), "malformed"),     # UDP length 7
        drop(raw_edit(udp(load=b"abc"), b24=0, b25=12), "malformed"),    # UDP length > payload
        drop(raw_edit(udp(load=b"abc"), b24=0xff, b25=0xff), "malformed"),
        Step(None, action=lambda dp, ctx: None, after=counters_are(malformed=14, drops=14, flows=0)),
    ]),
    Fixture("fragment", "fragments are dropped", [
        drop(IP(dst=VIP, flags="MF") / TCP(dport=80, flags="S"), "fragment"),
        drop(udp(frag=10), "fragment"),
        drop(udp(flags="MF", frag=1), "fragment"),
        Step(udp(flags="DF"), check=fields(dport=5353)),                # DF is not a fragment
    ]),
    Fixture("unsupported", "IPv6, ICMP other than echo and errors, and other protocols are not ours", [
        drop(IPv6(dst="fd00::1") / TCP(dport=80, flags="S"), "unsupported"),
        drop(IPv6(dst="fd00::1") / UDP(dport=53), "unsupported"),
        drop(IP(dst=VIP) / ICMP(type=13, ts_ori=1, ts_rx=2, ts_tx=3), "unsupported"),                 # timestamp
        drop(IP(dst=VIP, proto=47) / Raw(b"\0" * 8), "unsupported"),
        drop(IP(dst=VIP, proto=132) / Raw(b"\0" * 16), "unsupported"),
        drop(raw_edit(tcp("S"), b0=0x55), "unsupported"),                # version 5
    ]),

    # --- service shapes --------------------------------------------------------------------
    Fixture("multi_port", "two named ports on one VIP map to their own target ports", [
        Step(tcp("S", dst=VIP_MULTI, dport=80), save="http",
             check=fields(src=MASQ, dst=MULTI_POD, dport=8080)),
        Step(tcp("S", dst=VIP_MULTI, dport=443, sport=40002), save="https",
             check=fields(src=MASQ, dst=MULTI_POD, dport=8443)),
        Step(reply_to("https", "SA"), check=fields(src=VIP_MULTI, sport=443, dport=40002)),
        Step(reply_to("http", "SA"), check=fields(src=VIP_MULTI, sport=80, dport=40001)),
        Step(None, action=lambda dp, ctx: None,
             after=lambda dp, ctx: _assert(
                 sorted(dp.current_tables.names[f["svc"]] for f in dp.flows(T0))
                 == ["default/multi:http", "default/multi:https"], "svc index")),
    ]),
    Fixture("source_ranges", "loadBalancerSourceRanges: sources inside pass, others are dropped", [
        Step(tcp("S", dst=LB_IP), save="syn", check=FWD_TO_BACKEND),
        Step(reply_to("syn", "SA"), check=fields(src=LB_IP, sport=80, dst=CLIENT)),
        drop(tcp("S", src=FAR_CLIENT, dst=LB_IP), "source_denied"),
        drop(tcp("S", src="10.0.1.1", dst=LB_IP), "source_denied",
             after=counters_are(source_denied=2, flows=1)),
    ]),
    Fixture("node_port", "a node-port key (vip 0) matches on node addresses only; other node ports are refused", [
        Step(tcp("S", dst=NODE, dport=30080), save="syn", check=FWD_TO_BACKEND),
        Step(reply_to("syn", "SA"), check=fields(src=NODE, sport=30080, dst=CLIENT, dport=40001)),
        drop(tcp("S", dst=NOT_NODE, dport=30080), "no_service"),
        drop(tcp("S", dst="0.0.0.0", dport=30080), "no_service"),
        # a node address on a port no service has: refused, as the kernel would
        reject(tcp("S", dst=NODE, dport=30081)),
        reject(udp(dst=NODE, dport=30080)),
    ]),
    Fixture("hairpin", "a backend that is its own client reaches itself through the masquerade IP", [
        Step(tcp("S", src=BACKENDS[0], dst=VIP_ONE, sport=45000), save="syn",
             check=fields(src=MASQ, dst=BACKENDS[0], dport=8080)),
        Step(reply_to("syn", "SA"), state="SYN_RECV",
             check=fields(src=VIP_ONE, sport=80, dst=BACKENDS[0], dport=45000)),
        Step(tcp("A", src=BACKENDS[0], dst=VIP_ONE, sport=45000, seq=1001), state="ESTABLISHED"),
        Step(udp(src=BACKENDS[1], dst=VIP, sport=45001), save="q",
             check=fields(src=MASQ, dst=BACKENDS, dport=5353)),
        Step(reply_to("q", load=b"a"), check=fields(src=VIP, sport=53, dst=BACKENDS[1], dport=45001)),
    ]),
    Fixture("swap_keeps_flows", "swapping in tables without endpoints keeps the flow, rejects new ones", [
        *handshake(),
        Step(None, action=_swap_remove_backends),
        Step(tcp("PA", seq=1001, load=b"more"), state="ESTABLISHED",
             check=fields(dst=same("syn", "dst"), sport=same("syn", "sport"))),
        Step(reply_to("syn", "A"), check=fields(src=VIP, dst=CLIENT)),
        reject(tcp("S", sport=40002)),
    ]),

    # --- conntrack: time -------------------------------------------------------------------
    Fixture("expiry_tcp", "a flow looked up after its timeout is treated as new", [
        Step(tcp("S"), save="syn"),
        Step(reply_to("syn", "SA"), now=T0 + 59, state="SYN_RECV"),     # SYN_RECV: 60 s
        drop(tcp("A", seq=1001), "not_syn", now=T0 + 59 + 60,
             after=counters_are(flows_expired=1, flows=0)),
        Step(tcp("S"), now=T0 + 200, state="SYN_SENT"),
    ]),
    Fixture("expiry_udp", "UDP flows expire after 30 s unreplied; a late reply is spoofed", [
        Step(udp(), save="q"),
        Step(udp(load=b"again"), now=T0 + 29, check=fields(sport=same("q", "sport"))),
        drop(reply_to("q"), "spoofed", now=T0 + 29 + 30, after=counters_are(flows_expired=1)),
        Step(udp(), now=T0 + 60, state="UNREPLIED",
             after=counters_are(flows_created=2, flows=1)),
    ]),
    Fixture("custom_timeouts", "set_timeouts changes the timeouts; expire() sweeps", [
        Step(None, action=lambda dp, ctx: dp.set_timeouts({"UNREPLIED": 5, "ASSURED": 7})),
        Step(udp(sport=1), state="UNREPLIED"),
        Step(udp(sport=2), save="q2"),
        Step(udp(sport=3)),
        Step(reply_to("q2"), now=T0 + 1, state="ASSURED",
             after=lambda dp, ctx: _assert(sorted(f["timeout"] for f in dp.flows(T0 + 1))
                                           == [4, 4, 7], "timeouts")),
        Step(None, action=_expire(T0 + 4, 0)),
        Step(None, action=_expire(T0 + 5, 2)),
        Step(None, action=_expire(T0 + 8, 1),
             after=counters_are(flows_expired=3, flows=0)),
    ]),

    # --- conntrack: limits -----------------------------------------------------------------
    Fixture("table_full_evicts", "with the table full an unestablished flow makes room", [
        *handshake(sport=40001),
        Step(tcp("S", sport=40002), state="SYN_SENT"),
        Step(tcp("S", sport=40003), state="SYN_SENT",
             after=counters_are(flows_evicted=1, flows=2)),
        drop(tcp("A", sport=40002, seq=1001), "not_syn"),                 # the evicted one
        Step(tcp("A", sport=40001, seq=1001), state="ESTABLISHED"),       # the established one stays
    ], dataplane={"max_flows": 2}),
    Fixture("table_full_evicts_expired", "an expired flow goes before an unestablished one", [
        Step(tcp("S", sport=40001), save="syn"),                        # id 0: unestablished
        *handshake(sport=40002, name="syn2"),                          # id 1: established
        Step(udp(sport=40003)),                                         # id 2: expires at T0+30
        Step(tcp("S", sport=40004), now=T0 + 31, after=counters_are(flows_evicted=1, flows=3)),
        Step(reply_to("syn", "SA"), now=T0 + 31, state="SYN_RECV"),    # id 0 survived
    ], dataplane={"max_flows": 3}),
    Fixture("table_full_drop", "with every flow established a new flow is dropped", [
        *handshake(sport=40001),
        *handshake(sport=40002, name="syn2"),
        drop(tcp("S", sport=40003), "table_full",
             after=counters_are(table_full=1, flows_evicted=0, flows=2)),
        Step(tcp("A", sport=40002, seq=1001), state="ESTABLISHED"),
    ], dataplane={"max_flows": 2}),
    Fixture("nat_exhausted", "4 SNAT ports held by established flows: the 5th flow finds no free reply tuple", [
        *[st for i in range(4) for st in handshake(sport=50000 + i, dst=VIP_ONE, name=f"syn{i}")],
        drop(tcp("S", dst=VIP_ONE, sport=50004), "nat_exhausted", after=_unique_reply_tuples),
        Step(udp(dst=VIP_ONE, sport=50004), check=fields(sport=range(40000, 40004))),  # UDP: own space
    ], dataplane={"port_range": (40000, 40003)}),
    Fixture("nat_reclaims_half_open", "4 SNAT ports held by half-open flows (a SYN flood): "
            "a new flow evicts one and takes its port", [
        *[Step(tcp("S", dst=VIP_ONE, sport=50000 + i), check=fields(src=MASQ, sport=range(40000, 40004)))
          for i in range(4)],
        Step(tcp("S", dst=VIP_ONE, sport=50004), save="syn", check=fields(sport=range(40000, 40004)),
             after=counters_are(flows_evicted=1, nat_exhausted=0, flows=4)),
        Step(reply_to("syn", "SA"), check=fields(src=VIP_ONE, dport=50004), state="SYN_RECV"),
    ], dataplane={"port_range": (40000, 40003)}),
    Fixture("nat_reclaims_expired", "a port held by an expired flow is reclaimed at allocation time", [
        *[st for i in range(4) for st in handshake(sport=50000 + i, dst=VIP_ONE, name=f"syn{i}")],
        Step(tcp("S", dst=VIP_ONE, sport=50004), now=T0 + 86401, check=fields(sport=range(40000, 40004)),
             after=counters_are(flows_expired=1, flows_evicted=0, flows=4)),
    ], dataplane={"port_range": (40000, 40003)}),
    Fixture("overload_admits_known_sources", "while the engine is behind, new flows from sources that "
            "completed a handshake go on; others get admit_rate a second", [
        *handshake(sport=40001),                                           # CLIENT is known now
        Step(None, action=lambda dp, ctx: setattr(dp, "overloaded", True)),
        Step(tcp("S", src="10.9.0.1", sport=1111)),                        # admit_rate = 2 a second
        Step(udp(src="10.9.0.2", sport=1112)),
        drop(tcp("S", src="10.9.0.3", sport=1113), "overload"),
        drop(udp(src="10.9.0.3", sport=1113), "overload"),
        Step(tcp("S", sport=40002), state="SYN_SENT"),                     # known: always
        Step(tcp("S", src="10.9.0.3", sport=1113), now=T0 + 1),            # a new second
        Step(None, action=lambda dp, ctx: setattr(dp, "overloaded", False)),
        Step(tcp("S", src="10.9.0.4", sport=1114), now=T0 + 1),            # not behind: all go on
        Step(tcp("S", src="10.9.0.5", sport=1115), now=T0 + 1),
        Step(None, action=lambda dp, ctx: setattr(dp, "overloaded", True)),
        Step(tcp("S", src="10.9.0.6", sport=1116), now=T0 + 1),            # the second's last
        drop(tcp("S", src="10.9.0.7", sport=1117), "overload", now=T0 + 1),
        Step(tcp("S", src="10.9.0.8", sport=1118), now=T0 + 200),
        Step(tcp("S", src="10.9.0.9", sport=1119), now=T0 + 200),
        Step(tcp("S", sport=40003), now=T0 + 200),                         # known 120-240 s ...
        Step(tcp("S", src="10.9.0.10", sport=1120), now=T0 + 481),
        Step(tcp("S", src="10.9.0.11", sport=1121), now=T0 + 481),
        drop(tcp("S", sport=40004), "overload", now=T0 + 481),             # ... then forgotten
    ], dataplane={"admit_rate": 2}),
    Fixture("snat_keeps_client_port", "the masquerade port is the client's when that reply tuple is "
            "free (as the kernel's plain masquerade); else another", [
        Step(tcp("S", dst=VIP_ONE, sport=40001), check=fields(src=MASQ, sport=40001)),
        Step(tcp("S", src="10.1.0.9", dst=VIP_ONE, sport=40001),
             check=fields(src=MASQ, sport=lambda ctx: set(DEFAULT_PORTS) - {40001})),
        Step(udp(dst=VIP_ONE, sport=40001), check=fields(src=MASQ, sport=40001)),
    ]),
    Fixture("snat_keeps_reopened_port", "a client that reopens its tuple keeps the old flow's masquerade "
            "port (the backend accepts a successor on its TIME_WAIT tuple)", [
        Step(tcp("S", src="10.1.0.9", dst=VIP_ONE, sport=45000), save="other"),        # holds 45000
        Step(tcp("S", dst=VIP_ONE, sport=45000), save="syn"),                            # another port
        Step(reply_to("syn", "SA")),
        Step(tcp("A", dst=VIP_ONE, sport=45000, seq=1001), state="ESTABLISHED"),
        Step(tcp("R", dst=VIP_ONE, sport=45000, seq=1001), state="CLOSE"),
        Step(tcp("S", dst=VIP_ONE, sport=45000, seq=9000), state="SYN_SENT",
             check=fields(sport=same("syn", "sport"))),
    ]),

    # --- control plane views ---------------------------------------------------------------
    Fixture("delete_flows", "delete_flows removes only flows from the given backend (and port)", [
        Step(udp(dst=VIP_ONE), save="q1"),
        Step(udp(dst=VIP_TWO, sport=40002), save="q2"),
        Step(tcp("S", dst=VIP_ONE, sport=40003)),
        Step(None, action=_delete_udp_to_first_backend),
        drop(reply_to("q1"), "spoofed"),
        Step(reply_to("q2"), check=fields(src=VIP_TWO, sport=53)),
    ]),
    Fixture("counters", "counters reflect packets, flows and drops by reason", [
        Step(tcp("S")),
        drop(tcp("A", sport=2), "not_syn"),
        drop(tcp("S", dst=OUTSIDE), "no_service"),
        drop(tcp("S", dst=OUTSIDE), "no_service"),
        drop(bytes(tcp("S"))[:10], "malformed"),
        drop(udp(frag=3), "fragment"),
        reject(udp(dst=VIP_NOEP)),
        Step(None, action=lambda dp, ctx: None, after=lambda dp, ctx: _assert(
            dp.counters()["drops_by_reason"] == {
                "malformed": 1, "unsupported": 0, "fragment": 1, "no_service": 2,
                "unallocated": 0, "not_syn": 1, "table_full": 0, "nat_exhausted": 0,
                "spoofed": 0, "source_denied": 0, "martian": 0, "icmp_rate": 0, "overload": 0}
            and {k: dp.counters()[k] for k in ("rx_packets", "drops", "rejects", "flows_created",
                                                "flows", "tx_packets")}
            == {"rx_packets": 7, "drops": 5, "rejects": 1, "flows_created": 1, "flows": 1,
                "tx_packets": 0}, f"counters {dp.counters()}")),
    ]),

    # --- ICMP: echo ------------------------------------------------------------------------
    Fixture("icmp_echo_vip", "an echo request to a live service address is answered from it", [
        Step(echo(id=7, seq=3, load=b"ping-payload"), verdict="reply",
             check=fields(src=VIP, dst=CLIENT, ttl=64, type=0, code=0, l4_id=7, seq=3,
                          load=b"ping-payload")),
        Step(echo(dst=VIP_NOEP, load=b""), verdict="reply", check=fields(src=VIP_NOEP, type=0)),
        Step(echo(dst=LB_IP, src=FAR_CLIENT, load=b"x" * 1001), verdict="reply",
             check=fields(src=LB_IP, dst=FAR_CLIENT, load=b"x" * 1001)),
        Step(IP(src=CLIENT, dst=VIP, ttl=3, options=[IPOption_Router_Alert()])
             / ICMP(type=8, id=1, seq=2) / Raw(b"opt"), verdict="reply",
             check=fields(src=VIP, ihl=6, ttl=64, type=0, load=b"opt")),
        Step(bytes(echo(load=b"pad")) + b"\0" * 5, verdict="reply",
             check=lambda out, ctx: _assert(out.len == 31 and len(ctx["out_raw"]) == 31, "length")),
        Step(None, action=lambda dp, ctx: None,
             after=counters_are(flows=0, rejects=0, drops=0, rx_packets=5)),
    ]),
    Fixture("icmp_echo_elsewhere", "an echo request to anything but a live VIP is dropped as unmatched", [
        drop(echo(dst=UNALLOCATED), "unallocated"),
        drop(echo(dst="172.18.255.99"), "unallocated"),
        drop(echo(dst=MASQ), "spoofed"),
        drop(echo(dst=OUTSIDE), "no_service"),
        drop(echo(dst=NODE), "no_service"),
        drop(echo(code=1), "unallocated"),                   # code must be 0
        drop(echo(type=0), "unsupported"),                   # an echo reply is not ours
        drop(echo(type=5), "unsupported"),                   # redirect
        drop(bytes(IP(src=CLIENT, dst=VIP, proto=1) / Raw(b"\x08\0\0\0\0\0\0")), "malformed"),
        drop(bytes(IP(src=CLIENT, dst=VIP, proto=1)), "malformed"),
        drop(IP(src=CLIENT, dst=VIP, flags="MF") / ICMP(type=8), "fragment"),
    ]),

    # --- ICMP: errors about tracked flows ---------------------------------------------------
    Fixture("icmp_port_unreachable_udp", "a backend's port unreachable reaches the client from the VIP, quote un-NATed", [
        Step(udp(load=b"query"), save="q"),
        Step(icmp_error("q"), save="err",
             check=checks(fields(src=VIP, dst=CLIENT, type=3, code=3), quotes("q"))),
        Step(icmp_error("q", quote=28), check=checks(fields(src=VIP, dst=CLIENT), quotes("q"))),
        Step(reply_to("q", load=b"late answer"), state="ASSURED",
             check=fields(src=VIP, sport=53, dst=CLIENT)),       # the flow is untouched
        Step(None, action=lambda dp, ctx: None,
             after=service_counters_are({1: {"packets": 4, "flows": 1,
                                             "bytes": 33 + 61 + 56 + 39}})),
    ]),
    Fixture("icmp_frag_needed_tcp", "frag needed from a router keeps the router as source and the MTU", [
        Step(tcp("S", load=b"hello"), save="syn"),
        Step(icmp_error("syn", code=4, src="10.244.9.1", quote=28, nexthopmtu=1400),
             check=checks(fields(src="10.244.9.1", dst=CLIENT, type=3, code=4, nexthopmtu=1400),
                          quotes("syn"))),
        Step(icmp_error("syn", code=4, src="10.244.9.1", quote=48, nexthopmtu=1400),
             check=checks(fields(src="10.244.9.1", dst=CLIENT), quotes("syn"))),
        Step(icmp_error("syn", code=4, src="10.244.9.1", nexthopmtu=1400),
             check=quotes("syn")),                           # the whole segment
        # half of the TCP checksum quoted: left as it is, the rest restored
        Step(icmp_error("syn", code=4, src="10.244.9.1", quote=37),
             check=lambda out, ctx: _assert(ctx["out_raw"][28:64] == ctx["syn_in"][:36], "quote")),
    ]),
    Fixture("icmp_time_exceeded_reply_direction", "an error about a reply goes to the backend, from the masquerade address", [
        Step(udp(load=b"q"), save="q"),
        Step(reply_to("q", load=b"answer"), save="a"),
        Step(icmp_error("a", type=11, code=0),
             check=checks(fields(src=MASQ, dst=same("q", "dst"), type=11), quotes("a"))),
        Step(icmp_error("a", type=11, code=0, src="10.0.0.254"),
             check=checks(fields(src="10.0.0.254", dst=same("q", "dst")), quotes("a"))),
    ]),
    Fixture("icmp_param_problem_tcp", "parameter problem and host unreachable about an established flow", [
        *handshake(),
        Step(tcp("PA", seq=1001, ack=5001, load=b"data"), save="d"),
        Step(icmp_error("d", type=12, code=0, ptr=20),
             check=checks(fields(src=VIP, dst=CLIENT, type=12, ptr=20), quotes("d"))),
        Step(icmp_error("d", type=3, code=1, quote=40), check=quotes("d")),
        Step(tcp("A", seq=1005, ack=5001), state="ESTABLISHED"),
    ]),
    Fixture("icmp_hairpin_and_nodeport", "errors about node-port and hairpin flows", [
        Step(tcp("S", dst=NODE, dport=30080), save="np"),
        Step(icmp_error("np"), check=checks(fields(src=NODE, dst=CLIENT), quotes("np"))),
        Step(udp(src=BACKENDS[1], dst=VIP_TWO, sport=45001), save="hp"),
        Step(icmp_error("hp"), check=checks(fields(src=VIP_TWO, dst=BACKENDS[1]), quotes("hp"))),
    ]),
    Fixture("icmp_udp_zero_checksum_quote", "a quoted UDP checksum of 0 stays 0", [
        Step(udp(chksum=0), save="q"),
        Step(icmp_error("q"), check=checks(quotes("q"), lambda out, ctx: _assert(
            ctx["out_raw"][48 + 6:48 + 8] == b"\0\0", "inner UDP checksum"))),
    ]),
    Fixture("icmp_error_no_flow", "an error about no tracked flow is dropped as unmatched", [
        drop(IP(src=BACKENDS[0], dst=MASQ) / ICMP(type=3, code=3)
             / IP(src=MASQ, dst=BACKENDS[0]) / UDP(sport=1111, dport=5353), "spoofed"),
        drop(IP(src="10.244.9.1", dst=OUTSIDE) / ICMP(type=11)
             / IP(src=OUTSIDE, dst=CLIENT) / TCP(sport=80, dport=40001), "no_service"),
        drop(IP(src="10.244.9.1", dst=UNALLOCATED) / ICMP(type=3, code=1)
             / IP(src=UNALLOCATED, dst=CLIENT) / TCP(sport=80, dport=40001), "unallocated"),
        Step(udp(), save="q"),
        Step(None, action=lambda dp, ctx: dp.delete_flows(17, ip(ctx["q"].dst))),
        drop(icmp_error("q"), "spoofed"),
    ]),
    Fixture("icmp_error_malformed", "quotes too short or not IPv4 TCP/UDP", [
        Step(udp(load=b"q" * 12), save="q"),
        *[drop(icmp_error("q", quote=cut), "malformed") for cut in (0, 8, 19, 27)],
        drop(icmp_error("q", edit=lambda b: b.__setitem__(0, 0x65)), "malformed"),    # version 6
        drop(icmp_error("q", edit=lambda b: b.__setitem__(0, 0x44)), "malformed"),    # IHL 4
        drop(icmp_error("q", quote=28, edit=lambda b: b.__setitem__(0, 0x46)), "malformed"),  # IHL 6: 24 + 8 > 28
        drop(icmp_error("q", edit=lambda b: b.__setitem__(9, 1)), "unsupported"),     # inner ICMP
        drop(icmp_error("q", edit=lambda b: b.__setitem__(9, 47)), "unsupported"),
        Step(icmp_error("q", quote=28), check=quotes("q"),
             after=counters_are(malformed=7, unsupported=2, flows=1)),
    ]),

    # --- CHECKSUM_PARTIAL (virtio-net NEEDS_CSUM) --------------------------------------------
    Fixture("partial_checksum", "partial mode adjusts the L4 pseudo-header sum for addresses only", [
        Step(as_partial(tcp("S", load=b"x" * 1000)), partial=True, save="syn",
             check=FWD_TO_BACKEND),
        Step(lambda ctx: as_partial(reply_to("syn", "SA", load=b"y" * 3)(ctx)), partial=True,
             check=fields(src=VIP, sport=80, dst=CLIENT, dport=40001)),
        Step(as_partial(udp(load=b"q" * 77)), partial=True, save="q",
             check=fields(src=MASQ, dst=BACKENDS, dport=5353)),
        Step(lambda ctx: as_partial(reply_to("q", load=b"a")(ctx)), partial=True,
             check=fields(src=VIP, sport=53)),
        Step(tcp("A", seq=1001, ack=5001), check=fields(dst=same("syn", "dst"))),   # full again
    ]),

    # --- schedulers, session affinity, stable ids -------------------------------------------
    Fixture("sched_rr", "round robin: new flows take the backends in order; each service has its cursor", [
        *[Step(tcp("S", sport=41000 + i), check=fields(dst=BACKENDS[i % 3])) for i in range(4)],
        Step(udp(sport=41000), check=fields(dst=BACKENDS[0], dport=5353)),
        Step(tcp("PA", sport=41000, seq=1001, load=b"x"), check=fields(dst=BACKENDS[0])),
        *[Step(tcp("S", sport=41010 + i), check=fields(dst=BACKENDS[(i + 1) % 3])) for i in range(3)],
    ], tables=sched_tables(1)),
    Fixture("sched_lc", "least connections: new flows go where the fewest flows are, also after some end", [
        *[Step(udp(sport=42000 + i), save=f"q{i}", after=_spread_within_one) for i in range(6)],
        Step(None, action=_delete_to("q0", 17),
             after=lambda dp, ctx: _assert(sorted(dp.active_flows(b) for b in range(3, 6)) == [0, 2, 2],
                                           "after delete_flows")),
        Step(udp(sport=42010), check=fields(dst=same("q0", "dst"))),
        Step(udp(sport=42011), check=fields(dst=same("q0", "dst")), after=_spread_within_one),
        Step(udp(sport=42010, load=b"refresh"), now=T0 + 20),
        Step(udp(sport=42011, load=b"refresh"), now=T0 + 20),
        Step(None, action=_expire(T0 + 31, 4)),      # the four on the other two backends
        *[Step(udp(sport=42020 + i), now=T0 + 31,
               check=fields(dst=lambda ctx: set(BACKENDS) - {ctx["q0"].dst}))
          for i in range(4)],
        Step(None, action=lambda dp, ctx: None, after=_spread_within_one),
        Step(tcp("S", sport=42030), now=T0 + 31,           # s:http keeps its own counts
             after=lambda dp, ctx: _assert(sum(dp.active_flows(b) for b in range(3)) == 1, "tcp")),
    ], tables=sched_tables(2)),
    Fixture("sched_sh", "source hashing: one client address, one backend, whatever its ports", [
        Step(tcp("S", sport=43000), save="first"),
        *[Step(tcp("S", sport=43001 + i), check=fields(dst=same("first", "dst"))) for i in range(6)],
        *[Step(udp(sport=43001 + i), save="u" if i == 0 else None) for i in range(3)],
        *[Step(tcp("S", src=f"10.0.{i}.9", sport=43000)) for i in range(6)],
    ], tables=sched_tables(3)),
    Fixture("sched_mh", "Maglev: a (client, port) keeps its backend across flows and table generations", [
        Step(udp(sport=44000), save="q"),
        Step(None, action=_delete_to("q", 17)),
        Step(udp(sport=44000), check=fields(dst=same("q", "dst"))),
        Step(None, action=lambda dp, ctx: dp.swap(ctx["mod"].Tables(**ctx["tables"]()))),
        Step(None, action=_delete_to("q", 17)),
        Step(udp(sport=44000), check=fields(dst=same("q", "dst"))),
        *[Step(tcp("S", src=f"10.0.{i}.{i + 1}", sport=44000 + 7 * i)) for i in range(8)],
    ], tables=sched_tables(4)),
    Fixture("affinity", "sessionAffinity: ClientIP: one backend per client until the timeout, never a removed one", [
        Step(udp(sport=45000), save="a1"),
        *[Step(udp(sport=45001 + i), now=T0 + 2 * i, check=fields(dst=same("a1", "dst")))
          for i in range(5)],
        *[Step(tcp("S", sport=45010 + i), now=T0 + 8) for i in range(3)],      # its own service
        Step(udp(src=FAR_CLIENT, sport=45000), now=T0 + 9),
        Step(udp(sport=45020), now=T0 + 8 + 9, check=fields(dst=same("a1", "dst"))),
        Step(udp(sport=45021), now=T0 + 17 + 10, save="a2"),    # expired: scheduled anew
        Step(None, action=_swap_without("a2")),
        Step(udp(sport=45022), now=T0 + 28, save="a3",
             check=fields(dst=lambda ctx: set(BACKENDS) - {ctx["a2"].dst})),
        Step(udp(sport=45023), now=T0 + 29, check=fields(dst=same("a3", "dst"))),
    ], tables=sched_tables(0, affinity=10)),
    Fixture("affinity_rr", "affinity over round robin: a hit does not move the cursor", [
        Step(udp(sport=46000), check=fields(dst=BACKENDS[0])),
        Step(udp(sport=46001), check=fields(dst=BACKENDS[0])),
        Step(udp(src=FAR_CLIENT, sport=46000), check=fields(dst=BACKENDS[1])),
        Step(udp(sport=46002, src=FAR_CLIENT), now=T0 + 5, check=fields(dst=BACKENDS[1])),
        Step(udp(sport=46003), now=T0 + 10, check=fields(dst=BACKENDS[2])),    # CLIENT's expired
        Step(udp(sport=46004, src=FAR_CLIENT), now=T0 + 14, check=fields(dst=BACKENDS[1])),
    ], tables=sched_tables(1, affinity=10)),
    Fixture("stable_ids", "flows carry the stable service and backend ids; counters are kept by them", [
        Step(tcp("S"), save="syn"),
        Step(reply_to("syn", "SA")),
        Step(udp(), save="q"),
        Step(None, action=lambda dp, ctx: None, after=lambda dp, ctx: _assert(
            sorted((f["svc"], f["backend"] // 100) for f in dp.flows(T0)) == [(7, 1), (9, 2)]
            and dp.active_flows(100) + dp.active_flows(101) + dp.active_flows(102) == 1
            and dp.active_flows(0) == 0, f"ids {dp.flows(T0)}")),
        Step(None, action=lambda dp, ctx: None,
             after=service_counters_are({7: {"packets": 2, "bytes": 80, "flows": 1},
                                         9: {"packets": 1, "bytes": 33, "flows": 1},
                                         0: {}, 1: {}})),
    ], tables=sched_tables(0, ids=True)),
    Fixture("service_counters", "per-service counters: forwarded, new flows, rejects, denied, ICMP", [
        Step(tcp("S"), save="syn"),                             # web:http (0): flow, 40 bytes
        Step(reply_to("syn", "SA")),                            # 40 bytes
        drop(tcp("A", sport=2), "not_syn"),                     # not counted
        reject(tcp("S", dst=VIP_NOEP)),                         # noep:http (2): reject
        reject(tcp("S", dst=VIP, dport=81)),                    # no service: not counted
        drop(tcp("S", src=FAR_CLIENT, dst=LB_IP), "source_denied"),   # lb:http (9): denied
        Step(tcp("S", dst=LB_IP, sport=40009), save="lb"),      # lb:http: flow
        Step(icmp_error("syn", quote=28)),                      # web:http: 56 bytes
        Step(None, action=lambda dp, ctx: None, after=service_counters_are({
            0: {"packets": 3, "bytes": 136, "flows": 1}, 2: {"rejects": 1},
            9: {"packets": 1, "bytes": 40, "flows": 1, "denied": 1}, 1: {}, 10: {}})),
    ]),
]


def _assert(cond, msg):
    assert cond, msg


# --- running ----------------------------------------------------------------------------

def flow_of(dp, pkt, now):
    """The flow a packet belongs to (either direction), from dp.flows(now)."""
    l4 = pkt.payload
    t = (ip(pkt.src), l4.sport, ip(pkt.dst), l4.dport)
    for f in dp.flows(now):
        if f["proto"] == pkt.proto and t in (f["orig"], f["reply"]):
            return f
    return None


def run_fixture(mod, fx, check=True, inputs=None):
    """Runs a fixture against engine._fastpath or engine.refpath. Returns what
    came out of every step, the final counters and flow table. inputs: a
    list to which each step's input bytes are appended (None for an action)."""
    dp = mod.Dataplane(ip(MASQ), tables=mod.Tables(**fx.tables()), **fx.dataplane)
    ctx = {"mod": mod, "tables": fx.tables}
    record = []
    last = T0
    for i, st in enumerate(fx.steps):
        where = f"{fx.id} step {i}"
        last = max(last, st.now)
        if st.action is not None:
            record.append(("action", st.action(dp, ctx)))
            if inputs is not None:
                inputs.append(None)
        else:
            pkt = st.pkt if isinstance(st.pkt, (bytes, Packet)) else st.pkt(ctx)
            raw = bytes(pkt)
            if inputs is not None:
                inputs.append(raw)
            ctx["in_raw"] = raw
            try:
                ctx["in"] = IP(raw)
            except Exception:       # too short for scapy: a malformed fixture
                ctx["in"] = None
            res = dp.process(raw, st.now, partial=True) if st.partial else dp.process(raw, st.now)
            record.append(res)
            verdict, reason, out = res
            ctx["out_raw"] = out
            parsed = IP(out) if out is not None else None
            if st.save and parsed is not None:
                ctx[st.save] = parsed
                ctx[st.save + "_raw"] = out
                ctx[st.save + "_in"] = raw
            if check:
                assert (verdict, reason) == (st.verdict, st.reason), \
                    f"{where}: got {verdict}/{reason}, want {st.verdict}/{st.reason}"
                assert (out is None) == (verdict == "drop"), where
                if out is not None:
                    try:
                        if st.partial:
                            verify_partial(out)
                        else:
                            verify_checksums(out)
                        if st.check:
                            st.check(parsed, ctx)
                    except AssertionError as e:
                        raise AssertionError(f"{where}: {e}\n{parsed!r}") from e
                if st.state:
                    f = flow_of(dp, ctx["in"], st.now)
                    got = f["state"] if f else "gone"
                    assert got == st.state, f"{where}: flow state {got}, want {st.state}"
        if check and st.after:
            try:
                st.after(dp, ctx)
            except AssertionError as e:
                raise AssertionError(f"{where}: {e}") from e
    return record, full_counters(dp, fx.tables()), dp.flows(last)


def full_counters(dp, tables_kw):
    """counters() plus the per-service counters of every service id and the
    active-flow count of every backend id in the tables."""
    c = dp.counters()
    svcs = tables_kw["services"]
    c["services"] = dp.service_counters(sorted({s.get("id", i) for i, s in enumerate(svcs)}))
    bids, n = set(), 0
    for s in svcs:
        for b in s["backends"]:
            bids.add(b[2] if len(b) > 2 else n)
            n += 1
    c["active"] = {b: dp.active_flows(b) for b in sorted(bids)}
    return c


# --- golden outputs ----------------------------------------------------------------------

GOLDEN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_outputs.json")


def golden_steps(mod, fx, check=False):
    """Every step of fx as golden_outputs.json holds it: the input and what
    came out (verdict, reason, output bytes), or the action's name."""
    inputs = []
    record, _, _ = run_fixture(mod, fx, check=check, inputs=inputs)
    steps = []
    for st, res, raw in zip(fx.steps, record, inputs):
        if raw is None:
            steps.append({"action": st.action.__name__})
        else:
            steps.append({"in": raw.hex(), "verdict": res[0], "reason": res[1],
                          "out": None if res[2] is None else res[2].hex()})
    return steps


def load_golden():
    with open(GOLDEN_FILE) as f:
        return json.load(f)


def write_golden():
    """Runs every fixture with its checks on both modules; writes the file
    only when both pass and agree byte for byte."""
    from engine import _fastpath, refpath
    out = {}
    for fx in FIXTURES:
        ref = golden_steps(refpath, fx, check=True)
        fast = golden_steps(_fastpath, fx, check=True)
        if ref != fast:
            raise SystemExit(f"{fx.id}: the fast path and the reference differ; not written")
        out[fx.id] = ref
    with open(GOLDEN_FILE, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {GOLDEN_FILE}: {len(out)} fixtures, {sum(map(len, out.values()))} steps")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-golden"]:
        raise SystemExit("usage: python3 -m tests.unit.packets --write-golden")
    write_golden()
