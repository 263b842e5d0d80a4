#!/usr/bin/env python3
"""The control plane at cluster scale (services of ten endpoints each, from
EndpointSlices as kube-proxy sees them), against issue 11's targets:

  1. scale, at 10, 1,000, 10,000 and 30,000 services: config.load of the
     manifests as YAML and as JSON; a full build + compile + swap
     (servicemap.build, Compiler.full, Dataplane.swap) and Engine.sync(full);
     memory per service (RSS of objects, service map, compiled rows, tables);
  2. one change into the fast path with 10,000 services, from every source,
     timed from the hand-over to the swap and confirmed by new-flow SYNs:
     an endpoint turning ready (object event as an API watch gives it,
     `engine apply -f`, a manifest file rewritten and noticed by inotify) and
     a service added, changed (port) and deleted;
  3. first-packet cost: ns per new-flow SYN through the Cython fast path,
     destinations spread over all services, against the 10-service figure.

    flock /tmp/engine-bench.lock python3 bench/bench_control.py [--quick] [--runs N] [--json FILE]

--quick stops at 1,000 services. Nothing here needs root (the host is
engine.host.FakeHost; the fast path is engine._fastpath).
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
                     machine_line, median, parser, ratio, rss_bytes, runs_of, table, tcp_packet, write_json)

from engine import _fastpath, compiler, servicemap  # noqa: E402
from engine.compiler import Compiler  # noqa: E402
from engine import config as config_mod  # noqa: E402
from engine.host import FakeHost  # noqa: E402
from engine.proxier import Engine, NotFound  # noqa: E402
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


# --- 1. scale ------------------------------------------------------------------------

TARGETS = {"endpoint": 0.020, "service": 0.050, "full": 0.5, "yaml": 2.0, "file": 0.100}


def write_json_tree(d, n, per_file=1000):
    """The same objects as write_yaml, as JSON Lists."""
    import json
    os.makedirs(os.path.join(d, "manifests"), exist_ok=True)
    services, slices = make_objects(n)
    for k in range(0, n, per_file):
        items = []
        for i in range(k, min(n, k + per_file)):
            items.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"svc-{i}", "namespace": "bench"},
                          "spec": {"clusterIP": svc_ip(i), "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
            items.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                          "metadata": {"name": f"svc-{i}-abcde", "namespace": "bench",
                                       "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
                          "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                          "endpoints": [{"addresses": [pod_ip(i, j)], "conditions": {"ready": True}} for j in range(EPS)]})
        with open(os.path.join(d, "manifests", f"svc-{k // per_file:04d}.json"), "w") as f:
            json.dump({"apiVersion": "v1", "kind": "List", "items": items}, f)
    path = os.path.join(d, "engine.yaml")
    with open(path, "w") as f:
        f.write("apiVersion: engine/v1alpha1\nkind: EngineConfiguration\nmanifests: [./manifests]\n")
    return path


def timed_load(path, runs):
    out = []
    for _ in range(runs):
        gc.collect()
        t0 = time.perf_counter()
        cfg = config_mod.load(path)
        out.append(time.perf_counter() - t0)
    return median(out), cfg


def scale(n, runs, tmp):
    cfg = make_config(n)
    out = {"services": n}
    d = tempfile.mkdtemp(dir=tmp)
    out["yaml"], loaded = timed_load(write_yaml(d, n), runs if n < 10_000 else 1)
    if len(loaded.services) != n:
        raise RuntimeError("YAML load lost services")
    shutil.rmtree(d, ignore_errors=True)
    d = tempfile.mkdtemp(dir=tmp)
    out["json"], loaded = timed_load(write_json_tree(d, n), runs)
    if len(loaded.services) != n:
        raise RuntimeError("JSON load lost services")
    del loaded
    shutil.rmtree(d, ignore_errors=True)
    dp = new_dp(1024)
    comp = Compiler(_fastpath)
    parts = {"build": [], "compile": [], "swap": [], "full": [], "sync": []}
    eng = Engine(cfg, host=FakeHost(), serve_dns=False)
    eng.sync(cfg)
    for _ in range(runs):
        gc.collect()
        t0 = time.perf_counter()
        smap = servicemap.build(cfg)
        t1 = time.perf_counter()
        tables = comp.full(smap, cfg.engine)
        t2 = time.perf_counter()
        dp.swap(tables)                     # frees the previous generation, as in the engine
        del tables
        t3 = time.perf_counter()
        eng.sync(full=True)
        t4 = time.perf_counter()
        for k, v in (("build", t1 - t0), ("compile", t2 - t1), ("swap", t3 - t2), ("full", t3 - t0), ("sync", t4 - t3)):
            parts[k].append(v)
    if dp.current_tables.size != n:
        raise RuntimeError(f"compiled {dp.current_tables.size} rows for {n} services")
    out.update({k: median(v) for k, v in parts.items()})
    del eng, smap, comp, dp, cfg
    out["bytes_per_service"] = memory_per_service(n)
    return out


def memory_per_service(n):
    """RSS growth of a running engine's control plane per service: the
    parsed objects, service map, compiled-row cache and tables."""
    gc.collect()
    before = rss_bytes()
    cfg = make_config(n)
    eng = Engine(cfg, host=FakeHost(), serve_dns=False)
    eng.sync(full=True)
    gc.collect()
    per = (rss_bytes() - before) / n
    del eng, cfg
    gc.collect()
    return per


# --- 2. one change from every source -----------------------------------------------------

def endpoint_slice(i, ready_ep=None, unready=None):
    """EndpointSlice of service i (an object, as a watch hands it over)."""
    name = f"svc-{i}"
    eps = [Endpoint(ip=pod_ip(i, j), port=0, ready=(i, j) != unready, serving=(i, j) != unready,
                    pod=f"{name}-{j}") for j in range(EPS)]
    return EndpointSlice(namespace="bench", name=f"{name}-abcde", service_name=name, ports=[("http", 8080, "TCP")],
                         endpoints=eps, source=Source("<watch>", "EndpointSlice", "bench", f"{name}-abcde"))


def changes(n, runs, tmp, per_file_sizes):
    """Endpoint and service changes with n services, each from hand-over to
    the swap (the engine's sync returns after it), then SYNs until a new
    flow shows the fast path uses it."""
    svc, ep = n // 2, 3
    vip, target = svc_ip(svc), pod_ip(svc, ep)
    rows = []
    client = [0]

    def confirm(label, dp, vip_, port, want_ip, want=True):
        client[0] += 1000
        t = ip_int(want_ip)
        for k in range(200):
            a, p = client_addr(client[0] + k)
            v, reason, out = dp.process(tcp_packet(a, p, ip_int(vip_), port, TH_SYN), NOW)
            hit = v == "forward" and int.from_bytes(out[16:20], "big") == t
            if want is None:        # the service is gone: no SYN may be forwarded
                if v == "forward":
                    raise RuntimeError(f"{label}: {vip_}:{port} still served")
                return k + 1
            if hit and want:
                return k + 1
        if want:
            raise RuntimeError(f"{label}: the fast path did not follow the change ({vip_}:{port} -> {want_ip})")
        return 200

    def record(label, group, samples, syns, target_s, note=""):
        rows.append({"label": label, "group": group, "ms": median(samples) * 1e3, "runs": len(samples),
                     "syns": syns, "target_ms": target_s * 1e3, "note": note})

    # objects, as an API watch hands them over; engine apply -f
    cfg = make_config(n, unready=(svc, ep))
    eng = Engine(cfg, host=FakeHost(), serve_dns=False)
    eng.sync(full=True)
    up, down = endpoint_slice(svc), endpoint_slice(svc, unready=(svc, ep))
    for label, do, undo in (
            ("endpoint ready: object event (API watch)",
             lambda: (eng.update("EndpointSlice", ("bench", f"svc-{svc}-abcde"), up), eng.sync()),
             lambda: (eng.update("EndpointSlice", ("bench", f"svc-{svc}-abcde"), down), eng.sync())),
            ("endpoint ready: engine apply -f",
             lambda: eng.apply(slice_yaml(svc), "change.yaml"),
             lambda: eng.apply(slice_yaml(svc, (svc, ep)), "change.yaml"))):
        samples = []
        for _ in range(runs):
            try:
                undo()
            except NotFound:        # the first run: nothing to delete yet (as kubectl, an error)
                pass
            gc.collect()
            t0 = time.perf_counter()
            do()
            samples.append(time.perf_counter() - t0)
            if eng.last_sync_kind != "partial":
                raise RuntimeError(f"{label}: took a {eng.last_sync_kind} sync")
            syns = confirm(label, eng.fp, vip, 80, target)
        record(label, "endpoint", samples, syns, TARGETS["endpoint"])

    new_ip = svc_ip(n + 7)
    new_svc = (f"apiVersion: v1\nkind: Service\nmetadata: {{name: added, namespace: bench}}\n"
               f"spec: {{clusterIP: {new_ip}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"
               f"---\n" + slice_yaml(svc).replace(f"svc-{svc}-abcde", "added-abcde")
               .replace(f"service-name: svc-{svc}", "service-name: added"))
    changed = new_svc.replace("port: 80, targetPort", "port: 8080, targetPort")
    svc_obj = config_mod.parse_text(new_svc, "watch")
    for label, do, undo, check in (
            ("service added: engine apply -f", lambda: eng.apply(new_svc, "s.yaml"),
             lambda: eng.apply(new_svc, "s.yaml", delete=True), (new_ip, 80, pod_ip(svc, 0), True)),
            ("service port changed: engine apply -f", lambda: eng.apply(changed, "s.yaml"),
             lambda: eng.apply(new_svc, "s.yaml"), (new_ip, 8080, pod_ip(svc, 0), True)),
            ("service deleted: engine apply -f", lambda: eng.apply(new_svc, "s.yaml", delete=True),
             lambda: eng.apply(new_svc, "s.yaml"), (new_ip, 80, pod_ip(svc, 0), None)),
            ("service added: object event (API watch)",
             lambda: (eng.update("Service", ("bench", "added2"), _renamed(svc_obj.services[0], "added2")), eng.sync()),
             lambda: (eng.update("Service", ("bench", "added2"), None), eng.sync()), None)):
        samples = []
        for _ in range(runs):
            try:
                undo()
            except NotFound:        # the first run: nothing to delete yet (as kubectl, an error)
                pass
            gc.collect()
            t0 = time.perf_counter()
            do()
            samples.append(time.perf_counter() - t0)
            if eng.last_sync_kind != "partial":
                raise RuntimeError(f"{label}: took a {eng.last_sync_kind} sync")
            syns = confirm(label, eng.fp, *check) if check else None
        record(label, "service", samples, syns, TARGETS["service"])
    eng = None

    # a manifest file rewritten, noticed by inotify
    from engine.watch import FileWatcher
    for per_file in per_file_sizes:
        d = tempfile.mkdtemp(dir=tmp)
        path = write_yaml(d, n, unready=(svc, ep), per_file=per_file)
        cache = config_mod.FileCache()
        eng = Engine(config_mod.load(path, cache=cache), host=FakeHost(), serve_dns=False, file_cache=cache)
        eng.sync(full=True)
        import threading
        done = threading.Event()
        seen = []

        def on_change(noticed, paths):
            eng.reload(noticed=noticed, paths=paths)
            seen.append((noticed, time.monotonic(), eng.last_sync_kind))
            done.set()
        w = FileWatcher(eng.watched, on_change).start()
        notice, total = [], []
        try:
            for r in range(runs):
                for unready in ((svc, ep), None):      # down (untimed), then up (timed)
                    done.clear()
                    t0 = time.monotonic()
                    rewrite_slice_file(d, svc, unready, per_file=per_file)
                    if not done.wait(30):
                        raise RuntimeError("the watcher did not notice the rewrite")
                noticed, swapped, kind = seen[-1]
                if kind != "partial":
                    raise RuntimeError(f"file rewrite took a {kind} sync")
                notice.append(swapped - noticed)
                total.append(swapped - t0)
                syns = confirm("file", eng.fp, vip, 80, target)
        finally:
            w.close()
        record(f"endpoint ready: file of {per_file:,} services rewritten, inotify -> swap", "endpoint",
               notice, syns, TARGETS["endpoint"])
        record("  the same, from the rewrite (write + notice + read + sync)", "file", total, syns, TARGETS["file"])
        eng = None
        shutil.rmtree(d, ignore_errors=True)
    return {"services": n, "rows": rows}


def _renamed(svc, name):
    return dataclasses.replace(svc, name=name, cluster_ip=None, source=None)


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
    flows = 20_000 if quick else 100_000
    tmp = tempfile.mkdtemp(prefix="bench-control-")
    res = {"scale": [], "changes": None, "first_packet": []}
    try:
        for n in sizes:
            log(f"scale: {n:,} services")
            res["scale"].append(scale(n, runs, tmp))
        log(f"changes with {change_n:,} services")
        res["changes"] = changes(change_n, runs, tmp, [10] if quick else [10, 1000])
        rng = random.Random(1)
        for n in sizes:
            log(f"first-packet cost, {n:,} services")
            res["first_packet"].append(first_packet(n, runs, flows, rng))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ms = lambda s: None if s is None else s * 1e3  # noqa: E731
    out = [machine_line(), ""]
    base = {d["services"]: d for d in res["scale"]}
    rows = []
    for d in res["scale"]:
        rows.append([f"{d['services']:,}", ms(d["yaml"]), ms(d["json"]), ms(d["build"]), ms(d["compile"]),
                     ms(d["swap"]), ms(d["full"]), ms(d["sync"]), round(d["bytes_per_service"])])
    out.append(table(f"Scale, ms (services of {EPS} endpoints; median of {runs}; YAML load 1 run from 10,000)",
                     ["services", "config.load YAML", "config.load JSON", "servicemap.build", "Compiler.full",
                      "swap", "build+compile+swap", "Engine.sync(full)", "bytes/service"], rows))
    if 10_000 in base and 30_000 in base:
        a, b = base[10_000], base[30_000]
        out.append("  30,000 / 10,000: " + ", ".join(
            f"{k} {fmt_ratio(ratio(b[k], a[k]))}" for k in ("yaml", "json", "full", "sync", "bytes_per_service"))
            + "  (linear: 3.0x; target <= 3.3x)")
    out.append("")
    c = res["changes"]
    rows = []
    for r in c["rows"]:
        ok = "yes" if r["ms"] <= r["target_ms"] else f"NO ({r['ms'] / r['target_ms']:.1f}x)"
        rows.append([r["label"], r["ms"], r["target_ms"], ok, r["syns"] if r["syns"] is not None else "-"])
    out.append(table(f"One change into the fast path, {c['services']:,} services, ms (median of {runs})",
                     ["change", "ms", "target", "met", "SYNs to confirm"], rows))
    out.append("  ms: hand-over to the swap (sync returns after it; the SYNs that confirm it are not timed).")
    if 10_000 in base:
        d = base[10_000]
        out.append(f"  targets at 10,000: full build+compile+swap {ms(d['full']):.0f} ms (<= 500), "
                   f"YAML load {d['yaml']:.2f} s (<= 2)")
    out.append("")
    rows = []
    fp = {d["services"]: d for d in res["first_packet"]}
    for d in res["first_packet"]:
        b10 = fp[sizes[0]]
        rows.append([f"{d['services']:,}", d["spread_ns"], fmt_ratio(ratio(d["spread_ns"], b10["spread_ns"])),
                     d["hot_ns"], fmt_ratio(ratio(d["hot_ns"], b10["hot_ns"])),
                     d["spread_no_prefetch_ns"], fmt_ratio(ratio(d["spread_no_prefetch_ns"], b10["spread_no_prefetch_ns"]))])
    out.append(table(f"First-packet cost: new-flow SYN through the fast path, ns ({flows:,} flows, batch 64)",
                     ["services", "spread over all", "vs 10", "one service", "vs 10", "spread, no prefetch", "vs 10"],
                     rows))
    print("\n".join(out))
    if args.json:
        write_json(args.json, {"quick": quick, "runs": runs, "results": res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
