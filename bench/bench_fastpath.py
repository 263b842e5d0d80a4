#!/usr/bin/env python3
"""The fast path in memory (no TUN, no kernel): Cython engine._fastpath
against the pure-Python reference engine.refpath.

  1. established-flow packets/s by batch size (1, 8, 32, 64 packets per call
     into the Dataplane), plus the figure with the call overhead amortised
     away (process_batch(..., repeat=R));
  2. new flows/s by batch size (each packet a SYN of a new connection);
  3. conntrack cost per established packet with 1e3 .. 1e6 flows in the
     table, packets spread at random over all flows (cache-cold), net of the
     harness cost, and the ratio to the 1e3 figure;
  4. memory per flow: RSS growth of a Dataplane(max_flows=1e6) filled up,
     divided by the flows, next to the static ENTRY_BYTES.

    python3 bench/bench_fastpath.py [--quick] [--runs N] [--json FILE]

Nothing here needs root. Every figure is the median of --runs repetitions.
"""
from __future__ import annotations

import gc
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (TH_ACK, TH_SYN, TcpFactory, client_addr, fmt, fmt_ratio, ip_int,  # noqa: E402
                     log, machine_line, median, parser, ratio, rss_bytes, runs_of, table,
                     tcp_packet, time_batches, write_json)

from engine import _fastpath, refpath  # noqa: E402

MASQ = ip_int("169.254.100.1")
VIP = ip_int("10.96.100.100")
VPORT = 80
BPORT = 8080
NBACKENDS = 64          # 64 x 64,512 SNAT ports: room for 1e6 flows at < 25% port use
NOW = 1000.0
PAYLOAD = b"p" * 24     # 20 + 20 + 24 = 64-byte packets
BATCHES = (1, 8, 32, 64)


def backends():
    return [(ip_int("10.244.0.0") + 2 + i, BPORT) for i in range(NBACKENDS)]


def make_dp(mod, max_flows, batch=64):
    t = mod.Tables([{"name": "default/bench:http", "vip": VIP, "port": VPORT, "proto": 6,
                     "backends": backends(), "scheduler": 0}],
                   vips=[VIP], drop_cidrs=[(ip_int("10.96.0.0"), 12)])
    return mod.Dataplane(MASQ, max_flows=max_flows, batch=batch, tables=t)


def chunks(seq, n):
    return [seq[i:i + n] for i in range(0, len(seq), n)]


def drops(dp):
    c = dp.counters()
    return c["drops"] + c["rejects"]


def open_flows(dp, n, first=0, handshake=False):
    """SYNs of n new connections (client i = client_addr(first + i)); with
    handshake, also the backend's SYN-ACK and the client's ACK, so the flows
    are ESTABLISHED. Returns the client (addr, port) list."""
    syn = TcpFactory(VIP, VPORT, TH_SYN)
    clients = [client_addr(first + i) for i in range(n)]
    before = dp.counters()["flows_created"]
    for ch in chunks([syn.make(a, p) for a, p in clients], 64):
        dp.process_batch(ch, NOW)
    made = dp.counters()["flows_created"] - before
    if made != n:
        raise RuntimeError(f"opened {made} flows, wanted {n}: {dp.counters()}")
    if handshake:
        by_client = {}
        for f in dp.flows(NOW):
            by_client[(f["orig"][0], f["orig"][1])] = f["reply"]
        synack = []
        for a, p in clients:
            r = by_client[(a, p)]       # (backend, bport, masq, masq port)
            synack.append(tcp_packet(r[0], r[1], r[2], r[3], TH_SYN | TH_ACK))
        d0 = drops(dp)
        for ch in chunks(synack, 64):
            dp.process_batch(ch, NOW)
        ack = TcpFactory(VIP, VPORT, TH_ACK)
        for ch in chunks([ack.make(a, p) for a, p in clients], 64):
            dp.process_batch(ch, NOW)
        if drops(dp) != d0:
            raise RuntimeError("handshake packets dropped: %r" % dp.counters())
        states = {f["state"] for f in dp.flows(NOW)}
        if states != {"ESTABLISHED"}:
            raise RuntimeError(f"flows not established: {states}")
    return clients


# --- 1. established flows by batch size -----------------------------------------------

def established_pps(mod, b, total, repeat_mode):
    """Packets/s for ACKs of b established flows: one call per batch of b
    (repeat_mode False) or one call with repeat=total/b (True)."""
    dp = make_dp(mod, 4096)
    clients = open_flows(dp, b, handshake=True)
    ack = TcpFactory(VIP, VPORT, TH_ACK, PAYLOAD)
    pkts = [ack.make(a, p) for a, p in clients]
    calls = max(1, total // b)
    d0 = drops(dp)
    gc.disable()
    try:
        pb = dp.process_batch
        if repeat_mode:
            t0 = time.perf_counter()
            fwd = pb(pkts, NOW, calls)
            dt = time.perf_counter() - t0
        else:
            fwd = 0
            t0 = time.perf_counter()
            for _ in range(calls):
                fwd += pb(pkts, NOW)
            dt = time.perf_counter() - t0
    finally:
        gc.enable()
    if fwd != calls * b or drops(dp) != d0:
        raise RuntimeError(f"{mod.__name__}: {fwd} of {calls * b} forwarded; {dp.counters()}")
    return calls * b / dt


# --- 2. new flows by batch size ------------------------------------------------------

def new_flows_per_s(mod, b, n, first):
    """New flows/s, one call per batch of b SYNs. A warm-up pass with the
    same packets comes first and is expired, so the table's pages are
    touched already (as in a running engine) and page faults do not count."""
    dp = make_dp(mod, max(2 * n, 1024))
    syn = TcpFactory(VIP, VPORT, TH_SYN, PAYLOAD)
    batches = chunks([syn.make(*client_addr(first + i)) for i in range(n)], b)
    for ch in batches:
        dp.process_batch(ch, NOW)
    dp.expire(NOW + 1e7)
    c0 = dp.counters()
    gc.collect()
    dt = time_batches(dp, batches, NOW)
    c = dp.counters()
    if c["flows_created"] - c0["flows_created"] != n or c["drops"] or c["rejects"]:
        raise RuntimeError(f"{mod.__name__}: created {c['flows_created'] - c0['flows_created']} of {n}; {c}")
    return n / dt


# --- 3. conntrack cost by table size ---------------------------------------------------

def lookup_cost(n, min_packets, runs):
    """ns/packet for established packets spread over all n flows: gross,
    harness (same calls, packets dropped right after the version check) and
    net = gross - harness; plus the hot figure (64 flows, repeat)."""
    dp = make_dp(_fastpath, n)
    t0 = time.perf_counter()
    clients = open_flows(dp, n)
    fill_s = time.perf_counter() - t0
    ack = TcpFactory(VIP, VPORT, TH_ACK, PAYLOAD)
    rng = random.Random(n)
    order = list(range(n))
    rng.shuffle(order)
    pkts = [ack.make(*clients[i]) for i in order]
    reps = max(1, -(-min_packets // n))
    batches = chunks(pkts, 64) * reps
    npk = len(pkts) * reps
    bogus = bytearray(pkts[0])
    bogus[0] = 0x65                     # IPv6 nibble: dropped as unsupported after 1 check
    bogus_batches = [[bytes(bogus)] * len(ch) for ch in batches]
    hot = pkts[:64]
    gross, plain, harness, hots = [], [], [], []
    for _ in range(runs):
        # the same packets with the batch-staged prefetch on and off, alternating
        for name, bs, pf in (("gross", batches, True), ("plain", batches, False),
                             ("harness", bogus_batches, True)):
            dp.batch_prefetch = pf
            d0 = drops(dp)
            dt = time_batches(dp, bs, NOW)
            if name != "harness":
                if drops(dp) != d0:
                    raise RuntimeError("established packets dropped: %r" % dp.counters())
                (gross if pf else plain).append(dt / npk * 1e9)
            else:
                harness.append(dt / npk * 1e9)
        dp.batch_prefetch = True
        reps_hot = max(1, 2_000_000 // 64)
        t0 = time.perf_counter()
        dp.process_batch(hot, NOW, reps_hot)
        hots.append((time.perf_counter() - t0) / (64 * reps_hot) * 1e9)
    g, h = median(gross), median(harness)
    del dp, batches, bogus_batches, pkts
    gc.collect()
    return {"flows": n, "fill_s": fill_s, "gross_ns": g, "harness_ns": h,
            "net_ns": g - h, "net_no_prefetch_ns": median(plain) - h,
            "hot_ns": median(hots), "packets": npk}


# --- 4. memory per flow (in a fresh interpreter) ----------------------------------------

def memory_child(n):
    syn = TcpFactory(VIP, VPORT, TH_SYN)
    batches = chunks([syn.make(*client_addr(i)) for i in range(n)], 64)
    gc.collect()
    r0 = rss_bytes()
    dp = make_dp(_fastpath, n)
    r1 = rss_bytes()
    for ch in batches:
        dp.process_batch(ch, NOW)
    r2 = rss_bytes()
    c = dp.counters()
    print(json.dumps({"flows": c["flows"], "rss_empty": r1 - r0, "rss_full": r2 - r0,
                      "drops": c["drops"]}))


def memory_per_flow(n):
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--_memory-child", str(n)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError("memory child failed: " + r.stderr)
    d = json.loads(r.stdout.strip().splitlines()[-1])
    if d["flows"] != n or d["drops"]:
        raise RuntimeError(f"memory child filled {d['flows']} of {n} flows")
    d["per_flow"] = d["rss_full"] / n
    # what the code allocates per flow: the entry, a free-list slot, and 2 of
    # the >= 4 index slots (8 bytes each, power of two >= 4 x max_flows)
    size = 16
    while size < 4 * n:
        size <<= 1
    d["static_per_flow"] = _fastpath.ENTRY_BYTES + 4 + 8 * size / n
    return d


def main():
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--_memory-child", type=int, help=argparse_hidden())
    args = p.parse_args()
    if args._memory_child:
        memory_child(args._memory_child)
        return 0
    runs = runs_of(args)
    quick = args.quick
    sizes = [1000, 10_000] if quick else [1000, 10_000, 100_000, 1_000_000]
    est_total = {"c": 200_000 if quick else 2_000_000, "py": 2_000 if quick else 20_000}
    new_total = {"c": 20_000 if quick else 200_000, "py": 1_000 if quick else 5_000}
    mods = (("c", _fastpath), ("py", refpath))
    res = {"established": {}, "established_repeat": {}, "new_flows": {}, "lookup": [], "memory": None}

    # 1 and 2, alternating modules and batch sizes within each run
    for run in range(runs):
        for b in BATCHES:
            for key, mod in mods:
                log(f"[run {run + 1}/{runs}] batch {b}: {mod.__name__} established / new flows")
                res["established"].setdefault(f"{key}{b}", []).append(
                    established_pps(mod, b, est_total[key], False))
                res["established_repeat"].setdefault(f"{key}{b}", []).append(
                    established_pps(mod, b, est_total[key], True))
                res["new_flows"].setdefault(f"{key}{b}", []).append(
                    new_flows_per_s(mod, b, new_total[key], first=run * new_total[key]))

    # 3
    for n in sizes:
        log(f"conntrack cost with {n:,} flows")
        res["lookup"].append(lookup_cost(n, 20_000 if quick else 400_000, runs))

    # 4
    mem_n = sizes[-1]
    log(f"memory per flow at {mem_n:,} flows")
    res["memory"] = memory_per_flow(mem_n)

    # --- tables
    out = [machine_line(), ""]
    rows = []
    for b in BATCHES:
        for label, key in (("established pkt/s, 1 call per batch", "established"),
                           ("established pkt/s, repeat (no call cost)", "established_repeat"),
                           ("new flows/s, 1 call per batch", "new_flows")):
            c = median(res[key][f"c{b}"])
            py = median(res[key][f"py{b}"])
            rows.append([f"{label}, batch {b}", c, py, fmt_ratio(ratio(c, py)), fmt(1e9 / c)])
    out.append(table("Fast path in memory: Cython vs Python reference (64-byte TCP packets)",
                     ["workload", "cython", "refpath", "cython/ref", "cython ns/pkt"], rows))
    out.append("")
    base = res["lookup"][0]["net_ns"]
    rows = []
    for d in res["lookup"]:
        rows.append([f"{d['flows']:,}", d["gross_ns"], d["harness_ns"], d["net_ns"],
                     fmt_ratio(ratio(d["net_ns"], base)), d["net_no_prefetch_ns"],
                     fmt_ratio(ratio(d["net_no_prefetch_ns"], d["net_ns"])), d["hot_ns"], d["fill_s"]])
    out.append(table("Conntrack cost per established packet, random over all flows (Cython, batch 64)",
                     ["flows", "gross ns/pkt", "harness ns/pkt", "net ns/pkt", "net vs 1e3",
                      "net, no prefetch", "no prefetch / prefetch", "hot ns/pkt (64 flows)", "fill s"], rows))
    out.append("")
    m = res["memory"]
    rows = [["flows in the table", f"{m['flows']:,}"],
            ["RSS growth, empty Dataplane (bytes)", f"{m['rss_empty']:,}"],
            ["RSS growth, filled (bytes)", f"{m['rss_full']:,}"],
            ["measured bytes per flow", m["per_flow"]],
            ["static bytes per flow (entry + free id + index slots)", m["static_per_flow"]],
            ["ENTRY_BYTES (engine._fastpath)", _fastpath.ENTRY_BYTES]]
    out.append(table("Memory per flow (Cython)", ["figure", "value"], rows))
    print("\n".join(out))
    write_json(args.json, {"runs": runs, "quick": quick, "results": res})
    return 0


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
