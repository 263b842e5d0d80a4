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
from scapy.layers.inet import ICMP, IP, TCP, UDP

from engine import _fastpath, model, refpath
from packets import (BACKENDS, CLIENT, FIXTURES, LB_IP, MASQ, NODE, OUTSIDE, T0,
                     UNALLOCATED, VIP, VIP_MULTI, VIP_NOEP, VIP_ONE, VIP_TWO,
                     as_partial, default_tables, golden_steps, ip, load_golden, run_fixture, tcp, udp,
                     verify_checksums, verify_partial)

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


GOLDEN = load_golden()
REGENERATE = "python3 -m tests.unit.packets --write-golden (see tests/unit/packets.py)"


@pytest.mark.parametrize("fx", FIXTURE_PARAMS)
@pytest.mark.parametrize("mod", MODULES)
def test_fixture_golden_bytes(mod, fx):
    """Every step gives the golden output bytes (golden_outputs.json): the
    fast path and the reference are each held to stored bytes, so a drift
    made in both at once is caught too."""
    assert fx.id in GOLDEN, f"no golden outputs for {fx.id}: {REGENERATE}"
    want = GOLDEN[fx.id]
    got = golden_steps(mod, fx)
    assert len(got) == len(want), f"{fx.id}: {len(got)} steps, golden has {len(want)}: {REGENERATE}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.get("in") == w.get("in") and g.get("action") == w.get("action"), \
            f"{fx.id} step {i}: the fixture's input changed: {REGENERATE}"
        assert g == w, f"{fx.id} step {i}: {mod.__name__} output differs from the golden bytes"


def test_golden_outputs_are_current():
    """No golden outputs of a fixture that is gone."""
    assert set(GOLDEN) == {fx.id for fx in FIXTURES}, REGENERATE


def test_vocabulary_is_model_s():
    """The schedulers and protocol numbers compiled into the fast path (its
    C enums) and the reference's are engine/model.py's, in its order."""
    want = {name: i for i, name in enumerate(model.SCHEDULERS)}
    assert _fastpath.SCHEDULER_IDS == refpath.SCHEDULER_IDS == model.SCHEDULER_IDS == want
    assert list(_fastpath.SCHEDULER_IDS) == list(model.SCHEDULERS)
    assert _fastpath.PROTOCOLS == refpath.PROTOCOLS == model.PROTOCOLS
    assert _fastpath.PROTO_NAMES == refpath.PROTO_NAMES == model.PROTO_NAMES
    assert refpath.PROTO_ICMP == model.PROTO_ICMP


def test_exported_names_match():
    for name in ("DROP_REASONS", "COUNTERS", "SERVICE_COUNTERS", "STATE_NAMES",
                 "DEFAULT_TIMEOUTS", "MAGLEV_SIZE", "SCHEDULER_IDS", "PROTOCOLS", "PROTO_NAMES"):
        assert getattr(refpath, name) == getattr(_fastpath, name), name
    for cls in ("Dataplane", "Tables"):
        public = {n for n in dir(getattr(_fastpath, cls)) if not n.startswith("_")}
        public -= {"queue_packets"}             # TUN I/O: the C module's alone
        missing = public - set(dir(getattr(refpath, cls)))
        assert not missing, f"refpath.{cls} lacks {missing}"
    assert callable(refpath.maglev_table) and callable(refpath.monotonic)
    # the reference stands alone: standard library imports only
    tree = ast.parse(open(refpath.__file__).read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"copy", "struct", "time"}, imported


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
    dp = mod.Dataplane(ip(MASQ), max_flows=4, max_services=8, max_backends=16, affinity_size=3)
    assert dp.service_counters([0, 7]) == {i: dict.fromkeys(mod.SERVICE_COUNTERS, 0) for i in (0, 7)}
    with pytest.raises(ValueError):
        dp.service_counters([8])
    with pytest.raises(ValueError):
        dp.service_counters([-1])
    assert dp.active_flows(15) == 0
    with pytest.raises(ValueError):
        dp.active_flows(16)
    with pytest.raises(OverflowError):
        dp.active_flows(-1)
    with pytest.raises(ValueError):                  # Maglev: 65534 backends at most
        mod.Tables([dict(svc, scheduler=4, backends=[(ip("10.244.0.0") + i, 80) for i in range(65535)])])
    with pytest.raises(ValueError):
        mod.maglev_table([])


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


@pytest.mark.parametrize("mod", MODULES)
def test_partial_checksum(mod):
    """CHECKSUM_PARTIAL input (what test_offload checks on the fast path):
    the L4 field tracks the address change only, both ways, no UDP-zero rule."""
    dp = dataplane(mod)
    for p in (tcp("S", load=b"x" * 1000), udp(load=b"q" * 77)):
        verdict, _, out = dp.process(as_partial(p), T0, partial=True)
        assert verdict == "forward"
        verify_partial(out)
        o = IP(out)
        back = (IP(src=o.dst, dst=o.src) / (TCP(sport=o.dport, dport=o.sport, flags="SA")
                                             if o.proto == 6 else UDP(sport=o.dport, dport=o.sport)))
        verdict, _, out2 = dp.process(as_partial(back), T0, partial=True)
        assert verdict == "forward" and IP(out2).src == VIP
        verify_partial(out2)
    # the same packet without partial: a full incremental update, valid checksums
    _, _, out = dp.process(bytes(udp(sport=40009)), T0)
    verify_checksums(out)


def test_partial_same_bytes():
    """Partial mode on any field value, including 0 in UDP (no zero rule)."""
    dps = [dataplane(m) for m in (_fastpath, refpath)]
    r = random.Random(5)
    for i in range(300):
        p = bytearray(bytes(tcp("S", sport=1000 + i) if i % 2 else udp(sport=1000 + i)))
        off = 20 + (16 if p[9] == 6 else 6)
        p[off:off + 2] = r.choice([b"\0\0", b"\xff\xff", r.randbytes(2)])
        outs = [dp.process(bytes(p), T0, partial=True) for dp in dps]
        assert outs[0] == outs[1], i
    assert dps[0].flows(T0) == dps[1].flows(T0)


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


def _housekeeping(r, dps, now):
    """One random step of the differential runs before a packet: time moves
    on; now and then an expiry sweep (returns swept=True: no packet this
    step) or a stale-UDP style deletion, checked equal on both paths."""
    now += r.choice([0] * 30 + [1, 2, 7, 31, 65])
    if r.random() < 0.03:
        budget = r.randint(1, 30)
        assert dps[0].expire(now, budget) == dps[1].expire(now, budget)
        return now, True
    if r.random() < 0.01:
        proto, b = r.choice([6, 17]), r.choice(BACKENDS)
        assert dps[0].delete_flows(proto, ip(b)) == dps[1].delete_flows(proto, ip(b))
    return now, False


def ip_str(n):
    return ".".join(str(b) for b in n.to_bytes(4, "big"))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_traffic_same_bytes(seed):
    r = random.Random(seed)
    dps = [dataplane(m, max_flows=8, port_range=(40000, 40005), seed=seed)
           for m in (_fastpath, refpath)]
    now = T0
    for i in range(2500):
        now, swept = _housekeeping(r, dps, now)
        if swept:
            continue
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


@pytest.mark.parametrize("seed", [4, 5])
def test_random_traffic_in_batches(seed):
    """process_batch hashes a batch ahead (the prefetch stage) and hands each
    hash to the lookup: it must decide as packet-at-a-time does, with flows
    opened and closed inside one batch, malformed packets among them, and
    the stage on or off."""
    r = random.Random(seed)
    dps = [dataplane(m, max_flows=64, port_range=(40000, 40030), seed=seed, batch=32)
           for m in (_fastpath, _fastpath, refpath)]
    dps[1].batch_prefetch = False
    now = T0
    for i in range(300):
        now += r.choice([0] * 10 + [1, 7, 65])
        pkts = []
        for _ in range(r.randint(1, 32)):
            raw = _random_packet(r, dps[2].flows(now))
            if r.random() < 0.05:
                raw = raw[:r.randint(0, len(raw))]
            pkts.append(raw)
        fwd = [dp.process_batch(pkts, now) for dp in dps]
        assert fwd[0] == fwd[1] == fwd[2], i
        assert dps[0].flows(now) == dps[1].flows(now) == dps[2].flows(now), i
    c = dps[0].counters()
    assert c == dps[1].counters() == dps[2].counters()
    assert c["flows_created"] > 50 and c["drops_by_reason"]["not_syn"], c


@pytest.mark.parametrize("queues", [2, 3])
def test_masquerade_ports_follow_steering(queues):
    """With tun_queues = q, each flow's masquerade port is congruent to the
    client's port modulo q (so the steering program sends both directions
    to one queue), on both paths alike, down to the last free port; past
    it, a new flow reclaims a half-open flow's port of the same residue."""
    dps = [dataplane(m, port_range=(40000, 40011)) for m in (_fastpath, refpath)]
    for dp in dps:
        dp.tun_queues = queues
    for sport in range(1024, 1024 + 14):
        outs = [dp.process(bytes(tcp("S", dst=VIP_ONE, sport=sport)), T0) for dp in dps]     # one backend
        assert outs[0] == outs[1]
        assert outs[0][0] == "forward"      # 12 ports, 12 / q per residue: the rest reclaim
        masq_port = IP(outs[0][2])[TCP].sport
        assert masq_port % queues == sport % queues and 40000 <= masq_port <= 40011
    assert dps[0].counters() == dps[1].counters()
    # per residue r: as many flows as there are masquerade ports r (mod q)
    clients, masq = range(1024, 1024 + 14), range(40000, 40012)
    expect = sum(min(sum(p % queues == r for p in masq), sum(c % queues == r for c in clients))
                 for r in range(queues))
    c = dps[0].counters()
    assert c["flows"] == expect < 14 and c["flows_evicted"] == 14 - expect, c


def varied_tables(seed):
    """The default topology with a scheduler (random, rr, lc, sh, mh), session
    affinity on some service ports, and stable ids that are not indexes."""
    r = random.Random(seed)
    kw = default_tables()
    for i, s in enumerate(kw["services"]):
        s["scheduler"] = r.randrange(5)
        s["id"] = 3 * i + 1
        if r.random() < 0.5:
            s["affinity_timeout"] = r.choice([1, 5, 40])
        s["backends"] = [(a, p, 1000 + 7 * i + j) for j, (a, p) in enumerate(s["backends"])]
    return kw


ICMP_SOURCES = [CLIENT, "10.0.0.2", BACKENDS[0], BACKENDS[1], "10.244.9.1"]


def _random_icmp(r, recent):
    if not recent or r.random() < 0.25:
        typ = r.choice([8, 8, 8, 0, 13])
        return bytes(IP(src=r.choice(CLIENTS), dst=r.choice(DESTS)[0])
                     / ICMP(type=typ, code=r.choice([0, 0, 0, 1]), id=r.randrange(65536), seq=1)
                     / r.choice([b"", b"ping", bytes(100)]))
    quoted = r.choice(recent)
    q = quoted[:r.choice([0, 8, 20, 27, 28, 36, 37, 38, 48, len(quoted)])]
    typ = r.choice([3, 3, 11, 12, 5])
    src = r.choice(ICMP_SOURCES + [IP(quoted).dst])
    dst = r.choice([MASQ, IP(quoted).src, VIP, OUTSIDE])
    return bytes(IP(src=src, dst=dst) / ICMP(type=typ, code=r.choice([0, 1, 3, 4])) / q)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_random_traffic_varied_same_bytes(seed):
    """Schedulers, session affinity (a tiny table: victims), stable ids, ICMP
    echo and errors quoting earlier outputs, CHECKSUM_PARTIAL input: the two
    agree on every byte, counter, per-service counter and active-flow count."""
    r = random.Random(seed)
    kw = varied_tables(seed)
    dps = [m.Dataplane(ip(MASQ), tables=m.Tables(**kw), max_flows=12, port_range=(40000, 40009),
                       seed=seed, affinity_size=16, max_services=64, max_backends=2048)
           for m in (_fastpath, refpath)]
    ids = sorted({s["id"] for s in kw["services"]})
    bids = sorted({b[2] for s in kw["services"] for b in s["backends"]})
    recent = []
    now = T0
    for i in range(2500):
        now, swept = _housekeeping(r, dps, now)
        if swept:
            continue
        if r.random() < 0.005:      # a new generation: rr cursors restart, affinity stays
            for d, m in zip(dps, (_fastpath, refpath)):
                d.swap(m.Tables(**kw))
        partial = False
        if r.random() < 0.2:
            raw = _random_icmp(r, recent)
        else:
            raw = _random_packet(r, dps[1].flows(now))
            if r.random() < 0.15:
                raw, partial = as_partial(IP(raw)), True
        mutated = r.random() < 0.03
        if mutated:
            b = bytearray(raw)
            b[r.randrange(len(b))] = r.randrange(256)
            raw = bytes(b)
        c, ref = dps[0].process(raw, now, partial=partial), dps[1].process(raw, now, partial=partial)
        assert c == ref, f"packet {i}: {raw.hex()}\nfastpath {c}\nrefpath  {ref}"
        if c[2] is not None and not mutated and not partial:
            verify_checksums(c[2])
            recent = (recent + [c[2]])[-20:]
        if i % 100 == 0:
            assert dps[0].flows(now) == dps[1].flows(now)
            assert dps[0].service_counters(ids) == dps[1].service_counters(ids)
            assert [dps[0].active_flows(b) for b in bids] == [dps[1].active_flows(b) for b in bids]
    assert dps[0].counters() == dps[1].counters()
    assert dps[0].flows(now) == dps[1].flows(now)
    assert dps[0].service_counters(ids) == dps[1].service_counters(ids)
    active = [dps[0].active_flows(b) for b in bids]
    assert active == [dps[1].active_flows(b) for b in bids]
    assert sum(active) <= dps[0].counters()["flows"]     # closing TCP flows do not count
    per = dps[0].service_counters(ids)
    assert all(sum(v[k] for v in per.values()) for k in ("packets", "flows", "rejects", "denied"))


def _flow_mix(dp, r, now):
    """Flows in every state (and some expired) on a dataplane over varied_tables."""
    for i in range(40):
        sport = 30000 + i
        if i % 3:
            out = dp.process(bytes(tcp("S", sport=sport)), now)[2]
            o = IP(out)
            for flags, frm in r.sample([("SA", 1), ("A", 0), ("FA", 0), ("FA", 1), ("R", 1)],
                                       r.randint(0, 4)):
                pkt = (tcp(flags, sport=sport) if frm == 0 else
                       IP(src=o.dst, dst=o.src) / TCP(sport=o[TCP].dport, dport=o[TCP].sport, flags=flags))
                dp.process(bytes(pkt), now)
        else:
            out = dp.process(bytes(udp(sport=sport, dst=r.choice([VIP, VIP_ONE, VIP_TWO]))), now)[2]
            if r.random() < 0.5:
                o = IP(out)
                dp.process(bytes(IP(src=o.dst, dst=o.src) / UDP(sport=o[UDP].dport, dport=o[UDP].sport)), now)
        now += r.choice([0, 1, 5])
    return now


def test_export_import_same_bytes():
    """export_flows() gives the same records on both; either one's snapshot
    imports into either with the same flows, active counts and later bytes."""
    kw = varied_tables(4)
    dps = [m.Dataplane(ip(MASQ), tables=m.Tables(**kw), max_flows=64, max_services=64,
                       max_backends=2048) for m in (_fastpath, refpath)]
    nows = [_flow_mix(dp, random.Random(4), T0) for dp in dps]
    assert nows[0] == nows[1]
    now = nows[0] + 10
    snaps = [dp.export_flows(now) for dp in dps]
    assert snaps[0] == snaps[1]
    assert len(snaps[0]) == _fastpath.ENTRY_BYTES * len(dps[0].flows(now)) == refpath.ENTRY_BYTES * len(dps[0].flows(now))
    bids = sorted({b[2] for s in kw["services"] for b in s["backends"]})
    svc_map = {s["id"]: s["id"] + 1 for s in kw["services"][::2]}
    bk_map = {b: b - 1000 for b in bids[::2]}
    results = []
    for src in snaps:
        for m in (_fastpath, refpath):
            dp = m.Dataplane(ip(MASQ), tables=m.Tables(**kw), max_flows=64, max_services=40,
                             max_backends=2048)
            dp.process(bytes(udp(sport=30001)), now + 100)          # a clash: skipped
            taken = dp.import_flows(src, now + 100, svc_ids=svc_map, backend_ids=bk_map, elapsed=3)
            later = [dp.process(bytes(p), now + 101) for p in
                     (tcp("A", sport=30001), tcp("FA", sport=30002), udp(sport=30003), tcp("S", sport=30004))]
            results.append((taken, dp.flows(now + 100), [dp.active_flows(b) for b in range(2048)],
                            later, dp.counters(), dp.export_flows(now + 100)))
    assert all(r == results[0] for r in results[1:])
    assert results[0][0] > 10
    for m in (_fastpath, refpath):
        dp = m.Dataplane(ip(MASQ), max_flows=4)
        with pytest.raises(ValueError):
            dp.import_flows(snaps[0][:-1])
        junk = bytearray(snaps[0][:3 * 48])
        junk[44] = 77                                               # state out of range
        junk[48 + 12] = 1                                           # ICMP
        assert dp.import_flows(bytes(junk), now) == 1
        assert dp.import_flows(snaps[0], now) == 3                  # room for three more only


@pytest.mark.parametrize("mod", MODULES)
def test_import_refuses_ids_out_of_range(mod):
    """A snapshot record whose id maps out of range (a backend id >=
    max_backends, a negative or too large service-port id, not an int) is
    refused and counted, on both; an unknown id still maps to the defaults
    (the last service-port id, no backend)."""
    src = mod.Dataplane(ip(MASQ), tables=mod.Tables(**default_tables()), max_flows=16)
    for sport in (30001, 30002, 30003, 30004, 30005, 30006):
        assert src.process(bytes(tcp("S", sport=sport)), T0)[0] == "forward"
    snap = src.export_flows(T0)
    E = mod.ENTRY_BYTES
    recs = [snap[k:k + E] for k in range(0, len(snap), E)]
    ids = [(f["svc"], f["backend"]) for f in src.flows(T0)]        # export_flows' order
    cases = [({}, {ids[0][1]: 16}), ({}, {ids[1][1]: -1}), ({ids[2][0]: -1}, {}), ({ids[3][0]: 8}, {}),
             ({ids[4][0]: "3"}, {}), ({}, {ids[5][1]: 2.0})]
    for rec, (svc_ids, backend_ids) in zip(recs, cases):
        dp = mod.Dataplane(ip(MASQ), max_flows=16, max_services=8, max_backends=16)
        assert dp.import_flows(rec, T0, svc_ids=svc_ids, backend_ids=backend_ids) == 0, (svc_ids, backend_ids)
        assert dp.counters()["flows_refused"] == 1 and dp.counters()["flows"] == 0
        assert dp.active_flows(15) == 0
    dp = mod.Dataplane(ip(MASQ), max_flows=16, max_services=8, max_backends=16)
    assert dp.import_flows(recs[0], T0, svc_ids={}, backend_ids={ids[0][1]: 15}) == 1
    assert dp.import_flows(recs[1], T0, svc_ids={ids[1][0]: 7}, backend_ids={}) == 1
    assert dp.counters()["flows_refused"] == 0
    got = {f["orig"][1]: (f["svc"], f["backend"]) for f in dp.flows(T0)}
    assert got == {30001: (7, 15), 30002: (7, 0xffffffff)}
    assert dp.active_flows(15) == 1


def test_export_spans_lock_chunks():
    """export_flows walks the table a chunk at a time (the lock is let go in
    between): every flow of a table several chunks long is in the snapshot,
    once, and imports whole."""
    n = 3 * _fastpath.EXPORT_CHUNK_FLOWS + 123
    dp = _fastpath.Dataplane(ip(MASQ), tables=_fastpath.Tables(**default_tables()), max_flows=n + 7, batch=64)
    clients = {(f"10.{1 + i // 60000}.{i // 250 % 240}.{1 + i % 250}", 1024 + i % 60000) for i in range(n)}
    template = bytearray(bytes(tcp("S")))          # scapy is slow: patch source and port in
    syns = []
    for a, p in sorted(clients):
        template[12:16] = bytes(int(x) for x in a.split("."))
        template[20:22] = struct.pack("!H", p)
        syns.append(bytes(template))
    for i in range(0, len(syns), 64):
        assert dp.process_batch(syns[i:i + 64], T0) == len(syns[i:i + 64])
    snap = dp.export_flows(T0 + 1)
    E = _fastpath.ENTRY_BYTES
    keys = {snap[k:k + 4] + snap[k + 8:k + 10] for k in range(0, len(snap), E)}      # saddr, sport
    assert len(snap) == len(clients) * E and len(keys) == len(clients)
    fresh = _fastpath.Dataplane(ip(MASQ), tables=_fastpath.Tables(**default_tables()), max_flows=n + 7)
    assert fresh.import_flows(snap, T0 + 1) == len(clients)
    assert len(fresh.export_flows(T0 + 1)) == len(snap)


# --- fuzz: malformed input never crashes either and both agree ------------------------

_BASES = [bytes(p) for p in (
    tcp("S"), tcp("PA", load=b"data"), udp(), udp(dst=VIP_NOEP),
    tcp("S", options=[]), IP(dst=VIP, ihl=6, options=b"\x01\x01\x01\x00") / TCP(dport=80),
    IP(src=CLIENT, dst=VIP) / ICMP(type=8) / b"ping",
    IP(src=BACKENDS[0], dst=MASQ) / ICMP(type=3, code=3) / bytes(udp(src=MASQ, dst=BACKENDS[0], sport=1024, dport=5353)),
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
