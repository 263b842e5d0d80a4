"""Schedulers (random, rr, lc, sh, mh), session affinity, per-service counters
and the id limits, against the Cython fast path and the Python reference.

Most tests run on both modules; where one picks a backend by hash the two are
also compared directly (same backend for the same key).
"""
import random
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.packet import Raw

from engine import _fastpath, refpath
from engine.lab.packets import csum
from packets import MASQ, T0, ip

MODULES = [pytest.param(_fastpath, id="fastpath"), pytest.param(refpath, id="refpath")]
RANDOM, RR, LC, SH, MH = range(5)

VIP = "10.96.0.10"
CLIENT = "10.0.0.1"
BACKENDS = [f"10.244.{i // 250}.{i % 250 + 1}" for i in range(10)]


def service(name="s", vip=VIP, port=53, proto=17, backends=BACKENDS[:3], bport=5353,
            scheduler=RANDOM, **kw):
    d = dict(name=name, vip=ip(vip), port=port, proto=proto, scheduler=scheduler,
             backends=[(ip(b), bport) if isinstance(b, str) else b for b in backends])
    d.update(kw)
    return d


def make(mod, *services, **dpkw):
    services = services or (service(),)
    t = mod.Tables(list(services), vips=sorted({s["vip"] for s in services if s["vip"]}),
                   drop_cidrs=[(ip("10.96.0.0"), 12)])
    dpkw.setdefault("max_flows", 4096)
    return mod.Dataplane(ip(MASQ), tables=t, **dpkw)


def udp_raw(src, sport, dst=VIP, dport=53):
    """A minimal UDP datagram (checksum 0: none), fast to build in bulk."""
    h = bytearray(struct.pack("!BBHHHBBHII", 0x45, 0, 28, 0, 0, 64, 17, 0,
                              src if isinstance(src, int) else ip(src), ip(dst)))
    struct.pack_into("!H", h, 10, csum(h))
    return bytes(h) + struct.pack("!HHHH", sport, dport, 8, 0)


def new_flow(dp, src=CLIENT, sport=40000, now=T0, dst=VIP, dport=53, tcp=False):
    """Opens a flow; returns the backend address (dotted) it went to."""
    if tcp:
        pkt = bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S"))
    else:
        pkt = udp_raw(src, sport, dst, dport)
    verdict, reason, out = dp.process(pkt, now)
    assert verdict == "forward", (verdict, reason)
    return IP(out).dst


def reply(dp, flow_out, flags, now=T0, load=b""):
    """The backend's packet on the flow whose forwarded packet was flow_out."""
    o = IP(flow_out)
    p = IP(src=o.dst, dst=o.src) / TCP(sport=o[TCP].dport, dport=o[TCP].sport, flags=flags)
    return dp.process(bytes(p / Raw(load) if load else p), now)


# --- hashing primitives ------------------------------------------------------------

def test_mix64_is_splitmix64():
    # splitmix64's first output for seed 0 is the finalizer of the golden gamma
    assert refpath.mix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF
    assert refpath.mix64(0) == 0
    assert refpath.mix64(1 << 64 | 5) == refpath.mix64(5)      # 64-bit arithmetic


@pytest.mark.parametrize("n,size", [(1, 2), (1, 7), (2, 3), (3, 13), (10, 101), (7, 65537),
                                    (10, 65537), (100, 65537), (20, 7)])
def test_maglev_table_same(n, size):
    r = random.Random(n * 1000 + size)
    bs = [(r.getrandbits(32), r.getrandbits(16)) for _ in range(n)]
    ring = refpath.maglev_table(bs, size)
    assert ring == _fastpath.maglev_table(bs, size)
    assert len(ring) == size
    if n <= size:                               # each backend claims in turn
        counts = [ring.count(i) for i in range(n)]
        assert max(counts) - min(counts) <= 1, counts


@pytest.mark.parametrize("mod", MODULES)
def test_maglev_table_arguments(mod):
    with pytest.raises(ValueError):
        mod.maglev_table([])
    with pytest.raises(ValueError):
        mod.maglev_table([(1, 1, 1)])           # (addr, port) pairs only
    with pytest.raises(OverflowError):
        mod.maglev_table([(1, 1)], -1)
    assert mod.maglev_table([(ip("10.0.0.1"), 80)]) == [0] * mod.MAGLEV_SIZE


def test_maglev_table_sizes_the_c_code_cannot_fill():
    """Size 0 or 1 divides by zero in the C code (SIGFPE with cdivision) and a
    non-prime size can leave a backend's walk without a free slot, so the C
    loop never ends; the reference refuses both (not run against C)."""
    for size in (0, 1):
        with pytest.raises(ValueError):
            refpath.maglev_table([(1, 2)], size)
    stuck = [(3667190760, 20194), (1080542040, 39711), (911472861, 39767), (153478260, 38089)]
    with pytest.raises(ValueError):
        refpath.maglev_table(stuck, 12)


# --- rr -----------------------------------------------------------------------------

@pytest.mark.parametrize("mod", MODULES)
def test_rr_cycles_backends_in_order(mod):
    dns = service(backends=BACKENDS[:3], scheduler=RR)
    web = service("web", port=80, proto=6, backends=BACKENDS[3:5], bport=8080, scheduler=RR)
    dp = make(mod, dns, web)
    got = [new_flow(dp, sport=41000 + i) for i in range(9)]
    assert got == BACKENDS[:3] * 3
    # packets of a tracked flow and another service's flows leave the cursor alone
    assert dp.process(udp_raw(CLIENT, 41000), T0)[0] == "forward"
    assert [new_flow(dp, sport=42000 + i, dport=80, tcp=True) for i in range(3)] == \
        [BACKENDS[3], BACKENDS[4], BACKENDS[3]]
    assert [new_flow(dp, sport=43000 + i) for i in range(4)] == BACKENDS[:3] + BACKENDS[:1]
    # a new generation starts over
    dp.swap(mod.Tables([dns, web], vips=[ip(VIP)]))
    assert [new_flow(dp, sport=44000 + i) for i in range(2)] == BACKENDS[:2]


# --- lc -----------------------------------------------------------------------------

def _active(dp, n=3, base=0):
    return [dp.active_flows(base + i) for i in range(n)]


@pytest.mark.parametrize("mod", MODULES)
def test_lc_new_flow_goes_to_fewest(mod):
    """Each new flow goes to a backend with the fewest tracked flows, also
    after some go (delete_flows, expiry by sweep, by lookup, eviction)."""
    r = random.Random(3)
    dp = make(mod, service(backends=BACKENDS[:4], scheduler=LC), max_flows=40,
              timeouts={"UNREPLIED": 10})
    now = T0
    sport = 20000
    for step in range(300):
        op = r.random()
        if op < 0.05:
            dp.delete_flows(17, ip(r.choice(BACKENDS[:4])))
        elif op < 0.10:
            dp.expire(now, r.randint(1, 40))
        else:
            before = _active(dp, 4)
            sport += 1
            b = new_flow(dp, sport=sport, now=now)
            i = BACKENDS.index(b)
            # eviction or a lookup of an expired flow may free one first; both
            # happen after scheduling only for eviction, so allow for it
            assert before[i] == min(before), (step, before, b)
        if r.random() < 0.3:
            now += r.choice([1, 2, 5])
        # the counts are the live entries per backend
        live = [0] * 4
        for f in dp.flows(0):
            live[f["backend"]] += 1
        assert _active(dp, 4) == live


@pytest.mark.parametrize("mod", MODULES)
def test_lc_rebalances_after_delete_and_expiry(mod):
    dp = make(mod, service(backends=BACKENDS[:3], scheduler=LC))
    for i in range(6):
        new_flow(dp, sport=45000 + i)
    assert _active(dp) == [2, 2, 2]
    assert dp.delete_flows(17, ip(BACKENDS[1])) == 2
    assert _active(dp) == [2, 0, 2]
    assert [new_flow(dp, sport=45100 + i) for i in range(2)] == [BACKENDS[1]] * 2
    # refresh the flows on backend 1; the others expire (UNREPLIED: 30 s)
    for f in dp.flows(T0):
        if f["reply"][0] == ip(BACKENDS[1]):
            assert dp.process(udp_raw(CLIENT, f["orig"][1]), T0 + 20)[0] == "forward"
    assert dp.expire(T0 + 31) == 4
    assert _active(dp) == [0, 2, 0]
    got = [new_flow(dp, sport=45200 + i, now=T0 + 31) for i in range(4)]
    assert sorted(got) == sorted([BACKENDS[0], BACKENDS[0], BACKENDS[2], BACKENDS[2]])
    assert _active(dp) == [2, 2, 2]


@pytest.mark.parametrize("mod", MODULES)
def test_lc_lazy_expiry_and_eviction_decrement(mod):
    dp = make(mod, service(backends=BACKENDS[:1], scheduler=LC), max_flows=2)
    new_flow(dp, sport=1)
    new_flow(dp, sport=2)
    assert _active(dp, 1) == [2]
    # a lookup of an expired flow removes it (and a new flow takes its place)
    new_flow(dp, sport=1, now=T0 + 31)
    assert dp.counters()["flows_expired"] == 1 and _active(dp, 1) == [2]
    # the table is full: a new flow evicts the expired (sport 2) entry
    new_flow(dp, sport=3, now=T0 + 31)
    assert dp.counters()["flows_evicted"] == 1 and _active(dp, 1) == [2]
    assert dp.expire(T0 + 100) == 2 and _active(dp, 1) == [0]


@pytest.mark.parametrize("mod", MODULES)
def test_lc_closing_tcp_flows_do_not_count(mod):
    """As IPVS's ActiveConn: a flow in TIME_WAIT or CLOSE is still tracked
    but no longer counts for its backend."""
    dp = make(mod, service(port=80, proto=6, backends=BACKENDS[:3], bport=8080, scheduler=LC))
    outs = {}
    for i in range(3):
        p = bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=46000 + i, dport=80, flags="S"))
        out = dp.process(p, T0)[2]
        outs[IP(out).dst] = (46000 + i, out)
    assert sorted(outs) == sorted(BACKENDS[:3]) and _active(dp) == [1, 1, 1]
    # backend 0's connection closes: FIN both ways -> TIME_WAIT
    sport, out = outs[BACKENDS[0]]
    assert reply(dp, out, "SA")[0] == "forward"
    for flags in ("A", "FA"):
        dp.process(bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=80, flags=flags)), T0)
    assert reply(dp, out, "FA")[0] == "forward"
    states = {f["reply"][0]: f["state"] for f in dp.flows(T0)}
    assert states[ip(BACKENDS[0])] == "TIME_WAIT"
    assert _active(dp) == [0, 1, 1]
    # backend 2's connection is reset: CLOSE
    sport, out = outs[BACKENDS[2]]
    assert reply(dp, out, "R")[0] == "forward"
    assert _active(dp) == [0, 1, 0]
    got = {new_flow(dp, sport=46100 + i, dport=80, tcp=True) for i in range(2)}
    assert got == {BACKENDS[0], BACKENDS[2]}
    assert _active(dp) == [1, 1, 1]
    # the closing flows go away later without counting twice
    assert dp.expire(T0 + 200) == 5
    assert _active(dp) == [0, 0, 0]


@pytest.mark.parametrize("mod", MODULES)
def test_lc_counts_by_stable_backend_id(mod):
    """Counts follow the stable ids, across services and generations."""
    a = service(backends=[(ip(BACKENDS[0]), 5353, 70), (ip(BACKENDS[1]), 5353, 71)], scheduler=LC)
    b = service("b", port=54, backends=[(ip(BACKENDS[1]), 5353, 71)], scheduler=LC)
    dp = make(mod, a, b, max_backends=72)
    for i in range(3):
        assert new_flow(dp, sport=47000 + i, dport=54) == BACKENDS[1]
    assert dp.active_flows(71) == 3 and dp.active_flows(70) == 0
    # service a sees backend 71 busy through service b's flows
    assert [new_flow(dp, sport=47100 + i) for i in range(3)] == [BACKENDS[0]] * 3
    assert {f["backend"] for f in dp.flows(T0)} == {70, 71}
    # a new generation with the ids kept: the counts carry over
    dp.swap(mod.Tables([a, b], vips=[ip(VIP)]))
    assert (dp.active_flows(70), dp.active_flows(71)) == (3, 3)
    assert dp.delete_flows(17, ip(BACKENDS[0])) == 3
    assert new_flow(dp, sport=47200) == BACKENDS[0]


# --- sh -----------------------------------------------------------------------------

@pytest.mark.parametrize("mod", MODULES)
def test_sh_one_client_one_backend(mod):
    dp = make(mod, service(backends=BACKENDS[:4], scheduler=SH),
              service("web", port=80, proto=6, backends=BACKENDS[:4], bport=8080, scheduler=SH),
              seed=1)
    other = make(mod, service(backends=BACKENDS[:4], scheduler=SH), seed=99)
    seen = set()
    for c in range(40):
        src = f"10.1.{c}.{c + 1}"
        got = {new_flow(dp, src=src, sport=1024 + 97 * i) for i in range(8)}
        assert len(got) == 1, (src, got)
        # the other protocol (same backend list) and another dataplane agree
        assert new_flow(dp, src=src, sport=5, dport=80, tcp=True) in got
        assert new_flow(other, src=src, sport=7) in got
        seen |= got
    assert seen == set(BACKENDS[:4])


# --- mh -----------------------------------------------------------------------------

def _mh_map(mod, backends, keys, scheduler=MH):
    dp = make(mod, service(backends=backends, scheduler=scheduler), max_flows=len(keys) + 1)
    out = {}
    for saddr, sport in keys:
        verdict, _, pkt = dp.process(udp_raw(saddr, sport), T0)
        assert verdict == "forward"
        out[saddr, sport] = pkt[16:20]
    return out


@pytest.fixture(scope="module")
def mh_keys():
    r = random.Random(2024)
    keys = set()
    while len(keys) < 20000:
        keys.add((ip("10.0.0.0") | r.getrandbits(24), r.randrange(1024, 65536)))
    return sorted(keys)


@pytest.mark.parametrize("mod", MODULES)
def test_mh_same_key_same_backend(mod):
    s = service(backends=BACKENDS[:5], scheduler=MH)
    dps = [make(mod, s, seed=seed) for seed in (1, 2)]
    for i in range(50):
        src, sport = f"10.2.{i}.7", 30000 + 13 * i
        b = new_flow(dps[0], src=src, sport=sport)
        assert new_flow(dps[1], src=src, sport=sport) == b             # any seed
        dps[0].delete_flows(17, ip(b))
        assert new_flow(dps[0], src=src, sport=sport) == b             # again
    dps[0].swap(mod.Tables([s], vips=[ip(VIP)]))                        # a new generation
    for i in range(50):
        src, sport = f"10.2.{i}.7", 30000 + 13 * i
        b = new_flow(dps[1], src=src, sport=sport + 1)
        assert new_flow(dps[0], src=src, sport=sport + 1) == b
    # the port matters: one client spreads over backends
    assert len({new_flow(dps[0], src="10.3.0.1", sport=p) for p in range(2000, 2060)}) == 5


@pytest.mark.parametrize("mod", MODULES)
def test_mh_minimal_disruption_and_spread(mod, mh_keys):
    """Removing 1 of N=10 backends moves only the keys that were on it: of
    the others, fewer than 3% move (random scheduling would move ~90%), and
    each backend gets within 15% of an even share."""
    full = _mh_map(mod, BACKENDS, mh_keys)
    gone = struct.pack("!I", ip(BACKENDS[3]))
    rest = _mh_map(mod, BACKENDS[:3] + BACKENDS[4:], mh_keys)
    stay = [k for k in mh_keys if full[k] != gone]
    moved = sum(full[k] != rest[k] for k in stay)
    assert moved / len(stay) < 0.03, moved / len(stay)
    assert all(rest[k] != gone for k in mh_keys)
    even = len(mh_keys) / len(BACKENDS)
    counts = {b: 0 for b in set(full.values())}
    for b in full.values():
        counts[b] += 1
    assert len(counts) == 10
    assert all(abs(n - even) <= 0.15 * even for n in counts.values()), counts
    # for contrast: random scheduling over the same change moves ~90%
    if mod is _fastpath:
        rfull = _mh_map(mod, BACKENDS, mh_keys, RANDOM)
        rrest = _mh_map(mod, BACKENDS[:3] + BACKENDS[4:], mh_keys, RANDOM)
        rstay = [k for k in mh_keys if rfull[k] != gone]
        assert sum(rfull[k] != rrest[k] for k in rstay) / len(rstay) > 0.8


def test_mh_same_backend_on_both(mh_keys):
    keys = mh_keys[:3000]
    assert _mh_map(_fastpath, BACKENDS[:7], keys) == _mh_map(refpath, BACKENDS[:7], keys)


def test_sh_and_lc_same_on_both():
    for sched in (SH, LC, RR):
        outs = []
        for mod in (_fastpath, refpath):
            dp = make(mod, service(backends=BACKENDS[:6], scheduler=sched), max_flows=64)
            outs.append([dp.process(udp_raw(ip("10.9.0.0") + 7919 * i % 65536, 1000 + i), T0 + i // 50)
                         for i in range(500)])
        assert outs[0] == outs[1], sched


# --- session affinity ---------------------------------------------------------------

@pytest.mark.parametrize("mod", MODULES)
def test_affinity_sticks_until_timeout(mod):
    dp = make(mod, service(backends=BACKENDS[:5], scheduler=RANDOM, affinity_timeout=30))
    b = new_flow(dp, sport=1000)
    # new flows, each within 30 s of the last one: the same backend
    for i in range(1, 20):
        assert new_flow(dp, sport=1000 + i, now=T0 + 25 * i) == b
    last = T0 + 25 * 19
    assert new_flow(dp, sport=2000, now=last + 29) == b
    last += 29
    # other clients spread over the backends, each sticking to its own
    firsts = {}
    for c in range(40):
        src = f"10.5.{c}.1"
        firsts[src] = new_flow(dp, src=src, sport=1, now=last)
        assert new_flow(dp, src=src, sport=2, now=last + 1) == firsts[src]
    assert len(set(firsts.values())) >= 3
    # 30 s after the last new flow the client is scheduled anew: over a few
    # clients, some move
    moved = 0
    for c, src in enumerate(firsts):
        moved += new_flow(dp, src=src, sport=3, now=last + 1 + 30) != firsts[src]
    assert moved > 10


@pytest.mark.parametrize("mod", MODULES)
def test_affinity_timeout_boundary_with_rr(mod):
    """rr makes the move visible: an affinity hit does not advance the
    cursor; at exactly `timeout` seconds after the last new flow the entry
    has expired and the next backend in turn is taken."""
    dp = make(mod, service(backends=BACKENDS[:3], scheduler=RR, affinity_timeout=10))
    assert new_flow(dp, sport=1, now=T0) == BACKENDS[0]
    assert new_flow(dp, sport=2, now=T0 + 9) == BACKENDS[0]       # refreshed: until T0 + 19
    assert new_flow(dp, src="10.0.0.2", sport=1, now=T0 + 9) == BACKENDS[1]
    assert new_flow(dp, sport=3, now=T0 + 18) == BACKENDS[0]
    assert new_flow(dp, sport=4, now=T0 + 28) == BACKENDS[2]      # 10 s after T0 + 18
    assert new_flow(dp, sport=5, now=T0 + 29) == BACKENDS[2]
    # the other client's entry (T0 + 9) has expired too: the cursor goes on
    assert new_flow(dp, src="10.0.0.2", sport=2, now=T0 + 29) == BACKENDS[0]


@pytest.mark.parametrize("mod", MODULES)
def test_affinity_removed_backend_is_not_used(mod):
    s = service(backends=BACKENDS[:4], scheduler=RANDOM, affinity_timeout=100)
    dp = make(mod, s)
    b = new_flow(dp, sport=1)
    assert new_flow(dp, sport=2) == b
    without = dict(s, backends=[x for x in s["backends"] if x[0] != ip(b)])
    dp.swap(mod.Tables([without], vips=[ip(VIP)]))
    b2 = new_flow(dp, sport=3)
    assert b2 != b
    assert {new_flow(dp, sport=4 + i) for i in range(5)} == {b2}     # sticks to the new one
    # the old backend back: the client stays where it is now
    dp.swap(mod.Tables([s], vips=[ip(VIP)]))
    assert new_flow(dp, sport=20) == b2


@pytest.mark.parametrize("mod", MODULES)
def test_affinity_per_service_and_across_generations(mod):
    a = service(backends=BACKENDS[:3], scheduler=RR, affinity_timeout=50, id=1)
    b = service("b", port=54, backends=BACKENDS[:3], scheduler=RR, affinity_timeout=50, id=2)
    dp = make(mod, a, b)
    assert new_flow(dp, sport=1) == BACKENDS[0]
    assert new_flow(dp, src="10.0.0.9", sport=1) == BACKENDS[1]
    assert new_flow(dp, sport=1, dport=54) == BACKENDS[0]           # its own cursor and entry
    assert new_flow(dp, sport=2, dport=54) == BACKENDS[0]
    # the affinity table belongs to the dataplane: a new generation keeps it
    dp.swap(mod.Tables([a, b], vips=[ip(VIP)]))
    assert new_flow(dp, src="10.0.0.9", sport=2, now=T0 + 10) == BACKENDS[1]
    assert new_flow(dp, src="10.0.0.8", sport=2, now=T0 + 10) == BACKENDS[0]   # cursor restarted


@pytest.mark.parametrize("mod", MODULES)
def test_affinity_small_table(mod):
    """A 16-slot table and 200 clients: entries are replaced (oldest first
    among the probed), yet a client's back-to-back flows always stick."""
    dp = make(mod, service(backends=BACKENDS[:5], scheduler=RANDOM, affinity_timeout=1000),
              affinity_size=16)
    for c in range(200):
        src = f"10.7.{c // 200}.{c % 200 + 1}"
        b = new_flow(dp, src=src, sport=1, now=T0 + c)
        assert new_flow(dp, src=src, sport=2, now=T0 + c) == b


def test_affinity_table_same_on_both():
    """The affinity table's probe, victim and expiry rules, held to the C code
    by their effects: a small table, many clients, services with different
    timeouts, time moving on; each packet must come out the same."""
    r = random.Random(8)
    svcs = [service(backends=BACKENDS[:4], scheduler=RANDOM, affinity_timeout=7, id=0),
            service("b", port=54, backends=BACKENDS[2:7], scheduler=RR, affinity_timeout=20, id=1),
            service("c", port=55, backends=BACKENDS[:5], scheduler=LC, affinity_timeout=3, id=2)]
    dps = [make(m, *svcs, affinity_size=16, max_flows=64) for m in (_fastpath, refpath)]
    clients = [ip("10.8.0.1") + 37 * i for i in range(60)]
    now = T0
    for i in range(3000):
        now += r.choice([0, 0, 0, 1, 1, 2, 3])
        pkt = udp_raw(r.choice(clients), 1024 + i % 60000, dport=r.choice([53, 54, 55]))
        outs = [dp.process(pkt, now) for dp in dps]
        assert outs[0] == outs[1], i
    assert dps[0].counters() == dps[1].counters()


# --- per-service counters -------------------------------------------------------------

@pytest.mark.parametrize("mod", MODULES)
def test_service_counters(mod):
    web = service("web", port=80, proto=6, backends=BACKENDS[:2], bport=8080, id=5)
    web_np = dict(web, name="web@node", vip=0, port=30080, nodeport=True)   # same id
    noep = service("noep", vip="10.96.0.11", port=80, proto=6, backends=[], id=6)
    lb = service("lb", vip="10.96.0.12", port=80, proto=6, backends=BACKENDS[2:3], bport=8080,
                 id=8, source_ranges=[(ip("10.0.0.0"), 24)])
    t = mod.Tables([web, web_np, noep, lb], vips=[ip(VIP), ip("10.96.0.11"), ip("10.96.0.12")],
                   node_addrs=[ip("192.168.1.1")])
    dp = mod.Dataplane(ip(MASQ), tables=t, max_flows=16, max_services=9, port_range=(40000, 40001))
    syn = IP(src=CLIENT, dst=VIP) / TCP(sport=1000, dport=80, flags="S")
    out = dp.process(bytes(syn), T0)[2]
    assert reply(dp, out, "SA", load=b"12345")[0] == "forward"
    dp.process(bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=1000, dport=80, flags="A") / b"abc"), T0)
    dp.process(bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=9, dport=80, flags="A")), T0)     # not_syn
    dp.process(bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=9, dport=81, flags="S")), T0)     # unserved
    np = IP(src=CLIENT, dst="192.168.1.1") / TCP(sport=1001, dport=30080, flags="S")
    assert dp.process(bytes(np), T0)[0] == "forward"                     # node port: id 5 too
    assert dp.process(bytes(IP(src=CLIENT, dst="10.96.0.11") / TCP(dport=80, flags="S")), T0)[0] == "reply"
    assert dp.process(bytes(IP(src="10.1.0.1", dst="10.96.0.12") / TCP(dport=80, flags="S")), T0)[0] == "drop"
    for sport in (20, 7):
        lbs = IP(src=CLIENT, dst="10.96.0.12") / TCP(sport=sport, dport=80, flags="S")
        assert dp.process(bytes(lbs), T0)[0] == "forward"
    # two SNAT ports, both half-open: a third flow to the lb backend reclaims one
    lbs = IP(src=CLIENT, dst="10.96.0.12") / TCP(sport=8, dport=80, flags="S")
    assert dp.process(bytes(lbs), T0)[0] == "forward" and dp.counters()["flows_evicted"] == 1
    err = IP(src=IP(out).dst, dst=MASQ) / ICMP(type=3, code=3) / out[:28]
    assert dp.process(bytes(err), T0)[0] == "forward"
    got = dp.service_counters([5, 6, 7, 8])
    assert got[5] == {"packets": 5, "bytes": 40 + 45 + 43 + 40 + 56, "flows": 2, "rejects": 0, "denied": 0}
    assert got[6] == {"packets": 0, "bytes": 0, "flows": 0, "rejects": 1, "denied": 0}
    assert got[7] == dict.fromkeys(mod.SERVICE_COUNTERS, 0)
    assert got[8] == {"packets": 3, "bytes": 120, "flows": 3, "rejects": 0, "denied": 1}
    with pytest.raises(ValueError):
        dp.service_counters([9])


# --- id limits ------------------------------------------------------------------------

@pytest.mark.parametrize("mod", MODULES)
def test_max_services_and_backends(mod):
    ok = service(id=3, backends=[(ip(BACKENDS[0]), 53, 7)])
    t_ok = mod.Tables([ok], vips=[ip(VIP)])
    dp = mod.Dataplane(ip(MASQ), tables=t_ok, max_services=4, max_backends=8)
    assert dp.current_tables is t_ok
    for bad in (dict(ok, id=4),                                          # service id 4 of 0..3
                dict(ok, backends=[(ip(BACKENDS[0]), 53, 8)]),           # backend id 8 of 0..7
                dict(ok, id=0, backends=[(ip(b), 53) for b in BACKENDS[:9]])):   # default ids 0..8
        t = mod.Tables([bad], vips=[ip(VIP)])
        with pytest.raises(ValueError):
            dp.swap(t)
        assert dp.current_tables is t_ok                                 # the old one stays
        with pytest.raises(ValueError):
            mod.Dataplane(ip(MASQ), tables=t, max_services=4, max_backends=8)
    # default ids are the service's index and the backend's index in the whole table
    two = [service("a", backends=BACKENDS[:5]), service("b", port=54, backends=BACKENDS[5:8])]
    mod.Dataplane(ip(MASQ), tables=mod.Tables(two), max_services=2, max_backends=8)
    with pytest.raises(ValueError):
        mod.Dataplane(ip(MASQ), tables=mod.Tables(two), max_services=1, max_backends=8)
    with pytest.raises(ValueError):
        mod.Dataplane(ip(MASQ), tables=mod.Tables(two), max_services=2, max_backends=7)
    with pytest.raises(ValueError):
        dp.active_flows(8)
    with pytest.raises(ValueError):
        dp.service_counters([4])
