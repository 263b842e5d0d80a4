"""The engine's cluster DNS against CoreDNS, and its amplification bound.

Two parts:

1. amplification (in memory, no root): the largest UDP answer / query size
   the engine's DNS returns to a source without a valid DNS cookie, over the
   worst queries we know (a headless service of 100 endpoints, SRV with
   additional records, ANY, a 600-byte TXT from the upstream), with and
   without EDNS; and with a cookie, for comparison.

2. dnsperf (root, the namespace lab): dnsperf in the client namespace
   against the engine's DNS (10.96.0.10) and against CoreDNS (built from its
   Go module, e.g. by scripts/build_peers.sh; --coredns PATH) on the node,
   serving the same records: 100 ClusterIP services from a zone file (CoreDNS's
   `file` plugin) and 20 external names from an upstream in the lab, which
   both cache (CoreDNS's `cache`). Both servers run on the same machine in
   the same run, one after the other, the order alternating; queries/s
   from dnsperf, latency p50/p99 from dnsperf -v at the same load.

    sudo python3 bench/bench_dns.py [--quick] [--runs N] [--seconds S] [--coredns PATH] [--json FILE]

The engine's per-source limits (rateLimit, newSourceRate, RRL) are off for
the dnsperf part: dnsperf is one source at full speed, and CoreDNS has no
such limits by default.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _common import REPO_ROOT, log, machine_line, median, parser, ratio, runs_of, table, write_json  # noqa: F401

import dns.edns
import dns.message
import dns.rrset

ENGINE_DNS = "10.96.0.10"
COREDNS_IP = "192.168.50.1"      # the node's LAN address: CoreDNS binds it, the engine binds 10.96.0.10
UPSTREAM_IP = "192.168.50.53"
SERVICES = 100
EXTERNAL = 20


# --- 1. amplification -----------------------------------------------------------

def amplification():
    from engine import config, servicemap
    from engine.dns import DNSServer
    eps = "\n".join(f"- {{addresses: [10.244.{i // 250}.{i % 250 + 1}]}}" for i in range(100))
    text = f"""apiVersion: engine/v1alpha1
kind: EngineConfiguration
dns: {{clusterIP: 10.96.0.10, upstream: [192.0.2.53], rateLimit: 0, responseRateLimit: {{responsesPerSecond: 0}}}}
---
kind: Service
metadata: {{name: many}}
spec: {{clusterIP: None, ports: [{{name: http, port: 80}}]}}
---
kind: EndpointSlice
metadata: {{name: many-1, labels: {{kubernetes.io/service-name: many}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
{eps}
"""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        cfg = config.load(f.name)
    finally:
        os.unlink(f.name)
    srv = DNSServer(cfg.engine.dns, "127.0.0.1", port=0)
    srv.update(servicemap.build(cfg))

    def upstream(q, servers=None):                 # a large upstream answer: 3 TXT of 200 bytes
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text_list(q.question[0].name, 60, "IN", "TXT",
                                                 ['"' + c * 200 + '"' for c in "xyz"]))
        return r
    srv.forward = upstream
    queries = [("many.default.svc.cluster.local", "A"), ("_http._tcp.many.default.svc.cluster.local", "SRV"),
               ("many.default.svc.cluster.local", "ANY"), ("cluster.local", "ANY"), ("big.example.com", "TXT")]
    rows, worst = [], {}
    for name, t in queries:
        for label, kw in (("plain", {}), ("EDNS 4096", {"use_edns": 0, "payload": 4096}),
                          ("EDNS + client cookie", {"use_edns": 0, "payload": 4096,
                                                    "options": [dns.edns.GenericOption(10, b"12345678")]})):
            w = dns.message.make_query(name, t, **kw).to_wire()
            out = srv.handle(w, "10.0.0.1")
            f = len(out) / len(w)
            worst[label] = max(worst.get(label, 0), f)
            rows.append([f"{name} {t} ({label})", len(w), len(out), f"{f:.2f}x"])
        # the same with a valid server cookie (a proven address) for comparison
        c = b"12345678" + srv.cookies.server_cookie(b"12345678", "10.0.0.1")
        w = dns.message.make_query(name, t, use_edns=0, payload=4096,
                                   options=[dns.edns.GenericOption(10, c)]).to_wire()
        out = srv.handle(w, "10.0.0.1")
        rows.append([f"{name} {t} (valid cookie)", len(w), len(out), f"{len(out) / len(w):.2f}x"])
    return rows, max(worst.values())


# --- 2. dnsperf against CoreDNS ----------------------------------------------------------

def find_coredns(path):
    if path:
        return path
    found = sorted(glob.glob(os.path.expanduser("~/.cache/engine-peers/coredns-*/coredns")))
    return found[-1] if found else shutil.which("coredns")


def engine_config():
    svcs = "".join(f"""---
apiVersion: v1
kind: Service
metadata: {{name: svc-{i}}}
spec: {{clusterIP: 10.96.{10 + i // 200}.{i % 200 + 1}, selector: {{app: none}}, ports: [{{port: 80}}]}}
""" for i in range(SERVICES))
    return f"""apiVersion: engine/v1alpha1
kind: EngineConfiguration
serviceCIDR: 10.96.0.0/12
masqueradeIP: 169.254.100.1
dns: {{clusterIP: {ENGINE_DNS}, upstream: [{UPSTREAM_IP}], ttl: 5, rateLimit: 0, newSourceRate: 0,
      responseRateLimit: {{responsesPerSecond: 0}}}}
""" + svcs


def zone_file():
    """cluster.local as the engine serves it (SOA, NS, the services' A), for CoreDNS's file plugin."""
    lines = ["$ORIGIN cluster.local.", "$TTL 5",
             "@ IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5",
             "@ IN NS ns.dns.cluster.local.", f"ns.dns IN A {ENGINE_DNS}"]
    lines += [f"svc-{i}.default.svc IN A 10.96.{10 + i // 200}.{i % 200 + 1}" for i in range(SERVICES)]
    return "\n".join(lines) + "\n"


COREFILE = """cluster.local:53 {{
    bind {ip}
    file {zone} cluster.local
}}
.:53 {{
    bind {ip}
    forward . {upstream}
    cache 300
}}
"""


def dnsperf(lab, server, names, seconds, verbose=False):
    """(queries/s, p50 ms, p99 ms) of one dnsperf run from the client namespace."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("".join(f"{n} A\n" for n in names))
    try:
        argv = ["dnsperf", "-s", server, "-d", f.name, "-l", str(seconds), "-c", "4", "-T", "2", "-q", "64", "-t", "2"]
        if verbose:
            argv.append("-v")
        r = lab.run(lab.client_ns, argv, timeout=seconds + 60)
    finally:
        os.unlink(f.name)
    m = re.search(r"Queries per second:\s+([\d.]+)", r.stdout)
    qps = float(m.group(1)) if m else None
    lost = re.search(r"Queries lost:\s+(\d+)", r.stdout)
    lat = sorted(float(x) for x in re.findall(r"^> \S+ .* ([\d.]+)$", r.stdout, re.M)) if verbose else []
    if qps is None:
        log(r.stdout[-2000:], r.stderr[-2000:])
    p = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else (lambda q: None)
    return qps, p(0.5), p(0.99), int(lost.group(1)) if lost else None


def bench_dnsperf(args, coredns):
    from engine.lab import Lab, cleanup_stale
    runs = runs_of(args)
    seconds = 3 if args.quick else args.seconds
    cluster = [f"svc-{i}.default.svc.cluster.local" for i in range(SERVICES)]
    external = [f"ext-{i}.example.com" for i in range(EXTERNAL)]
    results = {}
    cleanup_stale()
    with Lab(pods=0) as lab, tempfile.TemporaryDirectory() as tmp:
        up = lab.add_host("updns", UPSTREAM_IP)
        p = lab.popen(up.ns, [sys.executable, "-m", "engine.lab.dns", "--bind", "0.0.0.0", "--port", "53", "--ttl",
                              "3600"] + [a for n in external for a in ("--record", f"{n}=A:192.0.2.{external.index(n) + 1}")],
                      stdout=subprocess.PIPE)
        assert p.stdout.readline().startswith(b"ready")
        zone = os.path.join(tmp, "cluster.local.zone")
        with open(zone, "w") as f:
            f.write(zone_file())
        conf = os.path.join(tmp, "Corefile")
        with open(conf, "w") as f:
            f.write(COREFILE.format(ip=COREDNS_IP, zone=zone, upstream=UPSTREAM_IP))
        with lab.start_engine(engine_config()):
            cd = lab.popen(lab.node_ns, [coredns, "-conf", conf], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            try:
                time.sleep(1.5)
                servers = {"engine": ENGINE_DNS, "coredns": COREDNS_IP}
                for who, ip in servers.items():         # warm: caches, the engine's answer table
                    dnsperf(lab, ip, cluster + external, 1)
                for run in range(runs):
                    order = list(servers) if run % 2 == 0 else list(servers)[::-1]
                    for who in order:
                        for kind, names in (("cluster names", cluster), ("cached external names", external)):
                            log(f"run {run + 1}/{runs}: {who}, {kind}")
                            qps, _, _, lost = dnsperf(lab, servers[who], names, seconds)
                            _, p50, p99, _ = dnsperf(lab, servers[who], names, 2, verbose=True)
                            results.setdefault((who, kind), []).append((qps, p50, p99, lost))
            finally:
                cd.terminate()
                cd.wait(timeout=5)
        lab.remove_host("updns")
    rows = []
    for kind in ("cluster names", "cached external names"):
        e = results[("engine", kind)]
        c = results[("coredns", kind)]
        eq, cq = median([x[0] for x in e]), median([x[0] for x in c])
        rows.append([kind, cq, eq, f"{ratio(eq, cq):.2f}x" if ratio(eq, cq) else "-",
                     median([x[1] for x in c]), median([x[2] for x in c]),
                     median([x[1] for x in e]), median([x[2] for x in e]),
                     sum(x[3] or 0 for x in e), sum(x[3] or 0 for x in c)])
    return rows, {f"{w}/{k}": v for (w, k), v in results.items()}


def main():
    ap = parser(__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10, help="length of each dnsperf run (default 10)")
    ap.add_argument("--coredns", help="the CoreDNS binary (default: ~/.cache/engine-peers/coredns-*/coredns)")
    ap.add_argument("--skip-dnsperf", action="store_true", help="only the in-memory amplification part")
    args = ap.parse_args()
    out = {}
    print(machine_line())
    rows, worst = amplification()
    out["amplification"] = {"rows": rows, "worst_unverified": worst}
    print(table("DNS amplification: answer bytes / query bytes, source without a valid cookie (UDP)",
                ["query", "query B", "answer B", "factor"], rows))
    print(f"worst factor without a valid cookie: {worst:.2f}x (bound: dns.amplificationLimit, 3)\n")
    if not args.skip_dnsperf:
        coredns = find_coredns(args.coredns)
        if os.geteuid() != 0 or not shutil.which("dnsperf") or not coredns:
            sys.exit("the dnsperf part needs root, dnsperf and a CoreDNS binary (--coredns); --skip-dnsperf skips it")
        version = subprocess.run([coredns, "-version"], capture_output=True, text=True).stdout.split("\n")[0]
        rows, raw = bench_dnsperf(args, coredns)
        out["dnsperf"] = {"rows": rows, "samples": raw, "coredns": version}
        print(table(f"dnsperf, queries/s (median of {runs_of(args)}) and latency (ms, at full load), vs {version}",
                    ["names", "CoreDNS q/s", "engine q/s", "engine/CoreDNS", "CoreDNS p50", "CoreDNS p99",
                     "engine p50", "engine p99", "engine lost", "CoreDNS lost"], rows))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
