#!/usr/bin/env python3
"""Paths to the same backends, side by side in one run, on the namespace lab
of engine.lab (client, node, 3 pods running nginx and iperf3, all with the
kernel's default sysctls: the servers keep TIME_WAIT as in a user's cluster):

  kernel     nftables in the node namespace, programmed as kube-proxy's
             nftables mode does it: a VIP:port verdict map, `numgen random
             mod N` over endpoint chains that mark for masquerade and DNAT,
             and in postrouting plain `masquerade` (keeps the client's source
             port when that tuple is free) (VIP 10.97.200.1, outside the
             engine's serviceCIDR);
  kubeproxy  the same rules with kube-proxy's real SNAT, `masquerade
             fully-random` (a random source port for every connection);
  haproxy  haproxy in TCP mode on the node (192.168.50.1:8080 -> pods:80
           roundrobin, :5201 -> iperf3), nbthread 2;
  engine   `engine run` (ClusterIP 10.96.100.100:80 -> pods:80, and
           10.96.100.101:5201 TCP+UDP -> iperf3);
  direct   no load balancer: client -> pod 1 (the baseline for added latency).

iperf3 needs its control and data connections on the same server, and no
path here has session affinity, so the iperf3 service of every path has one
endpoint (pod 1); the HTTP service has all three pods.

Workloads, each path in turn, the order rotated from run to run:
  TCP bulk, iperf3, 1 and 4 streams (Gbit/s received) and the CPU time of the
  whole machine (user+nice+system+irq+softirq from /proc/stat) per GB moved;
  UDP 64-byte datagrams, iperf3 -u -l 64 -b 0, packets/s received;
  new TCP connections/s, wrk -t1 -c32 with Connection: close against nginx;
  latency of sequential request/response round trips at low load, on one
  keep-alive connection and with a new connection per request, p50/p99 in us,
  and the latency added over the direct path.

    sudo python3 bench/bench_paths.py [--quick] [--runs N] [--json FILE]

Everything runs inside namespaces this script makes; they are removed on exit,
also on failure or Ctrl-C.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (fmt_ratio, log, machine_line, median, parser, ratio,  # noqa: E402
                     runs_of, table, write_json)

from engine.lab import Lab, LabError, cleanup_stale  # noqa: E402

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
IPERF_PORT = 5201
ENGINE_VIP = "10.96.100.100"        # HTTP
ENGINE_IPERF_VIP = "10.96.100.101"  # iperf3, TCP and UDP
KERNEL_VIP = "10.97.200.1"          # outside the engine's serviceCIDR (10.96.0.0/16)
HAPROXY_HTTP_PORT = 8080
MODES = ("kernel", "kubeproxy", "haproxy", "engine", "direct")
LB_MODES = ("kernel", "kubeproxy", "haproxy", "engine")

ENGINE_CONFIG = f"""apiVersion: engine/v1alpha1
kind: EngineConfiguration
serviceCIDR: 10.96.0.0/16
masqueradeIP: 169.254.100.1
conntrack: {{max: 1048576}}
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  clusterIP: {ENGINE_VIP}
  selector: {{app: deploy-nginx}}
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 80}}]
---
apiVersion: v1
kind: Service
metadata: {{name: iperf}}
spec:
  clusterIP: {ENGINE_IPERF_VIP}
  ports:
  - {{name: tcp, protocol: TCP, port: {IPERF_PORT}, targetPort: {IPERF_PORT}}}
  - {{name: udp, protocol: UDP, port: {IPERF_PORT}, targetPort: {IPERF_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: iperf-1, labels: {{kubernetes.io/service-name: iperf}}}}
addressType: IPv4
ports: [{{name: tcp, port: {IPERF_PORT}, protocol: TCP}}, {{name: udp, port: {IPERF_PORT}, protocol: UDP}}]
endpoints:
- addresses: [{{pod1}}]
  conditions: {{ready: true}}
"""

NGINX_CONF = """user root;
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen 80 backlog=4096;
        location / {{ return 200 "{name}\\n"; }}
    }}
}}
"""

HAPROXY_CONF = """global
    maxconn 8000
    nbthread 2
    pidfile {dir}/haproxy.pid
defaults
    mode tcp
    maxconn 8000
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend http
    bind {node}:{hport}
    default_backend pods_http
backend pods_http
    balance roundrobin
{servers}
frontend iperf
    bind {node}:{iport}
    default_backend pods_iperf
backend pods_iperf
    server p1 {pod1}:{iport}
"""

# kube-proxy's nftables mode, reduced to this one service pair: service-ips
# verdict map -> service chain (mark for masquerade for sources outside the
# cluster CIDR, numgen random over endpoint chains) -> endpoint chain (DNAT);
# postrouting masquerades what was marked.
NFT_RULES = """table ip kbench {{
    map service-ips {{
        type ipv4_addr . inet_proto . inet_service : verdict
        elements = {{ {vip} . tcp . 80 : goto svc-web, {vip} . tcp . {iport} : goto svc-iperf-tcp,
                     {vip} . udp . {iport} : goto svc-iperf-udp }}
    }}
    chain mark-for-masquerade {{
        meta mark set meta mark | 0x4000
    }}
    chain masquerading {{
        meta mark & 0x4000 == 0 return
        meta mark set meta mark ^ 0x4000
        {masquerade}
    }}
    chain services {{
        ip daddr . meta l4proto . th dport vmap @service-ips
    }}
    chain nat-prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        jump services
    }}
    chain nat-output {{
        type nat hook output priority -100; policy accept;
        jump services
    }}
    chain nat-postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        jump masquerading
    }}
    chain svc-web {{
        ip saddr != 10.244.0.0/16 jump mark-for-masquerade
        numgen random mod {n} vmap {{ {web_vmap} }}
    }}
{web_eps}
    chain svc-iperf-tcp {{
        ip saddr != 10.244.0.0/16 jump mark-for-masquerade
        meta l4proto tcp dnat to {pod1}:{iport}
    }}
    chain svc-iperf-udp {{
        ip saddr != 10.244.0.0/16 jump mark-for-masquerade
        meta l4proto udp dnat to {pod1}:{iport}
    }}
}}
"""

# Sequential round trips from the client namespace, alternating between the
# targets (the path under test and the direct path to pod 1) sample by sample,
# so both see the same moment of a noisy machine; prints JSON percentiles per
# target.
LATENCY_CLIENT = r"""
import json, socket, sys, time
targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in sys.argv[1].split(",")]
n, mode = int(sys.argv[2]), sys.argv[3]
pc = time.perf_counter_ns

def read_response(s, close):
    buf = b""
    while True:
        b = s.recv(4096)
        if not b:
            return buf
        buf += b
        if not close:
            h = buf.find(b"\r\n\r\n")
            if h >= 0:
                m = buf.lower().find(b"content-length:")
                if m >= 0:
                    ln = int(buf[m + 15:buf.find(b"\r\n", m)])
                    if len(buf) >= h + 4 + ln:
                        return buf

def connect(t):
    s = socket.create_connection(t, timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s

def keepalive(s):
    s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    if not read_response(s, False).startswith(b"HTTP/1.1 200"):
        raise SystemExit("bad response")

def fresh(t):
    s = connect(t)
    s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
    r = read_response(s, True)
    s.close()
    if not r.startswith(b"HTTP/1.1 200"):
        raise SystemExit("bad response")

times = [[] for _ in targets]
warm = 200 if mode == "keepalive" else 50
socks = [connect(t) for t in targets] if mode == "keepalive" else None
for i in range(n + warm):
    for j, t in enumerate(targets):
        t0 = pc()
        if socks:
            keepalive(socks[j])
        else:
            fresh(t)
        t1 = pc()
        if i >= warm:
            times[j].append(t1 - t0)
        if not socks:
            time.sleep(0.0002)
out = []
for ts in times:
    ts.sort()
    q = lambda p: ts[min(len(ts) - 1, int(p * len(ts)))] / 1e3
    out.append({"p50": q(0.50), "p99": q(0.99), "mean": sum(ts) / len(ts) / 1e3, "n": len(ts)})
print(json.dumps(out))
"""


# --- /proc/stat CPU accounting ------------------------------------------------------

def cpu_busy_seconds():
    """Busy CPU time of the whole machine: user+nice+system+irq+softirq
    (kernel forwarding and NAT run in softirq, so it must count)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = v[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def softnet_drops():
    """Packets the kernel dropped because a CPU's input backlog was full
    (netdev_max_backlog; veth and TUN writes queue there): /proc/net/softnet_stat."""
    total = 0
    with open("/proc/net/softnet_stat") as f:
        for line in f:
            total += int(line.split()[1], 16)
    return total


# --- the bench ------------------------------------------------------------------------

class Bench:
    def __init__(self, lab, tmp, quick):
        self.lab = lab
        self.tmp = tmp
        self.quick = quick
        self.secs = 2 if quick else 5
        self.lat_n = 300 if quick else 2000
        self.pod1 = lab.pods[0].ip
        self.engine = None
        self.haproxy = None

    # -- servers in the pods
    def start_servers(self):
        for pod in self.lab.pods:
            # default sysctls: nginx closes first and keeps a TIME_WAIT socket
            # per connection, which a path's SNAT must not land a new SYN on
            d = os.path.join(self.tmp, pod.name)
            os.makedirs(d, exist_ok=True)
            conf = os.path.join(d, "nginx.conf")
            with open(conf, "w") as f:
                f.write(NGINX_CONF.format(dir=d, name=pod.name))
            self.lab.popen(pod.ns, [NGINX, "-c", conf, "-p", d + "/"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "nginx.stderr"), "wb"))
            self.lab.popen(pod.ns, ["iperf3", "-s", "-p", str(IPERF_PORT)], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "iperf3.stderr"), "wb"))
        for pod in self.lab.pods:
            self.wait_tcp(self.lab.node_ns, pod.ip, 80, f"nginx in {pod.name}")
            self.wait_tcp(self.lab.node_ns, pod.ip, IPERF_PORT, f"iperf3 in {pod.name}")

    def wait_tcp(self, ns, ip, port, what, timeout=10.0):
        code = ("import socket,sys,time\nd=time.time()+%f\n"
                "while time.time()<d:\n"
                "  try:\n    socket.create_connection((%r,%d),timeout=0.5).close(); sys.exit(0)\n"
                "  except OSError: time.sleep(0.05)\nsys.exit(1)\n") % (timeout, ip, port)
        if self.lab.python(ns, code, timeout=timeout + 10).returncode != 0:
            raise LabError(f"{what} does not accept connections on {ip}:{port}")

    # -- paths
    def targets(self, mode):
        """(http ip, http port, iperf ip, iperf port, udp?) of a path."""
        if mode in ("kernel", "kubeproxy"):
            return KERNEL_VIP, 80, KERNEL_VIP, IPERF_PORT, True
        if mode == "haproxy":
            return self.lab.node_ip, HAPROXY_HTTP_PORT, self.lab.node_ip, IPERF_PORT, False
        if mode == "engine":
            return ENGINE_VIP, 80, ENGINE_IPERF_VIP, IPERF_PORT, True
        return self.pod1, 80, self.pod1, IPERF_PORT, True

    def setup(self, mode):
        lab = self.lab
        if mode in ("kernel", "kubeproxy"):
            n = len(lab.pods)
            web_vmap = ", ".join(f"{i} : goto ep-web-{i}" for i in range(n))
            web_eps = "\n".join(f"    chain ep-web-{i} {{\n        meta l4proto tcp dnat to {p.ip}:80\n    }}"
                                for i, p in enumerate(lab.pods))
            rules = NFT_RULES.format(vip=KERNEL_VIP, iport=IPERF_PORT, n=n, web_vmap=web_vmap,
                                     web_eps=web_eps, pod1=self.pod1,
                                     masquerade="masquerade" if mode == "kernel" else "masquerade fully-random")
            path = os.path.join(self.tmp, "kbench.nft")
            with open(path, "w") as f:
                f.write(rules)
            r = lab.run(lab.node_ns, ["nft", "-f", path])
            if r.returncode != 0:
                raise LabError("nft: " + r.stderr)
        elif mode == "haproxy":
            d = os.path.join(self.tmp, "haproxy")
            os.makedirs(d, exist_ok=True)
            servers = "\n".join(f"    server p{i + 1} {p.ip}:80" for i, p in enumerate(lab.pods))
            conf = os.path.join(d, "haproxy.cfg")
            with open(conf, "w") as f:
                f.write(HAPROXY_CONF.format(dir=d, node=lab.node_ip, hport=HAPROXY_HTTP_PORT,
                                            iport=IPERF_PORT, servers=servers, pod1=self.pod1))
            self.haproxy = lab.popen(lab.node_ns, ["haproxy", "-db", "-f", conf], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "stderr"), "wb"))
            self.wait_tcp(lab.client_ns, lab.node_ip, HAPROXY_HTTP_PORT, "haproxy")
        elif mode == "engine":
            cfg = ENGINE_CONFIG.replace("{pod1}", self.pod1) + lab.pod_manifests()
            self.engine = lab.start_engine(cfg, timeout=30)
        # every path must answer before it is measured
        ip, port, _, _, _ = self.targets(mode)
        self.wait_tcp(lab.client_ns, ip, port, f"{mode} path")

    def teardown(self, mode):
        lab = self.lab
        if mode in ("kernel", "kubeproxy"):
            lab.run(lab.node_ns, ["nft", "delete", "table", "ip", "kbench"])
        elif mode == "haproxy" and self.haproxy is not None:
            try:
                os.killpg(self.haproxy.pid, signal.SIGTERM)
                self.haproxy.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.haproxy.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.haproxy = None
        elif mode == "engine" and self.engine is not None:
            self.engine.stop()
            self.engine_log_tail = self.engine.log()[-2000:]
            self.engine = None

    # -- workloads
    def iperf(self, ip, port, extra):
        """One iperf3 client run; retries while the server is still busy with
        the previous test. Returns the parsed JSON."""
        argv = ["iperf3", "-c", ip, "-p", str(port), "-t", str(self.secs), "-J", *extra]
        for attempt in range(4):
            r = self.lab.run(self.lab.client_ns, argv, timeout=self.secs + 40)
            try:
                d = json.loads(r.stdout)
            except ValueError:
                d = {"error": (r.stdout + r.stderr).strip()[-300:] or f"rc={r.returncode}"}
            if "error" in d and "busy" in d["error"] and attempt < 3:
                time.sleep(1)
                continue
            if "error" in d:
                raise RuntimeError(f"iperf3 {' '.join(extra)} to {ip}:{port}: {d['error']}")
            return d
        raise AssertionError("unreachable")

    def tcp_bulk(self, ip, port, streams):
        time.sleep(0.3)
        c0 = cpu_busy_seconds()
        d = self.iperf(ip, port, ["-P", str(streams)] if streams > 1 else [])
        c1 = cpu_busy_seconds()
        s = d["end"]["sum_received"]
        gb = s["bytes"] / 1e9
        return {"gbps": s["bits_per_second"] / 1e9, "cpu_per_gb": (c1 - c0) / gb if gb else None,
                "retransmits": d["end"]["sum_sent"].get("retransmits")}

    def tun_drops(self):
        r = self.lab.run(self.lab.node_ns, ["sh", "-c", "cat /sys/class/net/*/statistics/tx_dropped "
                                            "2>/dev/null; true"])
        # every device of the node namespace: only the TUN drops on tx here
        return sum(int(x) for x in r.stdout.split() if x.isdigit())

    def rcvbuf_errors(self):
        """UDP datagrams the iperf3 server's socket had no room for (pod 1)."""
        r = self.lab.run(self.lab.pods[0].ns, ["cat", "/proc/net/snmp"])
        lines = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("Udp:")]
        if len(lines) < 2:
            return 0
        return int(dict(zip(lines[0][1:], lines[1][1:])).get("RcvbufErrors", 0))

    def udp_small(self, ip, port):
        time.sleep(0.3)
        s0, t0, r0 = softnet_drops(), self.tun_drops(), self.rcvbuf_errors()
        d = self.iperf(ip, port, ["-u", "-l", "64", "-b", "0"])
        s1, t1, r1 = softnet_drops(), self.tun_drops(), self.rcvbuf_errors()
        s = d["end"]["sum"]
        secs = s.get("seconds") or self.secs
        received = s["packets"] - s["lost_packets"]
        return {"pps": received / secs, "sent_pps": s["packets"] / secs,
                "lost_percent": s.get("lost_percent"),
                "backlog_drops_pps": (s1 - s0) / secs, "node_tx_drops_pps": (t1 - t0) / secs,
                "rcvbuf_drops_pps": (r1 - r0) / secs}

    def wrk(self, ip, port):
        time.sleep(0.3)
        r = self.lab.run(self.lab.client_ns, ["wrk", "-t1", "-c32", f"-d{self.secs}s", "-H", "Connection: close",
                                              f"http://{ip}:{port}/"], timeout=self.secs + 30)
        m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
        if not m:
            raise RuntimeError("wrk: " + (r.stdout + r.stderr)[-500:])
        err = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", r.stdout)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
        return {"cps": float(m.group(1)),
                "errors": sum(int(x) for x in err.groups()) if err else 0,
                "non2xx": int(non2xx.group(1)) if non2xx else 0}

    def latency(self, ip, port, mode):
        """p50/p99 of ip:port, and of the direct path measured alternately in
        the same client: added_p50/added_p99 = path - direct."""
        time.sleep(0.2)
        n = self.lat_n if mode == "keepalive" else self.lat_n // 2
        targets = f"{ip}:{port}" + ("" if ip == self.pod1 else f",{self.pod1}:80")
        r = self.lab.python(self.lab.client_ns, LATENCY_CLIENT, targets, n, mode, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"latency client ({mode}) to {ip}:{port}: {(r.stdout + r.stderr)[-300:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        out = dict(res[0])
        base = res[1] if len(res) > 1 else res[0]
        out["direct_p50"], out["direct_p99"] = base["p50"], base["p99"]
        out["added_p50"] = out["p50"] - base["p50"]
        out["added_p99"] = out["p99"] - base["p99"]
        return out

    def measure(self, mode):
        hip, hport, iip, iport, udp = self.targets(mode)
        out = {}
        # latency first, while the machine is quiet; wrk last
        steps = [("lat_keepalive", lambda: self.latency(hip, hport, "keepalive")),
                 ("lat_connect", lambda: self.latency(hip, hport, "connect")),
                 ("tcp1", lambda: self.tcp_bulk(iip, iport, 1)),
                 ("tcp4", lambda: self.tcp_bulk(iip, iport, 4)),
                 ("udp", (lambda: self.udp_small(iip, iport)) if udp else None),
                 ("cps", lambda: self.wrk(hip, hport))]
        for name, fn in steps:
            if fn is None:
                continue
            try:
                out[name] = fn()
                log(f"    {name}: {json.dumps(out[name])}")
            except Exception as e:      # one failed workload must not lose the others
                log(f"    {name}: FAILED: {e}")
                out[name] = {"error": str(e)}
        return out


def collect(results, mode, key, field):
    vals = []
    for run in results:
        d = run.get(mode, {}).get(key)
        if isinstance(d, dict) and d.get(field) is not None:
            vals.append(d[field])
    return median(vals)


def report(results, runs, quick, secs):
    rows = []
    spec = [("TCP bulk, 1 stream (Gbit/s)", "tcp1", "gbps", False),
            ("TCP bulk, 4 streams (Gbit/s)", "tcp4", "gbps", False),
            ("UDP 64 B received (pkt/s)", "udp", "pps", False),
            ("UDP 64 B sent (pkt/s)", "udp", "sent_pps", False),
            ("  dropped: CPU backlog full (pkt/s)", "udp", "backlog_drops_pps", True),
            ("  dropped: node tx queues/TUN (pkt/s)", "udp", "node_tx_drops_pps", True),
            ("  dropped: server socket full (pkt/s)", "udp", "rcvbuf_drops_pps", True),
            ("new TCP connections/s (wrk)", "cps", "cps", False),
            ("latency keep-alive p50 (us)", "lat_keepalive", "p50", True),
            ("latency keep-alive p99 (us)", "lat_keepalive", "p99", True),
            ("latency connect+req p50 (us)", "lat_connect", "p50", True),
            ("latency connect+req p99 (us)", "lat_connect", "p99", True),
            ("CPU s per GB, 1 stream", "tcp1", "cpu_per_gb", True),
            ("CPU s per GB, 4 streams", "tcp4", "cpu_per_gb", True)]
    figures = {}
    for label, key, field, lower_better in spec:
        v = {m: collect(results, m, key, field) for m in MODES}
        figures[label] = v
        diag = label.startswith("  ")      # a diagnostic row: no ratios
        rows.append([label, v["kernel"], v["kubeproxy"], v["haproxy"], v["engine"], v["direct"],
                     "" if diag else fmt_ratio(ratio(v["engine"], v["kernel"])),
                     "" if diag else fmt_ratio(ratio(v["engine"], v["kubeproxy"])),
                     "" if diag else fmt_ratio(ratio(v["engine"], v["haproxy"]))])
    for label, key, field in (("added latency keep-alive p50 (us)", "lat_keepalive", "added_p50"),
                              ("added latency keep-alive p99 (us)", "lat_keepalive", "added_p99"),
                              ("added latency connect+req p50 (us)", "lat_connect", "added_p50"),
                              ("added latency connect+req p99 (us)", "lat_connect", "added_p99")):
        # path - direct, the two sampled alternately by one client, median over runs
        v = {m: collect(results, m, key, field) for m in MODES}
        figures[label] = v
        diffs = [None if v["engine"] is None or v[m] is None else v["engine"] - v[m]
                 for m in ("kernel", "kubeproxy", "haproxy")]
        rows.append([label, v["kernel"], v["kubeproxy"], v["haproxy"], v["engine"], v["direct"],
                     *("-" if d is None else f"{d:+.0f} us" for d in diffs)])
    title = (f"Paths to the same backends: medians of {runs} run(s), {secs} s per throughput test"
             + (" (--quick)" if quick else ""))
    text = table(title, ["workload", "kernel nft", "kube-proxy nft", "haproxy", "engine", "direct",
                         "engine/kernel", "engine/kube-proxy", "engine/haproxy"], rows)
    notes = ["  kernel nft: plain `masquerade` (keeps the client's port); kube-proxy nft: the same rules with",
             "  kube-proxy's `masquerade fully-random`. Servers keep TIME_WAIT (default sysctls).",
             "  ratios: engine/path; above 1.00x the engine is ahead for rates, behind for latency and CPU/GB.",
             "  added latency: path minus direct client->pod, the two sampled alternately by one client",
             "  (so both see the same moment of a noisy machine); those rows show engine - path in us.",
             "  haproxy has no UDP. iperf3 goes to pod 1 on every path (no session affinity anywhere).",
             "  CPU s per GB: busy time of the whole machine (all CPUs, softirq included) per GB received.",
             "  UDP drops during the UDP test: /proc/net/softnet_stat (whole machine; netdev_max_backlog),",
             "  tx_dropped of the node namespace's devices (the TUN's queue to the engine), and Udp",
             "  RcvbufErrors in pod 1 (the iperf3 server not keeping up)."]
    errors = []
    for i, run in enumerate(results):
        for m, d in run.items():
            for k, v in d.items():
                if isinstance(v, dict) and "error" in v:
                    errors.append(f"  run {i + 1} {m} {k}: {v['error'][:200]}")
                if k == "cps" and isinstance(v, dict) and (v.get("errors") or v.get("non2xx")):
                    errors.append(f"  run {i + 1} {m} wrk: {v.get('errors')} socket errors, {v.get('non2xx')} non-2xx")
    if errors:
        notes.append("  problems seen:")
        notes += errors
    return text + "\n" + "\n".join(notes), figures


def main():
    args = parser(__doc__.split("\n\n")[0]).parse_args()
    if os.geteuid() != 0:
        print("bench_paths needs root (network namespaces): sudo python3 bench/bench_paths.py", file=sys.stderr)
        return 2
    for tool in ("iperf3", "wrk", "haproxy", "nft", NGINX):
        if not shutil.which(tool):
            print(f"bench_paths needs {tool}", file=sys.stderr)
            return 2
    runs = runs_of(args)
    cleanup_stale()
    tmp = tempfile.mkdtemp(prefix="bench-paths-")
    os.chmod(tmp, 0o755)
    results = []
    # SIGTERM should unwind like Ctrl-C so the Lab context manager cleans up
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    bench = None
    try:
        lab = Lab(pods=0)
        with lab:
            log(f"lab namespaces: {lab.prefix}-*")
            for _ in range(3):
                lab.add_pod(server=False)
            bench = Bench(lab, tmp, args.quick)
            bench.start_servers()
            for run in range(runs):
                order = MODES[run % len(MODES):] + MODES[:run % len(MODES)]
                res = {}
                for mode in order:
                    log(f"[run {run + 1}/{runs}] {mode}")
                    try:
                        bench.setup(mode)
                    except Exception as e:
                        log(f"    setup FAILED: {e}")
                        res[mode] = {"setup": {"error": str(e)}}
                        bench.teardown(mode)
                        continue
                    try:
                        res[mode] = bench.measure(mode)
                    finally:
                        bench.teardown(mode)
                results.append(res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text, figures = report(results, runs, args.quick, bench.secs if bench else 0)
    print(machine_line())
    print()
    print(text)
    write_json(args.json, {"runs": runs, "quick": args.quick, "results": results, "medians": figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
