"""Packet fixtures (packets.py) against the Cython fast path and the Python
reference, and the two against each other, byte for byte.

Build the extension first: python3 setup.py build_ext --inplace
"""
import ast
import random
import struct

import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP

from engine import _fastpath, refpath
from packets import (BACKENDS, CLIENT, FIXTURES, LB_IP, MASQ, NODE, OUTSIDE, T0,
                     UNALLOCATED, VIP, VIP_MULTI, VIP_NOEP, VIP_ONE, VIP_TWO,
                     default_tables, ip, run_fixture, tcp, udp, verify_checksums)

MODULES = [pytest.param(_fastpath, id="fastpath"), pytest.param(refpath, id="refpath")]
FIXTURE_PARAMS = [pytest.param(fx, id=fx.id) for fx in FIXTURES]


def dataplane(mod, **kw):
    return mod.Dataplane(ip(MASQ), tables=mod.Tables(**default_tables()), **kw)


@pytest.mark.parametrize("fx", FIXTURE_PARAMS)
@pytest.mark.parametrize("mod", MODULES)
def test_fixture(mod, fx):
    run_fixture(mod, fx)


@pytest.mark.parametrize("fx", FIXTURE_PARAMS)
def test_fixture_same_bytes(fx):
    """The reference and the fast path agree on every output byte, every
    counter and the flow table."""
    c_rec, c_cnt, c_flows = run_fixture(_fastpath, fx, check=False)
    r_rec, r_cnt, r_flows = run_fixture(refpath, fx, check=False)
    for i, (c, r) in enumerate(zip(c_rec, r_rec)):
        assert c == r, f"{fx.id} step {i}: fastpath {c!r} != refpath {r!r}"
    assert c_cnt == r_cnt
    assert c_flows == r_flows


def test_exported_names_match():
    for name in ("DROP_REASONS", "COUNTERS", "STATE_NAMES", "DEFAULT_TIMEOUTS"):
        assert getattr(refpath, name) == getattr(_fastpath, name), name
    # the reference stands alone: standard library imports only
    tree = ast.parse(open(refpath.__file__).read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"struct", "time"}, imported


@pytest.mark.parametrize("mod", MODULES)
def test_argument_checks(mod):
    svc = default_tables()["services"][0]
    with pytest.raises(ValueError):
        mod.Tables([svc, dict(svc, name="again")])
    with pytest.raises(ValueError):
        mod.Dataplane(ip(MASQ), max_flows=0)
    with pytest.raises(ValueError):
        mod.Dataplane(ip(MASQ), port_range=(2000, 1999))
    with pytest.raises(ValueError):
        mod.Dataplane(ip(MASQ), port_range=(0, 10))
    dp = mod.Dataplane(ip(MASQ), max_flows=4)
    with pytest.raises(ValueError):
        dp.set_timeouts({"LISTEN": 1})
    t = mod.Tables(**default_tables())
    assert t.size == len(default_tables()["services"])
    assert t.names[0] == "default/web:http"
    dp.swap(t)
    assert dp.current_tables is t
    c = dp.counters()
    assert c["max_flows"] == 4 and c["flows"] == 0
    assert set(c["drops_by_reason"]) == set(mod.DROP_REASONS[1:])


@pytest.mark.parametrize("mod", MODULES)
def test_backend_spread(mod):
    """3000 new flows over 3 backends: each gets 25% to 42%."""
    dp = dataplane(mod)
    hits = dict.fromkeys(BACKENDS, 0)
    for i in range(3000):
        src = f"10.0.{i // 250}.{i % 250 + 1}"
        p = tcp("S", src=src, sport=10000 + i) if i % 2 else udp(src=src, sport=10000 + i)
        verdict, _, out = dp.process(bytes(p), T0)
        assert verdict == "forward"
        hits[IP(out).dst] += 1
    for b, n in hits.items():
        assert 0.25 <= n / 3000 <= 0.42, hits
    assert dp.counters()["flows"] == 3000


@pytest.mark.parametrize("mod", MODULES)
def test_udp_computed_zero_checksum_is_ffff(mod):
    """A UDP checksum that computes to 0 is sent as 0xffff (0 means none).
    A probe learns the checksum c0 with a zero payload word; the same flow on a
    fresh dataplane (same seed: same backend and port) with payload word c0
    then sums to 0."""
    _, _, out = dataplane(mod).process(bytes(udp(load=b"\0\0")), T0)
    c0 = IP(out)[UDP].chksum
    _, _, out = dataplane(mod).process(bytes(udp(load=struct.pack("!H", c0))), T0)
    assert IP(out)[UDP].chksum == 0xffff
    verify_checksums(out)


def test_process_batch_same():
    pkts = [bytes(p) for p in (tcp("S"), udp(), tcp("S", dst=VIP_NOEP), tcp("A", sport=9),
                               udp(dst=OUTSIDE))]
    dps = [dataplane(m, batch=8) for m in (_fastpath, refpath)]
    assert [dp.process_batch(pkts, T0, repeat=3) for dp in dps] == [9, 9]   # 2 forwarded + 1 reply, 3 times
    assert dps[0].counters() == dps[1].counters()
    assert dps[0].flows(T0) == dps[1].flows(T0)
    with pytest.raises(ValueError):
        dps[1].process_batch(pkts * 2, T0)


# --- differential: the same random traffic through both --------------------------------

CLIENTS = [CLIENT, "10.0.0.2", "10.1.0.1", BACKENDS[0]]
DESTS = [(VIP, 80), (VIP, 53), (VIP, 81), (VIP_NOEP, 80), (VIP_MULTI, 443), (VIP_ONE, 80),
         (VIP_ONE, 53), (VIP_TWO, 53), (LB_IP, 80), (NODE, 30080), (UNALLOCATED, 80),
         (OUTSIDE, 80), (MASQ, 40000)]
TCP_FLAGS = ["S", "S", "S", "SA", "A", "A", "PA", "FA", "F", "R", "RA", "SF", "SR", ""]


def _random_packet(r, flows):
    if flows and r.random() < 0.5:
        f = r.choice(flows)
        (s, sp, d, dp), direction = (f["orig"], 0) if r.random() < 0.5 else (f["reply"], 1)
        src, dst = str(ip_str(s)), str(ip_str(d))
        proto = f["proto"]
    else:
        src = r.choice(CLIENTS)
        dst, dp = r.choice(DESTS)
        sp = r.choice([40001, 40002, 40003, 40004, 40005, 40006, 50000])
        proto = r.choice([6, 6, 17])
    load = r.choice([b"", b"x", b"hello world", bytes(range(200))])
    if proto == 6:
        p = tcp(r.choice(TCP_FLAGS), src=src, dst=dst, sport=sp, dport=dp, load=load)
    else:
        p = udp(src=src, dst=dst, sport=sp, dport=dp, load=load,
                chksum=0 if r.random() < 0.1 else None)
    return bytes(p)


def ip_str(n):
    return ".".join(str(b) for b in n.to_bytes(4, "big"))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_traffic_same_bytes(seed):
    r = random.Random(seed)
    dps = [dataplane(m, max_flows=8, port_range=(40000, 40005), seed=seed)
           for m in (_fastpath, refpath)]
    now = T0
    for i in range(2500):
        now += r.choice([0] * 30 + [1, 2, 7, 31, 65])
        if r.random() < 0.03:
            budget = r.randint(1, 30)
            assert dps[0].expire(now, budget) == dps[1].expire(now, budget)
            continue
        if r.random() < 0.01:
            proto, b = r.choice([6, 17]), r.choice(BACKENDS)
            assert dps[0].delete_flows(proto, ip(b)) == dps[1].delete_flows(proto, ip(b))
        raw = _random_packet(r, dps[1].flows(now))
        mutated = r.random() < 0.05
        if mutated:
            b = bytearray(raw)
            b[r.randrange(len(b))] = r.randrange(256)
            raw = bytes(b[:r.randint(0, len(b))]) if r.random() < 0.3 else bytes(b)
        c, ref = dps[0].process(raw, now), dps[1].process(raw, now)
        assert c == ref, f"packet {i}: {raw.hex()}\nfastpath {c}\nrefpath  {ref}"
        if c[2] is not None and not mutated:
            verify_checksums(c[2])
        if i % 100 == 0:
            assert dps[0].flows(now) == dps[1].flows(now)
    assert dps[0].counters() == dps[1].counters()
    assert dps[0].flows(now) == dps[1].flows(now)
    c = dps[0].counters()
    # the run went through the interesting paths
    assert c["flows_evicted"] and c["rejects"] and c["flows_expired"], c
    assert all(c["drops_by_reason"][k] for k in ("malformed", "not_syn", "spoofed", "no_service"))


# --- fuzz: malformed input never crashes either and both agree ------------------------

_BASES = [bytes(p) for p in (
    tcp("S"), tcp("PA", load=b"data"), udp(), udp(dst=VIP_NOEP),
    tcp("S", options=[]), IP(dst=VIP, ihl=6, options=b"\x01\x01\x01\x00") / TCP(dport=80),
)]


@st.composite
def _mutated(draw):
    b = bytearray(draw(st.sampled_from(_BASES)))
    for _ in range(draw(st.integers(0, 4))):
        b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
    return bytes(b[:draw(st.integers(0, len(b)))])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pkt=st.one_of(st.binary(max_size=80), _mutated()))
def test_fuzz_same_verdicts(pkt):
    dps = [dataplane(m, max_flows=8) for m in (_fastpath, refpath)]
    for now in (T0, T0):
        assert dps[0].process(pkt, now) == dps[1].process(pkt, now)
    assert dps[0].counters() == dps[1].counters()
    assert dps[0].flows(T0) == dps[1].flows(T0)
