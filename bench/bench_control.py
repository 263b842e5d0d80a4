#!/usr/bin/env python3
"""The control plane as services grow (10, 1,000, 10,000, 30,000 services of
ten endpoints each, from EndpointSlices as kube-proxy sees them):

  1. compile + swap: servicemap.build, compiler.compile_tables (of which
     compiler.rows, the Python part) and Dataplane.swap, timed apart and
     together, plus Engine.sync as the running engine does it (allocations
     kept, stale-UDP cleanup included) and config.load of the same objects
     from YAML files;
  2. one endpoint change to the fast path using it, with 10,000 services:
     an endpoint of one service turns ready (or unready) and new flows are
     sent until one reaches it (or 200 have avoided it), handed to the engine
     three ways: Engine.sync of objects in memory, Engine.apply of one
     EndpointSlice (`engine apply -f`), and a rewritten manifest file with
     Engine.reload (config.load + sync); a full rebuild is what exists, and
     the table shows where its time goes;
  3. first-packet cost: ns per new-flow SYN through the Cython fast path,
     destinations spread over all services, against the 10-service figure.

    python3 bench/bench_control.py [--quick] [--runs N] [--json FILE]

--quick stops at 1,000 services. Nothing here needs root.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (TH_SYN, time_batches, client_addr, fmt_ratio, ip_int, ip_str, log,  # noqa: E402
                     machine_line, median, parser, ratio, runs_of, table, tcp_packet, write_json)

from engine import _fastpath, compiler, servicemap  # noqa: E402
from engine import config as config_mod  # noqa: E402
from engine.host import FakeHost  # noqa: E402
from engine.proxier import Engine  # noqa: E402
from engine.model import Endpoint, EndpointSlice, Service, ServicePort, Source  # noqa: E402

EPS = 10                               # endpoints per service
SVC_BASE = ip_int("10.96.0.0") + 256   # ClusterIPs 10.96.1.0 and up (DNS keeps 10.96.0.10)
POD_BASE = ip_int("10.128.0.0")        # endpoint i of service s: POD_BASE + s*EPS + i
MASQ = ip_int("169.254.100.1")
NOW = 1000.0


def svc_ip(i):
    return ip_str(SVC_BASE + i)


def pod_ip(i, j):
    return ip_str(POD_BASE + i * EPS + j)


# --- objects, in memory and as YAML -----------------------------------------------------

def make_objects(n, unready=None):
    """n ClusterIP services (port 80 -> 8080) without selector and one
    EndpointSlice each. unready: (service, endpoint) to mark not ready."""
    services, slices = [], []
    for i in range(n):
        name = f"svc-{i}"
        src = Source("<bench>", "Service", "bench", name)
        services.append(Service(namespace="bench", name=name, type="ClusterIP", cluster_ip=svc_ip(i),
                                selector=None, source=src,
                                ports=[ServicePort(name="http", protocol="TCP", port=80,
                                                   target_port=8080, node_port=None)]))
        eps = [Endpoint(ip=pod_ip(i, j), port=0, ready=(i, j) != unready, serving=(i, j) != unready,
                        pod=f"{name}-{j}") for j in range(EPS)]
        slices.append(EndpointSlice(namespace="bench", name=f"{name}-abcde", service_name=name,
                                    ports=[("http", 8080, "TCP")], endpoints=eps,
                                    source=Source("<bench>", "EndpointSlice", "bench", f"{name}-abcde")))
    return services, slices


def make_config(n, unready=None):
    services, slices = make_objects(n, unready)
    return config_mod.Config(engine=config_mod.EngineConfig(), services=services, pods=[], slices=slices)


def with_ready(cfg, svc, ep, ready):
    """A new Config (as a reload would produce) with one endpoint's readiness set."""
    slices = list(cfg.slices)
    sl = slices[svc]
    eps = list(sl.endpoints)
    eps[ep] = dataclasses.replace(eps[ep], ready=ready, serving=ready)
    slices[svc] = dataclasses.replace(sl, endpoints=eps)
    return dataclasses.replace(cfg, slices=slices)


def service_yaml(i):
    return (f"---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n"
            f"spec: {{clusterIP: {svc_ip(i)}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n")


def slice_yaml(i, unready=None):
    eps = "".join(f"- {{addresses: [{pod_ip(i, j)}], conditions: {{ready: {'false' if (i, j) == unready else 'true'}}}}}\n"
                  for j in range(EPS))
    return (f"---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
            f"metadata: {{name: svc-{i}-abcde, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n"
            f"addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{eps}")


def write_yaml(d, n, unready=None, per_file=1000):
    """engine.yaml naming a manifests/ folder of files of per_file services."""
    os.makedirs(os.path.join(d, "manifests"), exist_ok=True)
    for k in range(0, n, per_file):
        with open(os.path.join(d, "manifests", f"svc-{k // per_file:04d}.yaml"), "w") as f:
            for i in range(k, min(n, k + per_file)):
                f.write(service_yaml(i))
                f.write(slice_yaml(i, unready))
    path = os.path.join(d, "engine.yaml")
    with open(path, "w") as f:
        f.write("apiVersion: engine/v1alpha1\nkind: EngineConfiguration\nmanifests: [./manifests]\n")
    return path


def rewrite_slice_file(d, svc, unready, per_file=1000):
    """Rewrite the one manifest file holding service svc, as an edit would."""
    k = svc // per_file
    path = os.path.join(d, "manifests", f"svc-{k:04d}.yaml")
    n_in_file = sum(1 for line in open(path) if line.startswith("kind: Service"))
    with open(path + ".tmp", "w") as f:
        for i in range(k * per_file, k * per_file + n_in_file):
            f.write(service_yaml(i))
            f.write(slice_yaml(i, unready))
    os.replace(path + ".tmp", path)


def new_dp(max_flows=1 << 18):
    return _fastpath.Dataplane(MASQ, max_flows=max_flows)


# --- 1. compile and swap ------------------------------------------------------------

def compile_swap(n, runs, tmp, load_limit):
    cfg = make_config(n)
    eng_cfg = cfg.engine
    out = {"services": n, "build": [], "rows": [], "compile": [], "swap": [], "sum": [], "sync": [], "load": []}
    dp = new_dp(1024)
    dp.swap(compiler.compile_tables(servicemap.build(cfg), eng_cfg))
    eng = Engine(cfg, host=FakeHost())
    eng.sync(cfg)                           # first sync: allocations start empty
    for _ in range(runs):
        gc.collect()
        t0 = time.perf_counter()
        smap = servicemap.build(cfg)
        t1 = time.perf_counter()
        tables = compiler.compile_tables(smap, eng_cfg)
        t2 = time.perf_counter()
        dp.swap(tables)                     # frees the previous generation, as in the engine
        del tables
        t3 = time.perf_counter()
        compiler.rows(smap, eng_cfg)
        t4 = time.perf_counter()
        eng.sync(full=True)
        t5 = time.perf_counter()
        out["build"].append(t1 - t0)
        out["compile"].append(t2 - t1)
        out["swap"].append(t3 - t2)
        out["sum"].append(t3 - t0)
        out["rows"].append(t4 - t3)
        out["sync"].append(t5 - t4)
    if dp.current_tables.size != n:
        raise RuntimeError(f"compiled {dp.current_tables.size} rows for {n} services")
    if n <= load_limit:
        d = tempfile.mkdtemp(dir=tmp)
        path = write_yaml(d, n)
        for _ in range(runs if n < 10_000 else 1):     # about 7 ms a service: once is enough
            gc.collect()
            t0 = time.perf_counter()
            c = config_mod.load(path)
            out["load"].append(time.perf_counter() - t0)
            if len(c.services) != n:
                raise RuntimeError("YAML load lost services")
        shutil.rmtree(d, ignore_errors=True)
    return {k: (median(v) if isinstance(v, list) else v) for k, v in out.items()}


# --- 2. one endpoint change ----------------------------------------------------------


class _Timed:
    """Wraps servicemap.build, compiler.compile_tables, config loading and the
    engine's Dataplane.swap with timers, so a whole Engine.sync / apply /
    reload can be broken down without copying its steps (which change as the
    engine evolves)."""

    PATCHES = ((servicemap, "build", "build"), (compiler, "compile_tables", "compile"),
               (config_mod, "load", "parse"), (config_mod, "parse_text", "parse"))

    def __init__(self):
        self.t = {}
        self.saved = []

    def wrap(self, key, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - t0
        return timed

    def __enter__(self):
        for mod, name, key in self.PATCHES:
            if hasattr(mod, name):
                fn = getattr(mod, name)
                self.saved.append((mod, name, fn))
                setattr(mod, name, self.wrap(key, fn))
        return self

    def __exit__(self, *exc):
        for mod, name, fn in reversed(self.saved):
            setattr(mod, name, fn)
        self.saved = []
        return False

    def instrument(self, eng):
        eng.fp = _SwapTimer(eng.fp, self)


class _SwapTimer:
    def __init__(self, fp, timer):
        self._fp, self._timer = fp, timer

    def swap(self, tables):
        t0 = time.perf_counter()
        self._fp.swap(tables)
        del tables                  # the old generation is freed inside swap
        self._timer.t["swap"] = self._timer.t.get("swap", 0.0) + time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._fp, name)


def first_flow_to(dp, vip, target, want, start, limit=200):
    """Send new-flow SYNs to vip:80 until one goes to target (want=True), or
    until `limit` have all avoided it (want=False). Returns (SYNs sent, ok)."""
    t = ip_int(target)
    for k in range(limit):
        a, p = client_addr(start + k)
        v, reason, out = dp.process(tcp_packet(a, p, ip_int(vip), 80, TH_SYN), NOW)
        if v != "forward":
            raise RuntimeError(f"SYN to {vip} not forwarded: {v} {reason}")
        if int.from_bytes(out[16:20], "big") == t:
            return k + 1, want
    return limit, not want


def endpoint_change(n, runs, tmp):
    """One endpoint of one service flips, with n services; timed from the
    change being handed to the engine to the first new flow that reaches
    (or, for 200 flows, avoids) that endpoint. Three ways in:
      objects  Engine.sync(new Config): objects in memory, as a watch would give
      apply    Engine.apply(one EndpointSlice as YAML): `engine apply -f`
      reload   the manifest file is rewritten, Engine.reload(): config.load
               of every file + sync (what `engine run` does on a file change)"""
    svc, ep = n // 2, 3
    vip, target = svc_ip(svc), pod_ip(svc, ep)
    res = {"services": n, "rows": []}
    client = [0]

    def measure(label, eng, do, want, reset):
        """Runs reset() untimed, then do() timed together with the SYNs."""
        reset()
        gc.collect()
        with _Timed() as tm:
            tm.instrument(eng)
            try:
                t0 = time.perf_counter()
                do()
                t1 = time.perf_counter()
                client[0] += 1000
                k, ok = first_flow_to(eng.fp._fp, vip, target, want, client[0])
                t2 = time.perf_counter()
            finally:
                eng.fp = eng.fp._fp
        if not ok:
            raise RuntimeError(f"{label}: the fast path did not follow the change of {target}")
        parts = dict(tm.t)
        parts["other"] = (t1 - t0) - sum(parts.values())
        parts["syns_s"] = t2 - t1
        return t2 - t0, parts, k

    def record(label, samples):
        tot = median([s[0] for s in samples])
        keys = {k for s in samples for k in s[1]}
        parts = {k: median([s[1].get(k, 0.0) for s in samples]) for k in keys}
        res["rows"].append({"label": label, "total": tot, "parts": parts,
                            "syns": median([s[2] for s in samples]), "runs": len(samples)})

    # objects in memory
    cfg_down = make_config(n, unready=(svc, ep))
    cfg_up = with_ready(cfg_down, svc, ep, True)
    eng = Engine(cfg_down, host=FakeHost())
    eng.sync(cfg_down)
    for direction, cfg_to, cfg_back, want in (("ready", cfg_up, cfg_down, True),
                                              ("unready", cfg_down, cfg_up, False)):
        record(f"turns {direction}: Engine.sync(objects)",
               [measure("objects", eng, lambda c=cfg_to: eng.sync(c), want,
                        lambda c=cfg_back: eng.sync(c)) for _ in range(runs)])
    del eng

    # the same from YAML: engine apply -f, then a file edit + reload
    d = tempfile.mkdtemp(dir=tmp)
    path = write_yaml(d, n, unready=(svc, ep))
    t0 = time.perf_counter()
    eng = Engine(config_mod.load(path), host=FakeHost())
    eng.sync(eng.cfg)
    res["initial_load_sync"] = time.perf_counter() - t0
    if hasattr(eng, "apply"):
        up = service_yaml(svc) + slice_yaml(svc, None)
        down = service_yaml(svc) + slice_yaml(svc, (svc, ep))
        for direction, text, back, want in (("ready", up, down, True), ("unready", down, up, False)):
            record(f"turns {direction}: Engine.apply (engine apply -f)",
                   [measure("apply", eng, lambda t=text: eng.apply(t, "change.yaml"), want,
                            lambda t=back: eng.apply(t, "change.yaml")) for _ in range(runs)])
        eng.apply(down, "change.yaml")      # back to the file's state for the reload
        eng.sources.layers["apply"].clear()     # (the same objects as the files': nothing changes)

    def reload():
        if hasattr(eng, "reload"):
            eng.reload()
        else:
            eng.sync(config_mod.load(path))
    # once: config.load of 10,000 services takes a minute
    record("turns ready: file rewritten, Engine.reload (1 run)",
           [measure("reload", eng, reload, True, lambda: rewrite_slice_file(d, svc, None))])
    shutil.rmtree(d, ignore_errors=True)
    return res


# --- 3. first-packet cost ------------------------------------------------------------

def first_packet(n, runs, flows, rng):
    """ns per new-flow SYN with n services: destinations spread over all
    services, or all to one. One warm-up pass first, then every flow is
    expired after each pass: the flow table's pages are touched once, as in a
    running engine, so page faults are not counted as packet cost."""
    cfg = make_config(n)
    tables = compiler.compile_tables(servicemap.build(cfg), cfg.engine)
    pkts = [tcp_packet(*client_addr(k), SVC_BASE + rng.randrange(n), 80, TH_SYN) for k in range(flows)]
    same = [tcp_packet(*client_addr(k), SVC_BASE + n // 2, 80, TH_SYN) for k in range(flows)]
    sets = {"spread": [pkts[i:i + 64] for i in range(0, flows, 64)],
            "hot": [same[i:i + 64] for i in range(0, flows, 64)]}
    dp = new_dp(1 << 18)
    dp.swap(tables)
    del tables
    for ch in sets["spread"]:
        dp.process_batch(ch, NOW)
    dp.expire(NOW + 1e7)
    sets["spread_plain"] = sets["spread"]          # the same, batch prefetch stages off
    out = {"spread": [], "hot": [], "spread_plain": []}
    for _ in range(runs):
        for label, bs in sets.items():
            dp.batch_prefetch = label != "spread_plain"
            c0 = dp.counters()
            gc.collect()
            dt = time_batches(dp, bs, NOW)
            c = dp.counters()
            if c["flows_created"] - c0["flows_created"] != flows or c["drops"] != c0["drops"] \
                    or c["rejects"] != c0["rejects"]:
                raise RuntimeError(f"first packets with {n} services: {c}")
            dp.expire(NOW + 1e7)
            out[label].append(dt / flows * 1e9)
    return {"services": n, "spread_ns": median(out["spread"]), "hot_ns": median(out["hot"]),
            "spread_no_prefetch_ns": median(out["spread_plain"])}


def main():
    args = parser(__doc__.split("\n\n")[0]).parse_args()
    runs = runs_of(args)
    quick = args.quick
    sizes = [10, 1000] if quick else [10, 1000, 10_000, 30_000]
    change_n = 1000 if quick else 10_000
    load_limit = 1000 if quick else 10_000
    flows = 20_000 if quick else 100_000
    tmp = tempfile.mkdtemp(prefix="bench-control-")
    res = {"compile": [], "change": None, "first_packet": []}
    try:
        for n in sizes:
            log(f"compile + swap, {n:,} services")
            res["compile"].append(compile_swap(n, runs, tmp, load_limit))
        log(f"endpoint change with {change_n:,} services")
        res["change"] = endpoint_change(change_n, runs, tmp)
        rng = random.Random(1)
        for n in sizes:
            log(f"first-packet cost, {n:,} services")
            res["first_packet"].append(first_packet(n, runs, flows, rng))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ms = lambda s: None if s is None else s * 1e3  # noqa: E731
    out = [machine_line(), ""]
    rows = []
    for d in res["compile"]:
        rows.append([f"{d['services']:,}", ms(d["build"]), ms(d["compile"]), ms(d["rows"]),
                     ms(d["swap"]), ms(d["sum"]), ms(d["sync"]), ms(d["load"])])
    out.append(table(f"Compile and swap, ms (services of {EPS} endpoints; median of {runs})",
                     ["services", "servicemap.build", "compile_tables", "(of which rows)", "swap",
                      "build+compile+swap", "Engine.sync", "config.load (YAML)"], rows))
    out.append("  (config.load: 1 run at 10,000 services, not measured above; '-' where not measured)")
    out.append("")
    c = res["change"]
    rows = []
    for r in c["rows"]:
        p = r["parts"]
        rows.append([r["label"], ms(r["total"]), ms(p.get("parse")), ms(p.get("build")), ms(p.get("compile")),
                     ms(p.get("swap")), ms(p.get("other")), ms(p.get("syns_s")), r["syns"]])
    out.append(table(f"One endpoint change to the fast path using it, {c['services']:,} services, ms",
                     ["change", "total", "parse YAML", "build", "compile", "swap", "other",
                      "SYNs", "SYNs sent"], rows))
    out.append("  other: the rest of sync/apply/reload (allocations, merge, DNS, stale-UDP cleanup).")
    out.append("  engine run notices a changed file within its watch interval (checked every"
               " 0.25-0.5 s): not included.")
    out.append("")
    base = res["first_packet"][0]
    rows = [[f"{d['services']:,}", d["spread_ns"], fmt_ratio(ratio(d["spread_ns"], base["spread_ns"])),
             d["hot_ns"], fmt_ratio(ratio(d["hot_ns"], base["hot_ns"])),
             d["spread_no_prefetch_ns"], fmt_ratio(ratio(d["spread_no_prefetch_ns"], base["spread_no_prefetch_ns"]))]
            for d in res["first_packet"]]
    out.append(table(f"First-packet cost: new-flow SYN through the fast path, ns ({flows:,} flows, batch 64)",
                     ["services", "spread over all", "vs 10", "one service", "vs 10",
                      "spread, no prefetch", "vs 10"], rows))
    print("\n".join(out))
    write_json(args.json, {"runs": runs, "quick": quick, "results": res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
