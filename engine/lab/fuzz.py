"""Fuzz the packet path: mutated IPv4 packets through engine._fastpath.
The command line is bench/fuzz.py; tests/unit/test_fuzz.py runs it at CI size.

    python3 bench/fuzz.py --packets 1000000            # the in-place build
    python3 bench/fuzz.py --packets 1000000 --debug    # a debug build first

Seeds are valid packets of every kind the engine handles (TCP SYN/ACK/FIN/RST,
UDP, ICMP echo, ICMP errors quoting flows the run itself opened, packets with
IP and TCP options), plus packets built from the replies the engine gave
(backend answers, client continuations, errors about tracked flows). Each is
mutated or not: bit flips, byte overwrites, truncation, junk appended, lying
length fields (total length, IHL, TCP data offset, UDP length), fragments,
version != 4, other protocols, addresses and ports, splices, and pure random
bytes; some go through the CHECKSUM_PARTIAL (virtio NEEDS_CSUM) mode.

Every result is checked (check_result): a drop carries a known reason; a
forwarded packet is no longer than its input, keeps a valid IPv4 header
checksum (and a valid L4 / ICMP checksum, or the partial pseudo-header sum)
whenever its input had one, and went to a service address or the masquerade
address; a reply is a well-formed echo reply or port unreachable. At the end
the counters must add up: rx == forwarded + replied + drops, per reason.

With a shadow dataplane (default) each packet is also run through a second
Dataplane whose buffer beyond the packet holds a different poison: any
difference between the two means the fast path read past the end of the
packet. With --ref N the first N packets also go through engine.refpath and
must give the same verdicts and the same bytes.

--debug builds the extension with Cython bounds checks and C asserts
(ENGINE_DEBUG=1) from a copy of the sources into /tmp/engine-debug-build (the
in-place .so and cext/fastpath.c are left alone) and runs the fuzz in a child
process that imports engine._fastpath from there. --sanitize adds
AddressSanitizer/UBSan to that build.

A failure prints the seed and the packet index: the run is deterministic
(seeded random.Random), so `--seed S --packets I+1` replays it.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import random
import shutil
import struct
import subprocess
import sys
import time

from .packets import (be16, be32, csum_ok, fix_ip_csum, fix_l4_csum, icmp, ipv4, pseudo, pseudo_sum,
                      tcp, to_partial, udp)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FUZZ_CLI = os.path.join(REPO_ROOT, "bench", "fuzz.py")
DEBUG_BUILD_LIB = "/tmp/engine-debug-build"
DEBUG_BUILD_TEMP = "/tmp/engine-debug-tmp"


# --- addresses -------------------------------------------------------------------

def ip(s):
    a, b, c, d = (int(x) for x in s.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def ipstr(a):
    return "%d.%d.%d.%d" % (a >> 24, (a >> 16) & 255, (a >> 8) & 255, a & 255)


MASQ = ip("169.254.100.1")
CLIENTS = [ip("10.0.0.1"), ip("10.0.0.2"), ip("10.1.0.1"), ip("192.168.50.2")]
BACKENDS = [ip("10.244.1.2"), ip("10.244.1.3"), ip("10.244.1.4")]
VIP = ip("10.96.100.100")           # TCP 80 -> :8080, UDP 53 -> :5353 (random)
VIP_NOEP = ip("10.96.100.101")      # TCP 80, UDP 53: no endpoints (rejects)
VIP_SCHED = ip("10.96.100.102")     # TCP 80 rr, 81 lc, 82 sh, 83 mh; UDP 84 affinity
LB = ip("172.18.255.10")            # TCP 80, loadBalancerSourceRanges 10.0.0.0/24
NODE = ip("192.168.50.1")           # node ports TCP 30080, UDP 30053
UNALLOC = ip("10.96.5.5")           # in the service CIDR, not a VIP
OUTSIDE = ip("8.8.8.8")
POD_ROUTER = ip("10.244.1.1")
LAN_ROUTER = ip("192.168.50.254")
SERVICE_ADDRS = frozenset((VIP, VIP_NOEP, VIP_SCHED, LB, NODE))
INTERESTING_ADDRS = [MASQ, VIP, VIP_NOEP, VIP_SCHED, LB, NODE, UNALLOC, OUTSIDE, POD_ROUTER,
                     0, 0xffffffff, ip("127.0.0.1"), ip("224.0.0.1")] + CLIENTS + BACKENDS
INTERESTING_PORTS = [0, 1, 53, 80, 81, 82, 83, 84, 443, 5353, 8080, 30053, 30080, 32767,
                     1023, 1024, 65535]
BACKEND_PORTS = frozenset((8080, 5353))

CONFIGS = {
    # name: Dataplane keyword arguments
    "default": dict(max_flows=4096),
    # a tiny table: eviction and table_full; few ICMP errors a second
    "tight": dict(max_flows=32, port_range=(40000, 40031), icmp_rate=2),   # and icmp_rate
    # four SNAT ports: nat_exhausted
    "ports": dict(max_flows=4096, port_range=(40000, 40003)),
    # the I/O loop behind: new flows from unknown sources, 2 a second (overload)
    "overload": dict(max_flows=4096, admit_rate=2, overloaded=True),
}
# --config all: how the packets are shared out
POISON_LEN = 8192                   # bytes of poison behind each packet (longer than any packet made)
MIX = (("default", 0.65), ("tight", 0.15), ("ports", 0.15), ("overload", 0.05))


def table_args():
    """Keyword arguments of Tables(...): every kind of service row."""
    def svc(name, vip, port, proto, backends, **kw):
        d = {"name": name, "vip": vip, "port": port, "proto": proto,
             "backends": list(backends), "scheduler": 0}
        d.update(kw)
        return d
    web = [(b, 8080) for b in BACKENDS]
    dns = [(b, 5353) for b in BACKENDS]
    return dict(
        services=[
            svc("default/web:http", VIP, 80, 6, web),
            svc("default/web:dns", VIP, 53, 17, dns),
            svc("default/noep:http", VIP_NOEP, 80, 6, []),
            svc("default/noep:dns", VIP_NOEP, 53, 17, []),
            svc("default/rr", VIP_SCHED, 80, 6, web, scheduler=1),
            svc("default/lc", VIP_SCHED, 81, 6, web, scheduler=2),
            svc("default/sh", VIP_SCHED, 82, 6, web, scheduler=3),
            svc("default/mh", VIP_SCHED, 83, 6, web, scheduler=4),
            svc("default/aff", VIP_SCHED, 84, 17, dns, affinity_timeout=10800),
            svc("default/lb:http", LB, 80, 6, web, source_ranges=[(ip("10.0.0.0"), 24)]),
            svc("default/lb:http@node", 0, 30080, 6, web, nodeport=True),
            svc("default/lb:dns@node", 0, 30053, 17, dns, nodeport=True),
        ],
        vips=[VIP, VIP_NOEP, VIP_SCHED, LB],
        drop_cidrs=[(ip("10.96.0.0"), 12), (ip("172.18.255.0"), 24)],
        node_addrs=[NODE],
    )


def same_ones(a, b):
    """Equal as one's complement numbers (0 and 0xffff are both zero)."""
    return a == b or {a, b} == {0, 0xffff}


# --- what a packet carries, for the checks ----------------------------------------------

def ip_ok(b):
    """A parsable IPv4 header with a valid checksum."""
    if len(b) < 20 or b[0] >> 4 != 4:
        return False
    ihl = (b[0] & 15) * 4
    return 20 <= ihl <= len(b) and csum_ok(b[:ihl])


def l4_state(b, partial=False):
    """'ok', 'bad', 'none' (UDP checksum 0) or None (cannot tell) for the L4
    checksum of datagram b; with partial, whether the field holds the
    pseudo-header sum."""
    if len(b) < 20:
        return None
    ihl, tot, proto = (b[0] & 15) * 4, be16(b, 2), b[9]
    if ihl < 20 or tot > len(b) or tot < ihl:
        return None
    src, dst = be32(b, 12), be32(b, 16)
    if proto == 6 and tot - ihl >= 20:
        if partial:
            return "ok" if same_ones(be16(b, ihl + 16), pseudo_sum(src, dst, 6, tot - ihl)) else "bad"
        return "ok" if csum_ok(pseudo(src, dst, 6, tot - ihl) + b[ihl:tot]) else "bad"
    if proto == 17 and tot - ihl >= 8:
        ulen = be16(b, ihl + 4)
        if not 8 <= ulen <= tot - ihl:
            return None
        if partial:
            return "ok" if same_ones(be16(b, ihl + 6), pseudo_sum(src, dst, 17, ulen)) else "bad"
        if be16(b, ihl + 6) == 0:
            return "none"
        return "ok" if csum_ok(pseudo(src, dst, 17, ulen) + b[ihl:ihl + ulen]) else "bad"
    if proto == 1 and tot - ihl >= 4 and not partial:
        return "ok" if csum_ok(b[ihl:tot]) else "bad"
    return None


class FuzzFailure(AssertionError):
    pass


# Rules the fast path is known to break, by key: check_result(known=...)
# counts these in `notes` instead of failing, so the fuzz can keep looking for
# new problems while a known one waits for its fix. Keys in check_result:
#   icmp-outer-dst   an ICMP error translated although its outer destination
#                    is not the quoted packet's sender (Linux drops these:
#                    nf_conntrack_inet_error, "outer daddr != inner")
#   icmp-to-martian  a port unreachable sent to a source that is not a unique
#                    host (RFC 1812 4.3.2.7, RFC 1122 3.2.2: MUST NOT)
# Both were found by this fuzz and fixed (bd43e87); none is open now.
KNOWN_ISSUES = {}


def martian(a):
    """Not a unique unicast host: this-network 0/8, loopback, multicast, class E/broadcast."""
    return a >> 24 in (0, 127) or a >> 28 >= 14


def check_result(inp, partial, res, drop_reasons, known=(), notes=None):
    """Raise FuzzFailure (AssertionError) when res = (verdict, reason, out) of
    the input packet inp breaks a rule (see the module docstring). Rules
    whose key is in `known` are counted in notes (a Counter) instead."""
    verdict, reason, out = res

    def fail(msg, key=None):
        if key is not None and key in known:
            if notes is not None:
                notes[f"known issue {key}"] += 1
            return True
        raise FuzzFailure(f"{msg}: verdict={verdict} reason={reason}\n  in : {inp.hex()}\n"
                          f"  out: {out.hex() if out else out}")

    if verdict == "drop":
        if out is not None:
            fail("a drop with output")
        if reason not in drop_reasons or reason == "none":
            fail("drop with an unknown reason")
        return
    if verdict not in ("forward", "reply"):
        fail("unknown verdict")
    if reason != "none":
        fail("a forward or reply with a drop reason")
    if not out:
        fail("no output")
    n = len(inp)
    if n < 20 or inp[0] >> 4 != 4:
        fail("sent something for a packet that is not IPv4")
    ihl, tot = (inp[0] & 15) * 4, be16(inp, 2)
    if not (20 <= ihl <= tot <= n):
        fail("sent something for a packet whose lengths lie")
    if be16(inp, 6) & 0x3fff:
        fail("sent something for a fragment")
    if len(out) < 20 or out[0] >> 4 != 4:
        fail("output is not IPv4")
    oihl = (out[0] & 15) * 4
    if oihl < 20 or oihl > len(out) or be16(out, 2) != len(out):
        fail("output IP lengths are not consistent")
    if be16(out, 6) & 0x3fff:
        fail("output is a fragment")
    src, dst = be32(inp, 12), be32(inp, 16)
    osrc, odst = be32(out, 12), be32(out, 16)
    proto = inp[9]
    if verdict == "forward":
        if len(out) != tot:
            fail("forwarded length is not the input's IP total length")
        if oihl != ihl or out[:2] != inp[:2] or out[4:10] != inp[4:10] or out[20:ihl] != inp[20:ihl]:
            fail("forwarding changed more of the IP header than addresses and checksum")
        tolerated = False
        if proto == 1 and len(inp) >= ihl + 28 and dst != be32(inp, ihl + 8 + 12):
            tolerated = fail("forwarded an ICMP error not addressed to the sender of the quoted packet",
                             "icmp-outer-dst")
        if dst not in SERVICE_ADDRS and dst != MASQ and not tolerated:
            fail("forwarded a packet addressed to neither a service nor the masquerade address")
        if ip_ok(inp) and not csum_ok(out[:oihl]):
            fail("forwarded with a bad IPv4 header checksum")
        if proto in (6, 17):
            if dst == MASQ:
                if osrc not in SERVICE_ADDRS:
                    fail("a reply left from something that is not a service address")
            elif osrc != MASQ or odst not in BACKENDS or be16(out, ihl + 2) not in BACKEND_PORTS:
                fail("a new or original-direction packet not sent masq -> backend:targetPort")
            body = ihl + (18 if proto == 6 else 8)
            if out[ihl + 4:ihl + (16 if proto == 6 else 6)] != inp[ihl + 4:ihl + (16 if proto == 6 else 6)] \
                    or out[body:] != inp[body:tot]:
                fail("forwarding changed the L4 header beyond ports and checksum, or the payload")
            st = l4_state(inp, partial)
            if st == "ok" and l4_state(out, partial) != "ok":
                fail("L4 checksum broken by the rewrite" + (" (partial)" if partial else ""))
            if st == "none" and l4_state(out) != "none":
                fail("UDP checksum 0 (none) not kept")
        elif proto == 1:
            if inp[ihl] not in (3, 11, 12) or out[ihl:ihl + 2] != inp[ihl:ihl + 2] \
                    or out[ihl + 4:ihl + 8] != inp[ihl + 4:ihl + 8]:
                fail("forwarded ICMP that is not the same error type, code and data")
            if l4_state(inp) == "ok" and l4_state(out) != "ok":
                fail("ICMP checksum broken by the error translation")
            inner = ihl + 8
            iihl = (inp[inner] & 15) * 4
            if csum_ok(inp[inner:inner + iihl]) and not csum_ok(out[inner:inner + iihl]):
                fail("quoted IP header checksum broken by the translation")
        else:
            fail("forwarded a protocol other than TCP, UDP, ICMP")
        return
    # replies: an echo reply or a port unreachable
    if not csum_ok(out[:oihl]) and ip_ok(inp):
        fail("reply with a bad IPv4 header checksum")
    if proto == 1 and inp[ihl] == 8:
        if len(out) != tot or osrc != dst or odst != src or out[ihl] != 0 or out[ihl + 1] != 0:
            fail("not an echo reply to the echo request")
        if dst not in SERVICE_ADDRS:
            fail("echo answered for an address that is not a service")
        if out[ihl + 4:] != inp[ihl + 4:tot]:
            fail("echo reply data differs")
        if l4_state(inp) == "ok" and l4_state(out) != "ok":
            fail("echo reply ICMP checksum")
        return
    if proto not in (6, 17):
        fail("port unreachable for something that is not TCP or UDP")
    q = min(tot, 548)
    if len(out) != 28 + q or oihl != 20 or out[9] != 1 or out[20:22] != b"\x03\x03":
        fail("not a port unreachable quoting the datagram")
    if not csum_ok(out[:20]) or not csum_ok(out[20:]):
        fail("port unreachable with a bad checksum")
    if osrc != dst or odst != src:
        fail("port unreachable not from the destination to the source")
    if out[28:] != inp[:q]:
        fail("port unreachable quote is not the datagram")
    if dst not in SERVICE_ADDRS:
        fail("port unreachable for an address that is not a service")
    if martian(odst):
        fail("port unreachable sent to a source that is not a unique host", "icmp-to-martian")


# --- the generator ------------------------------------------------------------------------

TCP_FLAG_SETS = [0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14, 0x01, 0x00, 0x3f, 0x06, 0x03, 0xc2]
IP_OPTIONS = [b"\x94\x04\x00\x00",                             # router alert
              b"\x01\x01\x01\x00",                             # NOPs, EOL
              b"\x07\x0b\x04" + b"\0" * 8 + b"\0",             # record route
              b"\x44\x0c\x05\x00" + b"\0" * 8,                 # timestamp
              bytes(range(40))]                                # junk, IHL 15
TCP_OPTIONS = [b"\x02\x04\x05\xb4", b"\x02\x04\x05\xb4\x04\x02\x08\x0a" + b"\0" * 8 + b"\x01\x03\x03\x07",
               b"\xff" * 40]


class Generator:
    """Seeded packets: valid seeds (some built from the engine's own
    earlier outputs), mutated or not."""

    def __init__(self, rng):
        self.r = rng
        self.flows = collections.deque(maxlen=512)     # (in, out): client -> service, forwarded
        self.replies = collections.deque(maxlen=512)   # (in, out): backend -> client, forwarded
        self.script = collections.deque()              # packets due next: handshakes under way
        self.static = [
            self.syn, self.syn, self.syn_opts, self.syn_ipopts, self.udp_q, self.udp_q, self.udp_zero,
            self.to_noep, self.echo, self.echo_other, self.to_nodeport, self.to_lb, self.not_syn,
            self.to_nowhere, self.spoof_masq, self.frag, self.other_proto, self.v6, self.icmp_err_unknown,
        ]
        self.dynamic = [self.reply, self.reply, self.cont, self.cont, self.err_backend,
                        self.err_backend, self.err_client, self.err_router]
        self.mutators = [
            self.m_bitflip, self.m_byteset, self.m_truncate, self.m_extend, self.m_lie, self.m_lie,
            self.m_frag, self.m_version, self.m_proto, self.m_addr, self.m_port, self.m_flags,
            self.m_splice, self.m_insert, self.m_delete, self.m_ihl, self.m_interesting,
        ]

    # seeds -----------------------------------------------------------------

    def _client(self):
        return self.r.choice(CLIENTS)

    def _sport(self):
        return self.r.randrange(1024, 65536)

    def _svc(self):
        return self.r.choice([(VIP, 80), (VIP_SCHED, 80), (VIP_SCHED, 81), (VIP_SCHED, 82),
                              (VIP_SCHED, 83), (LB, 80), (NODE, 30080)])

    def syn(self):
        d, p = self._svc()
        return tcp(self._client(), d, self._sport(), p, 0x02, seq=self.r.getrandbits(32))

    def syn_opts(self):
        d, p = self._svc()
        return tcp(self._client(), d, self._sport(), p, 0x02, options=self.r.choice(TCP_OPTIONS))

    def syn_ipopts(self):
        d, p = self._svc()
        return self._with_ipopts(tcp(self._client(), d, self._sport(), p, 0x02))

    def _with_ipopts(self, pkt):
        opt = self.r.choice(IP_OPTIONS)
        opt = opt + b"\0" * (-len(opt) % 4)
        ihl = 5 + len(opt) // 4
        b = bytearray(pkt[:20] + opt + pkt[20:])
        b[0] = 0x40 | ihl
        struct.pack_into("!H", b, 2, len(b))
        fix_ip_csum(b)
        return bytes(b)

    def udp_q(self):
        d, p = self.r.choice([(VIP, 53), (VIP_SCHED, 84), (NODE, 30053)])
        return udp(self._client(), d, self._sport(), p, payload=self.r.randbytes(self.r.randrange(0, 64)))

    def udp_zero(self):
        return udp(self._client(), VIP, self._sport(), 53, zero_csum=True)

    def to_noep(self):
        if self.r.random() < 0.5:
            return tcp(self._client(), VIP_NOEP, self._sport(), 80, 0x02)
        return udp(self._client(), VIP_NOEP, self._sport(), 53, payload=self.r.randbytes(self.r.randrange(0, 700)))

    def echo(self):
        d = self.r.choice([VIP, VIP_NOEP, LB, VIP_SCHED])
        return icmp(self._client(), d, 8, 0, struct.pack("!HH", self.r.getrandbits(16), 1),
                    payload=self.r.randbytes(self.r.randrange(0, 100)))

    def echo_other(self):
        d = self.r.choice([UNALLOC, MASQ, OUTSIDE, NODE])
        return icmp(self._client(), d, self.r.choice([8, 0, 13, 17]), 0, payload=b"x" * 8)

    def to_nodeport(self):
        return tcp(self._client(), NODE, self._sport(), self.r.choice([30080, 30081, 22]), 0x02)

    def to_lb(self):
        return tcp(self.r.choice([CLIENTS[0], CLIENTS[2]]), LB, self._sport(), self.r.choice([80, 443]), 0x02)

    def not_syn(self):
        d, p = self._svc()
        return tcp(self._client(), d, self._sport(), p, self.r.choice([0x10, 0x18, 0x11, 0x04, 0x12]))

    def to_nowhere(self):
        d = self.r.choice([UNALLOC, OUTSIDE, ip("172.18.255.99")])
        if self.r.random() < 0.5:
            return tcp(self._client(), d, self._sport(), 80, 0x02)
        return udp(self._client(), d, self._sport(), 53)

    def spoof_masq(self):
        if self.r.random() < 0.5:
            return tcp(self.r.choice(BACKENDS), MASQ, 8080, self.r.randrange(1024, 65536), 0x12)
        return udp(self.r.choice(BACKENDS), MASQ, 5353, self.r.randrange(1024, 65536))

    def frag(self):
        b = bytearray(self.syn() if self.r.random() < 0.5 else self.udp_q())
        struct.pack_into("!H", b, 6, self.r.choice([0x2000, 0x0001, 0x2010, 0x1fff, 0x3fff]))
        fix_ip_csum(b)
        return bytes(b)

    def other_proto(self):
        return ipv4(self._client(), VIP, self.r.choice([0, 2, 4, 41, 47, 50, 58, 132, 255]), self.r.randbytes(40))

    def v6(self):
        return bytes([0x60]) + self.r.randbytes(self.r.randrange(0, 80))

    def icmp_err_unknown(self):
        inner = tcp(MASQ, self.r.choice(BACKENDS), self._sport(), 8080, 0x02)
        return icmp(self.r.choice(BACKENDS), MASQ, 3, 3, payload=inner[:28])

    # seeds from earlier outputs -----------------------------------------------

    def reply(self):
        if not self.flows:
            return self.syn()
        _, o = self.r.choice(self.flows)
        ihl = (o[0] & 15) * 4
        s, d, sp, dp = be32(o, 12), be32(o, 16), be16(o, ihl), be16(o, ihl + 2)
        if o[9] == 6:
            return tcp(d, s, dp, sp, self.r.choice([0x12, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14, 0x02]),
                       payload=self.r.randbytes(self.r.choice([0, 0, 10, 200])))
        return udp(d, s, dp, sp, payload=self.r.randbytes(self.r.randrange(0, 300)))

    def cont(self):
        if not self.flows:
            return self.syn()
        i, _ = self.r.choice(self.flows)
        ihl = (i[0] & 15) * 4
        s, d, sp, dp = be32(i, 12), be32(i, 16), be16(i, ihl), be16(i, ihl + 2)
        if i[9] == 6:
            return tcp(s, d, sp, dp, self.r.choice([0x10, 0x18, 0x11, 0x04, 0x02, 0x12]),
                       payload=self.r.randbytes(self.r.choice([0, 0, 10, 1400])))
        return udp(s, d, sp, dp, payload=self.r.randbytes(self.r.randrange(0, 100)))

    def _quote(self, o):
        k = self.r.random()
        if k < 0.4:
            return o
        if k < 0.8:
            return o[:28]
        return o[:self.r.randrange(0, len(o) + 1)]

    def _err(self):
        return self.r.choice([(3, 3), (3, 1), (3, 4), (11, 0), (12, 0), (3, 13)])

    def err_backend(self):
        """The backend (or a router on its side) reports a packet we sent it."""
        if not self.flows:
            return self.icmp_err_unknown()
        _, o = self.r.choice(self.flows)
        t, c = self._err()
        src = be32(o, 16) if self.r.random() < 0.7 else POD_ROUTER
        dst = be32(o, 12) if self.r.random() < 0.9 else self.r.choice(INTERESTING_ADDRS)
        rest = struct.pack("!HH", 0, 1400) if (t, c) == (3, 4) else b"\0\0\0\0"
        return icmp(src, dst, t, c, rest, payload=self._quote(o))

    def err_client(self):
        """The client reports a reply we sent it."""
        if not self.replies:
            return self.echo()
        _, o = self.r.choice(self.replies)
        t, c = self._err()
        dst = be32(o, 12) if self.r.random() < 0.9 else self.r.choice(INTERESTING_ADDRS)
        return icmp(be32(o, 16), dst, t, c, payload=self._quote(o))

    def err_router(self):
        pool = self.replies if self.replies and self.r.random() < 0.5 else self.flows
        if not pool:
            return self.echo()
        _, o = self.r.choice(pool)
        t, c = self._err()
        return icmp(LAN_ROUTER, be32(o, 12), t, c, struct.pack("!HH", 0, 576), payload=self._quote(o))

    def observe(self, inp, res):
        verdict, _, out = res
        if verdict != "forward" or out[9] not in (6, 17):
            return
        if be32(out, 12) == MASQ:
            self.flows.append((inp, out))
            ihl = (out[0] & 15) * 4
            # complete some handshakes (SYN, SYN-ACK, ACK): established flows
            # are what a full table has to keep
            if out[9] == 6 and out[ihl + 13] & 0x17 == 0x02 and self.r.random() < 0.5:
                iihl = (inp[0] & 15) * 4
                s, d, sp, dp = be32(out, 12), be32(out, 16), be16(out, ihl), be16(out, ihl + 2)
                self.script.append(tcp(d, s, dp, sp, 0x12, seq=5000, ack=1001))
                s, d, sp, dp = be32(inp, 12), be32(inp, 16), be16(inp, iihl), be16(inp, iihl + 2)
                self.script.append(tcp(s, d, sp, dp, 0x10, seq=1001, ack=5001))
        else:
            self.replies.append((inp, out))

    # mutations ------------------------------------------------------------

    def m_bitflip(self, b):
        for _ in range(self.r.randrange(1, 9)):
            if b:
                b[self.r.randrange(len(b))] ^= 1 << self.r.randrange(8)
        return b

    def m_byteset(self, b):
        for _ in range(self.r.randrange(1, 5)):
            if b:
                b[self.r.randrange(len(b))] = self.r.choice([0, 0xff, 0x7f, 0x80, 1, self.r.getrandbits(8)])
        return b

    def m_truncate(self, b):
        return b[:self.r.randrange(0, len(b) + 1)]

    def m_extend(self, b):
        return b + bytearray(self.r.randbytes(self.r.choice([1, 3, 8, 40, self.r.randrange(1, 1500)])))

    def m_lie(self, b):
        """One length field set to an edge value."""
        n = len(b)
        if n < 20:
            return b
        ihl = (b[0] & 15) * 4
        which = self.r.randrange(4)
        if which == 0:
            v = self.r.choice([0, 1, 19, 20, ihl - 1, ihl, ihl + 1, n - 1, n, n + 1, 0xffff,
                               self.r.getrandbits(16)])
            struct.pack_into("!H", b, 2, v & 0xffff)
        elif which == 1:
            b[0] = 0x40 | self.r.randrange(16)
        elif which == 2 and b[9] == 6 and ihl + 13 <= n:
            b[ihl + 12] = (self.r.randrange(16) << 4) | (b[ihl + 12] & 15)
        elif which == 3 and ihl + 6 <= n:
            tot = be16(b, 2)
            v = self.r.choice([0, 1, 7, 8, 9, tot - ihl - 1, tot - ihl, tot - ihl + 1, 0xffff,
                               self.r.getrandbits(16)])
            struct.pack_into("!H", b, ihl + 4, v & 0xffff)
        return b

    def m_frag(self, b):
        if len(b) >= 8:
            struct.pack_into("!H", b, 6, self.r.choice([0x2000, 0x0001, 0x2001, 0x1fff, 0x3fff, 0x8000,
                                                         0x4000]))
        return b

    def m_version(self, b):
        if b:
            b[0] = (self.r.choice([0, 4, 5, 6, 15]) << 4) | (b[0] & 15)
        return b

    def m_proto(self, b):
        if len(b) >= 10:
            b[9] = self.r.choice([0, 1, 6, 17, 2, 47, 50, 58, 132, 255])
        return b

    def m_addr(self, b):
        if len(b) >= 20:
            struct.pack_into("!I", b, self.r.choice([12, 16]), self.r.choice(INTERESTING_ADDRS))
        return b

    def m_port(self, b):
        if len(b) >= 20:
            ihl = (b[0] & 15) * 4
            off = ihl + self.r.choice([0, 2])
            if off + 2 <= len(b):
                struct.pack_into("!H", b, off, self.r.choice(INTERESTING_PORTS))
        return b

    def m_flags(self, b):
        if len(b) >= 20:
            ihl = (b[0] & 15) * 4
            if ihl + 14 <= len(b):
                b[ihl + 13] = self.r.choice(TCP_FLAG_SETS + [self.r.getrandbits(8)])
        return b

    def m_splice(self, b):
        other = self.seed()
        k = self.r.randrange(0, len(b) + 1)
        return b[:k] + bytearray(other[self.r.randrange(0, len(other) + 1):])

    def m_insert(self, b):
        k = self.r.randrange(0, len(b) + 1)
        return b[:k] + bytearray(self.r.randbytes(self.r.randrange(1, 12))) + b[k:]

    def m_delete(self, b):
        if len(b) < 2:
            return b
        k = self.r.randrange(0, len(b) - 1)
        return b[:k] + b[k + self.r.randrange(1, min(16, len(b) - k) + 1):]

    def m_ihl(self, b):
        if b:
            b[0] = (b[0] & 0xf0) | self.r.choice([0, 1, 4, 5, 6, 7, 15])
        return b

    def m_interesting(self, b):
        """A 16-bit word anywhere set to an edge value."""
        if len(b) >= 2:
            struct.pack_into("!H", b, self.r.randrange(len(b) - 1),
                             self.r.choice([0, 1, 0x7fff, 0x8000, 0xffff, 0xfffe, 20, 28, 40, 576]))
        return b

    # driving -------------------------------------------------------------

    def seed(self):
        if self.r.random() < 0.45 and (self.flows or self.replies):
            return self.r.choice(self.dynamic)()
        return self.r.choice(self.static)()

    def next(self):
        """(packet bytes, partial)"""
        r = self.r
        if self.script and r.random() < 0.8:
            return self.script.popleft(), False
        k = r.random()
        if k < 0.02:
            return self.r.randbytes(r.randrange(0, 200)), r.random() < 0.2
        if k < 0.04:       # random bytes behind a plausible header
            body = self.r.randbytes(r.randrange(0, 120))
            b = bytearray(ipv4(self._client(), r.choice(INTERESTING_ADDRS), r.choice([1, 6, 17]), body))
            return bytes(b), r.random() < 0.2
        pkt = self.seed()
        partial = False
        if r.random() < 0.1 and pkt[0] == 0x45 and pkt[9] in (6, 17) and be16(pkt, 6) & 0x3fff == 0:
            pkt = to_partial(pkt)
            partial = True
        if r.random() < 0.6:
            b = bytearray(pkt)
            for _ in range(r.choice([1, 1, 1, 2, 2, 3, 4])):
                b = r.choice(self.mutators)(b)
            k = r.random()
            if k < 0.6:
                fix_ip_csum(b)            # the kernel only routes packets with good headers
                if not partial and r.random() < 0.5:
                    fix_l4_csum(b)
            pkt = bytes(b[:65536])
        elif r.random() < 0.05:
            partial = not partial          # the wrong mode: must not matter for safety
        return pkt, partial


# --- running --------------------------------------------------------------------------------

class Stats:
    def __init__(self):
        self.hist = collections.Counter()      # (verdict, reason)
        self.packets = 0
        self.in_process = 0.0                  # seconds inside Dataplane.process
        self.elapsed = 0.0
        self.partial = 0
        self.ref_compared = 0
        self.shadow_compared = 0
        self.notes = collections.Counter()     # odd but not failing

    def merge(self, other):
        self.hist.update(other.hist)
        self.notes.update(other.notes)
        for k in ("packets", "in_process", "elapsed", "partial", "ref_compared", "shadow_compared"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


def run(fp, packets, seed=1, config="default", ref=None, ref_packets=0, shadow=True,
        truncations=True, stats=None, progress=None, known=tuple(KNOWN_ISSUES)):
    """Fuzz `packets` packets through fp (engine._fastpath or a module with
    the same API). ref: engine.refpath, compared on the first ref_packets.
    Raises FuzzFailure on the first broken rule. Returns Stats."""
    rng = random.Random(seed)
    gen = Generator(rng)
    kw = dict(CONFIGS[config])
    overloaded = kw.pop("overloaded", False)
    targs = table_args()

    def make(mod):
        dp = mod.Dataplane(MASQ, tables=mod.Tables(**targs), seed=0x5eed0000 + seed, **kw)
        dp.overloaded = overloaded
        return dp

    dp = make(fp)
    sh = make(fp) if shadow else None
    rp = make(ref) if ref is not None and ref_packets else None
    reasons = set(fp.DROP_REASONS)
    st = stats or Stats()
    st_local = Stats()
    poison_a = b"\xaa" * 65536              # version 10, dropped: "unsupported"
    poison_b = b"\x55" * 65536              # version 5, dropped: "unsupported"
    npoison = 0
    now = 1000.0
    t_start = time.perf_counter()
    hist = st_local.hist
    process = dp.process
    clock = time.perf_counter

    def one(i, pkt, partial):
        nonlocal npoison
        t0 = clock()
        res = process(pkt, now, partial)
        st_local.in_process += clock() - t0
        try:
            check_result(pkt, partial, res, reasons, known, st_local.notes)
        except FuzzFailure as e:
            raise FuzzFailure(f"packet {i} (seed {seed}, config {config}, partial={partial}): {e}") from None
        if sh is not None:
            pl = min(65536, max(POISON_LEN, len(pkt) + 2048))
            dp_poison = memoryview(poison_a)[:pl]
            # the shadow ran the same sequence; give both buffers different
            # poison behind the packet, then the packet again on the shadow
            sh.process(memoryview(poison_b)[:pl], now)
            sres = sh.process(pkt, now, partial)
            npoison += 1
            if sres != res:
                raise FuzzFailure(f"packet {i} (seed {seed}, config {config}): result depends on the bytes "
                                  f"after the packet (read past the end)\n  in: {pkt.hex()}\n"
                                  f"  poison 0xaa: {res}\n  poison 0x55: {sres}")
            dp.process(dp_poison, now)
            st_local.shadow_compared += 1
        if rp is not None and i < ref_packets:
            rres = rp.process(pkt, now, partial)
            if rres != res:
                raise FuzzFailure(f"packet {i} (seed {seed}, config {config}, partial={partial}): "
                                  f"fastpath and refpath differ\n  in: {pkt.hex()}\n"
                                  f"  fastpath: {res}\n  refpath : {rres}")
            st_local.ref_compared += 1
        hist[(res[0], res[1])] += 1
        gen.observe(pkt, res)
        return res

    if shadow:
        # both start with their poison in place
        dp.process(memoryview(poison_a)[:POISON_LEN], now)
        sh.process(memoryview(poison_b)[:POISON_LEN], now)
        npoison += 1
    i = 0
    # 1. every truncation of every kind of seed (and of a few live ones)
    if truncations:
        seeds = [f() for f in gen.static] + [gen.syn() for _ in range(4)]
        for f in gen.dynamic:
            for _ in range(2):
                one(i, seeds[i % len(seeds)], False)      # let the flows fill
                i += 1
                seeds.append(f())
        for s in seeds:
            for cut in range(len(s) + 1):
                if i >= packets:
                    break
                one(i, s[:cut], False)
                i += 1
    # 2. mutations
    while i < packets:
        pkt, partial = gen.next()
        if partial:
            st_local.partial += 1
        r = rng.random()
        if r < 0.01:
            now += rng.choice([1, 10, 60, 121, 3601, 86401])
        elif r < 0.3:
            now += 0.01
        one(i, pkt, partial)
        i += 1
        if i % 997 == 0:
            budget = rng.choice([16, 64, 4096])
            e1 = dp.expire(now, budget)
            if sh is not None and sh.expire(now, budget) != e1:
                raise FuzzFailure(f"packet {i}: shadow expired a different number of flows")
            if rp is not None and i < ref_packets:
                e2 = rp.expire(now, budget)
                if e2 != e1:
                    raise FuzzFailure(f"packet {i}: expire() fastpath {e1} != refpath {e2}")
        if progress and i % 100000 == 0:
            progress(i)
    # 3. the counters add up
    c = dp.counters()
    fwd = sum(n for (v, _), n in hist.items() if v == "forward")
    rep = sum(n for (v, _), n in hist.items() if v == "reply")
    drops = collections.Counter()
    for (v, reason), n in hist.items():
        if v == "drop":
            drops[reason] += n
    byreason = dict(c["drops_by_reason"])
    if shadow:
        byreason["unsupported"] -= npoison
    rx = c["rx_packets"] - (npoison if shadow else 0)
    problems = []
    if rx != i:
        problems.append(f"rx_packets {rx} != packets processed {i}")
    if rx != fwd + rep + sum(drops.values()):
        problems.append(f"rx {rx} != forwarded {fwd} + replied {rep} + drops {sum(drops.values())}")
    if c["drops"] - (npoison if shadow else 0) != sum(drops.values()):
        problems.append(f"drops counter {c['drops']} != drops seen {sum(drops.values())}")
    for reason, n in byreason.items():
        if n != drops.get(reason, 0):
            problems.append(f"drops_by_reason[{reason}] {n} != seen {drops.get(reason, 0)}")
    if c["rejects"] > rep:
        problems.append(f"rejects {c['rejects']} > replies {rep}")
    if not 0 <= c["flows"] <= c["max_flows"]:
        problems.append(f"flows {c['flows']} outside 0..{c['max_flows']}")
    if len(dp.flows(now)) > c["flows"]:
        problems.append("flows() lists more entries than the flow count")
    if rp is not None and ref_packets >= i:
        rc = rp.counters()
        if shadow:
            rc = dict(rc)
        for k in ("flows_created", "flows_expired", "flows_evicted", "rejects", "flows"):
            if rc[k] != c[k]:
                problems.append(f"counter {k}: fastpath {c[k]} != refpath {rc[k]}")
        if sorted(map(repr, rp.flows(now))) != sorted(map(repr, dp.flows(now))):
            problems.append("flow tables of fastpath and refpath differ")
    if problems:
        raise FuzzFailure(f"seed {seed}, config {config}: counters do not add up:\n  " + "\n  ".join(problems))
    st_local.packets = i
    st_local.elapsed = time.perf_counter() - t_start
    st.merge(st_local)
    return st


def mix_plan(packets, seed):
    """[(config, packets, seed)] sharing `packets` out as MIX says."""
    plan, left = [], packets
    for i, (config, frac) in enumerate(MIX):
        n = left if i == len(MIX) - 1 else int(packets * frac)
        plan.append((config, n, seed + i))
        left -= n
    return plan


# --- the debug build -------------------------------------------------------------------

def build_debug(build_lib=DEBUG_BUILD_LIB, build_temp=DEBUG_BUILD_TEMP, sanitize=False, quiet=True):
    """Build engine._fastpath with ENGINE_DEBUG=1 (Cython bounds checks, C
    asserts, -O0 -g) from a copy of setup.py and cext/ (so neither the
    in-place .so nor cext/fastpath.c changes) into build_lib. Writes an
    engine/__init__.py there that also searches the repository's engine/,
    so with build_lib first on sys.path `engine._fastpath` is the debug
    build and `engine.refpath` the repository's. Returns the .so path."""
    src = build_temp + "-src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(os.path.join(REPO_ROOT, "cext"), os.path.join(src, "cext"),
                    ignore=lambda d, names: [n for n in names if n.endswith((".c", ".so", ".html"))])
    shutil.copy2(os.path.join(REPO_ROOT, "setup.py"), src)
    env = dict(os.environ, ENGINE_DEBUG="1")
    if sanitize:
        flags = "-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
        env["CFLAGS"] = (env.get("CFLAGS", "") + " " + flags).strip()
        env["LDFLAGS"] = (env.get("LDFLAGS", "") + " -fsanitize=address,undefined").strip()
    for old in glob.glob(os.path.join(build_lib, "engine", "_fastpath*.so")):
        os.unlink(old)
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", build_lib,
                        "--build-temp", build_temp, "--force"],
                       cwd=src, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("debug build failed:\n" + r.stdout[-4000:] + r.stderr[-4000:])
    if not quiet:
        sys.stderr.write(r.stderr[-2000:])
    sos = glob.glob(os.path.join(build_lib, "engine", "_fastpath*.so"))
    if not sos:
        raise RuntimeError("debug build made no engine/_fastpath*.so in " + build_lib)
    with open(os.path.join(build_lib, "engine", "__init__.py"), "w") as f:
        f.write("# debug build of engine._fastpath (engine/lab/fuzz.py); everything else from the repository\n"
                f"__path__.append({os.path.join(REPO_ROOT, 'engine')!r})\n")
    return sos[0]


def asan_env():
    """Environment for a child that loads an ASan-built extension into an
    uninstrumented python: libasan preloaded, leak checks off."""
    lib = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    ubsan = subprocess.run(["gcc", "-print-file-name=libubsan.so"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(x for x in (lib, ubsan) if x and os.path.sep in x)
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env


# --- command line --------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Fuzz engine._fastpath with mutated packets.")
    p.add_argument("--packets", type=int, default=1000000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--config", choices=sorted(CONFIGS) + ["all"], default="all",
                   help="dataplane configuration; all: " + ", ".join(f"{int(f * 100)}%% {c}" for c, f in MIX))
    p.add_argument("--ref", type=int, default=0, metavar="N",
                   help="also run the first N packets through engine.refpath and compare")
    p.add_argument("--no-shadow", action="store_true", help="skip the read-past-the-end check (faster)")
    p.add_argument("--debug", action="store_true",
                   help=f"build a debug extension into {DEBUG_BUILD_LIB} and fuzz that")
    p.add_argument("--sanitize", action="store_true", help="with --debug: AddressSanitizer + UBSan too")
    p.add_argument("--build-lib", default=DEBUG_BUILD_LIB, help=argparse.SUPPRESS)
    p.add_argument("--use-build", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.debug:
        t0 = time.perf_counter()
        so = build_debug(args.build_lib, sanitize=args.sanitize)
        print(f"debug build: {so} ({time.perf_counter() - t0:.1f} s)", flush=True)
        child = [sys.executable, FUZZ_CLI, "--use-build", args.build_lib,
                 "--packets", str(args.packets), "--seed", str(args.seed), "--config", args.config,
                 "--ref", str(args.ref)] + (["--no-shadow"] if args.no_shadow else [])
        env = asan_env() if args.sanitize else None
        return subprocess.call(child, env=env)

    from engine import _fastpath, refpath
    if args.use_build and not os.path.abspath(_fastpath.__file__).startswith(os.path.abspath(args.use_build)):
        raise SystemExit(f"expected the debug build from {args.use_build}, got {_fastpath.__file__}")
    print(f"fastpath: {_fastpath.__file__}" + ("  (debug build)" if args.use_build else ""), flush=True)

    plan = mix_plan(args.packets, args.seed) if args.config == "all" else [(args.config, args.packets, args.seed)]
    st = Stats()
    t0 = time.perf_counter()
    for config, n, seed in plan:
        if n <= 0:
            continue
        try:
            run(_fastpath, n, seed=seed, config=config, ref=refpath, ref_packets=args.ref,
                shadow=not args.no_shadow, stats=st,
                progress=lambda i: print(f"  {config}: {i} packets", file=sys.stderr, flush=True))
        except FuzzFailure as e:
            print(f"FAIL: {e}", flush=True)
            return 1
    wall = time.perf_counter() - t0
    print(f"packets: {st.packets}  crashes: 0  failures: 0")
    print(f"wall: {wall:.1f} s  -> {st.packets / wall:,.0f} packets/s through the whole fuzz loop "
          f"(generation, checks{', shadow' if not args.no_shadow else ''})")
    print(f"in Dataplane.process: {st.in_process:.2f} s -> {st.packets / st.in_process:,.0f} packets/s "
          f"({1e6 * st.in_process / st.packets:.2f} us/packet incl. call overhead)")
    print(f"partial-checksum packets: {st.partial}  refpath-compared: {st.ref_compared}  "
          f"shadow-compared: {st.shadow_compared}")
    print("verdicts:")
    for (v, reason), n in sorted(st.hist.items(), key=lambda kv: -kv[1]):
        print(f"  {v:8s} {reason:15s} {n:9d}  {100.0 * n / st.packets:5.1f}%")
    for note, n in st.notes.items():
        print(f"note: {note}: {n}")
    return 0
