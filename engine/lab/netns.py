"""Network-namespace lab for end-to-end tests and `engine demo`.

Topology (every name below lives inside a namespace this lab made; the root
namespace only gains the namespace names themselves, never links or routes):

    {prefix}-client  eth0 192.168.50.2/24, default via 192.168.50.1
    {prefix}-<host>  eth0 192.168.50.x/24, default via 192.168.50.1   (add_host)
          │ veth
    {prefix}-node    lan0 bridge 192.168.50.1/24     ip_forward=1
                     cbr0 bridge 10.244.1.1/24
          │ veth
    {prefix}-p{i}    eth0 10.244.1.(i+1)/24, default via 10.244.1.1, podserver

    with Lab(pods=3) as lab:
        lab.run(lab.client_ns, ["curl", "-s", "http://10.244.1.2/"])
"""

import atexit
import contextlib
import fcntl
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NODE_IP = "192.168.50.1"
CLIENT_IP = "192.168.50.2"
LAN_PREFIXLEN = 24
POD_GATEWAY = "10.244.1.1"
POD_NET = "10.244.1."
POD_PREFIXLEN = 24

# A live Lab holds an flock on {LOCK_DIR}/{prefix}.lock; cleanup_stale only
# removes namespaces whose lock is free, so it never breaks a concurrent run.
LOCK_DIR = "/run/engine-lab" if os.path.isdir("/run") else os.path.join(tempfile.gettempdir(), "engine-lab")


class LabError(RuntimeError):
    pass


@dataclass
class Pod:
    name: str
    ns: str
    ip: str
    index: int
    http_port: int = 80
    udp_port: int = 5353
    proc: Optional[subprocess.Popen] = field(default=None, repr=False)

    def __getitem__(self, key):  # lets tests use pod["ip"] as well as pod.ip
        return getattr(self, key)


@dataclass
class Host:
    name: str
    ns: str
    ip: str

    def __getitem__(self, key):
        return getattr(self, key)


def _ip(*args, check=True):
    """Run one `ip` command in the root namespace's view (we pass -n ourselves)."""
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise LabError("ip %s: %s" % (" ".join(args), r.stderr.strip()))
    return r


def _env(extra=None):
    # Pod processes and `python3 -m engine...` must import this very package.
    env = dict(os.environ if extra is None else extra)
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + pp if pp else "")
    return env


def netns_list():
    """Names of all named network namespaces."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_ns_pids(ns, grace=1.0):
    """Stop every process still inside `ns` so deleting it really frees it."""
    pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
    if not pids:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
            if not pids:
                return
            time.sleep(0.05)


def cleanup_stale(prefix_pattern="eng", force=False):
    """Delete namespaces left by crashed labs (names `^{prefix_pattern}[0-9a-f]+-`).

    Namespaces of a lab that is still alive (its lock is held) are kept unless
    force=True. Returns the names deleted."""
    pat = re.compile(r"^%s[0-9a-f]+-" % re.escape(prefix_pattern))
    by_prefix = {}
    for ns in netns_list():
        if pat.match(ns):
            by_prefix.setdefault(ns.split("-", 1)[0], []).append(ns)
    deleted = []
    for prefix, names in by_prefix.items():
        lock_path = os.path.join(LOCK_DIR, prefix + ".lock")
        fd = None
        if os.path.exists(lock_path) and not force:
            fd = os.open(lock_path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # owner alive
        try:
            for ns in names:
                _kill_ns_pids(ns)
                if _ip("netns", "del", ns, check=False).returncode == 0:
                    deleted.append(ns)
            try:
                os.unlink(lock_path)
            except FileNotFoundError:
                pass
        finally:
            if fd is not None:
                os.close(fd)
    return deleted


class Lab:
    """Namespaces client/node/pods wired as in the module docstring."""

    def __init__(self, pods=3, http_port=80, udp_port=5353, ready_timeout=10.0):
        self.prefix = "eng%d%s" % (os.getpid() % 10000, secrets.token_hex(1))
        self.node_ns = self.prefix + "-node"
        self.client_ns = self.prefix + "-client"
        self.node_ip = NODE_IP
        self.client_ip = CLIENT_IP
        self.pod_gateway = POD_GATEWAY
        self.pods = []            # list[Pod], in creation order
        self.hosts = {}           # short name -> Host (includes "client")
        self.n_pods = pods
        self.http_port = http_port
        self.udp_port = udp_port
        self.ready_timeout = ready_timeout
        self._namespaces = []     # every ns we created, in creation order
        self._procs = []          # every Popen we started
        self._etc_dirs = []       # /etc/netns/<ns> folders we made
        self._next_pod = 1
        self._next_link = 0
        self._lock_fd = None
        self._logdir = None
        self._is_up = False

    # ---- lifecycle ----------------------------------------------------------

    def up(self):
        if self._is_up:
            return self
        self._is_up = True
        atexit.register(self.down)
        os.makedirs(LOCK_DIR, exist_ok=True)
        # Lock before the first namespace exists, so cleanup_stale in another
        # process never sees our namespaces unowned.
        self._lock_fd = os.open(os.path.join(LOCK_DIR, self.prefix + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._logdir = tempfile.mkdtemp(prefix=self.prefix + "-")

        self._add_ns(self.node_ns)
        n = self.node_ns
        # fixed bridge MACs: a bridge otherwise takes the lowest MAC of its
        # ports, and changes it as hosts and pods come and go, leaving stale
        # ARP entries for the gateway in every neighbour (lost packets)
        _ip("-n", n, "link", "add", "lan0", "address", "02:00:c0:a8:32:01", "type", "bridge")
        _ip("-n", n, "addr", "add", "%s/%d" % (NODE_IP, LAN_PREFIXLEN), "dev", "lan0")
        _ip("-n", n, "link", "set", "lan0", "up")
        _ip("-n", n, "link", "add", "cbr0", "address", "02:00:0a:f4:01:01", "type", "bridge")
        _ip("-n", n, "addr", "add", "%s/%d" % (POD_GATEWAY, POD_PREFIXLEN), "dev", "cbr0")
        _ip("-n", n, "link", "set", "cbr0", "up")
        self._sysctl(n, "net.ipv4.ip_forward", "1")

        self.add_host("client", CLIENT_IP)
        for _ in range(self.n_pods):
            self.add_pod()
        return self

    def down(self):
        """Kill our processes and delete our namespaces. Idempotent."""
        if not self._is_up:
            return
        self._is_up = False
        try:
            atexit.unregister(self.down)
        except Exception:
            pass
        self._stop_procs(self._procs)
        self._procs = []
        for ns in reversed(self._namespaces):
            _kill_ns_pids(ns)  # also processes others started in our namespaces
            _ip("netns", "del", ns, check=False)
        self._namespaces = []
        for d in self._etc_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._etc_dirs = []
        self.pods = []
        self.hosts = {}
        if self._logdir:
            shutil.rmtree(self._logdir, ignore_errors=True)
            self._logdir = None
        if self._lock_fd is not None:
            try:
                os.unlink(os.path.join(LOCK_DIR, self.prefix + ".lock"))
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc):
        self.down()
        return False

    @property
    def namespaces(self):
        return list(self._namespaces)

    @property
    def client(self):
        return self.hosts.get("client")

    # ---- topology -----------------------------------------------------------

    def add_pod(self, name=None, ip=None, server=True, http_port=None, udp_port=None):
        """Create a pod namespace on cbr0 and (by default) start its podserver.

        Returns once the pod answers HTTP from the node namespace."""
        self._need_up()
        idx = self._next_pod
        self._next_pod += 1
        name = name or "deploy-nginx-%d" % idx
        if any(p.name == name for p in self.pods):
            raise LabError("pod %s exists" % name)
        used = {p.ip for p in self.pods}
        if ip is None:
            # pod i -> 10.244.1.(i+1); skip addresses taken by explicit ips
            host = idx + 1
            while POD_NET + str(host) in used:
                host += 1
            if host > 254:
                raise LabError("pod network full")
            ip = POD_NET + str(host)
        elif ip in used:
            raise LabError("ip %s already used by a pod" % ip)
        pod = Pod(name=name, ns="%s-p%d" % (self.prefix, idx), ip=ip, index=idx,
                  http_port=http_port or self.http_port, udp_port=udp_port or self.udp_port)

        self._add_ns(pod.ns)
        veth = "veth%d" % idx  # node end; the pod end is eth0
        _ip("-n", self.node_ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod.ns)
        _ip("-n", self.node_ns, "link", "set", veth, "master", "cbr0", "up")
        _ip("-n", pod.ns, "addr", "add", "%s/%d" % (ip, POD_PREFIXLEN), "dev", "eth0")
        _ip("-n", pod.ns, "link", "set", "eth0", "up")
        _ip("-n", pod.ns, "route", "add", "default", "via", POD_GATEWAY)
        self.pods.append(pod)

        if server:
            self._start_podserver(pod)
        return pod

    def remove_pod(self, name):
        pod = self.pod(name)
        if pod.proc is not None:
            self._stop_procs([pod.proc])
            self._procs.remove(pod.proc)
        _kill_ns_pids(pod.ns)
        _ip("netns", "del", pod.ns, check=False)  # takes the veth pair with it
        self._namespaces.remove(pod.ns)
        self.pods.remove(pod)

    def pod(self, name):
        for p in self.pods:
            if p.name == name:
                return p
        raise KeyError(name)

    def add_host(self, short, ip):
        """Another outside host on lan0 (e.g. an upstream DNS server, a second
        client): namespace {prefix}-{short}, eth0 ip/24, default via the node."""
        self._need_up()
        if short in self.hosts or short == "node" or re.fullmatch(r"p\d+", short):
            raise LabError("host name %r taken" % short)
        if ip == NODE_IP or any(h.ip == ip for h in self.hosts.values()):
            raise LabError("ip %s already used on lan0" % ip)
        host = Host(name=short, ns="%s-%s" % (self.prefix, short), ip=ip)
        self._add_ns(host.ns)
        self._next_link += 1
        veth = "vh%d" % self._next_link
        _ip("-n", self.node_ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
        _ip("-n", self.node_ns, "link", "set", veth, "master", "lan0", "up")
        _ip("-n", host.ns, "addr", "add", "%s/%d" % (ip, LAN_PREFIXLEN), "dev", "eth0")
        _ip("-n", host.ns, "link", "set", "eth0", "up")
        _ip("-n", host.ns, "route", "add", "default", "via", NODE_IP)
        self.hosts[short] = host
        return host

    def remove_host(self, short):
        host = self.hosts.pop(short)
        _kill_ns_pids(host.ns)
        _ip("netns", "del", host.ns, check=False)
        self._namespaces.remove(host.ns)

    # ---- running things -----------------------------------------------------

    def run(self, ns, argv, timeout=30, check=False, **kw):
        """Run argv (list, or a str for `sh -c`) in ns; text output captured."""
        if isinstance(argv, str):
            argv = ["sh", "-c", argv]
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw["env"] = _env(kw.get("env"))
        return subprocess.run(["ip", "netns", "exec", ns, *argv], timeout=timeout, check=check, **kw)

    def popen(self, ns, argv, **kw):
        """Start argv in ns in its own process group; down() stops it."""
        if isinstance(argv, str):
            argv = ["sh", "-c", argv]
        kw["env"] = _env(kw.get("env"))
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        self._procs.append(proc)
        return proc

    def python(self, ns, code, *args, timeout=30, **kw):
        """Run a python snippet in ns with this interpreter."""
        return self.run(ns, [sys.executable, "-c", code, *map(str, args)], timeout=timeout, **kw)

    def http_get(self, ns, url, timeout=5):
        """Body of GET url fetched from ns with curl ('' on failure)."""
        r = self.run(ns, ["curl", "-s", "-m", str(timeout), url], timeout=timeout + 5)
        return r.stdout if r.returncode == 0 else ""

    def udp_query(self, ns, ip, port, payload="ping", timeout=2.0):
        """Send one datagram from ns and return the reply text (None on timeout)."""
        r = self.python(ns, _UDP_QUERY, ip, port, payload, timeout, timeout=timeout + 10)
        return r.stdout if r.returncode == 0 else None

    def ping(self, ns, ip, timeout=2.0):
        """True if ip answers one ICMP echo from ns (uses python; ping may be absent)."""
        r = self.python(ns, _PING, ip, timeout, timeout=timeout + 10)
        return r.returncode == 0

    def set_resolv_conf(self, ns, text):
        """resolv.conf for processes started in ns: `ip netns exec` bind-mounts
        /etc/netns/<ns>/resolv.conf over /etc/resolv.conf. Removed by down()."""
        d = os.path.join("/etc/netns", ns)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "resolv.conf"), "w") as f:
            f.write(text)
        self._etc_dirs.append(d)

    # ---- the engine under test --------------------------------------------------

    def pod_manifests(self, labels=None, pods=None):
        """Pod objects (YAML) for the lab's pods, as the API server would show
        them: labels, the named container port `http`, podIP, Ready."""
        labels = labels or {"app": "deploy-nginx"}
        lab = ", ".join(f"{k}: {v}" for k, v in labels.items())
        out = []
        for p in pods if pods is not None else self.pods:
            out.append(f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {p.name}, labels: {{{lab}}}}}
spec:
  containers:
  - name: app
    image: nginx
    ports: [{{name: http, containerPort: {p.http_port}}}, {{name: echo, containerPort: {p.udp_port}, protocol: UDP}}]
status: {{podIP: {p.ip}, conditions: [{{type: Ready, status: "True"}}]}}
""")
        return "".join(out)

    def start_engine(self, config_text, healthz="127.0.0.1:10256", timeout=15.0, args=()):
        """Write config_text to a file and run `engine run` on it in the node
        namespace; returns once /healthz answers 200."""
        self._need_up()
        self.forget_pod_connections()
        path = os.path.join(self._logdir, "engine-%d.yaml" % len(self._procs))
        with open(path, "w") as f:
            f.write(config_text)
        return EngineProc(self, path, healthz, timeout, args)

    @contextlib.contextmanager
    def small_receive_buffer(self, ns, max_bytes=1 << 20):
        """curl --limit-rate paces its reads, not the wire: with the kernel's
        large receive buffers a download can arrive long before curl reads
        it. Within this block, TCP in ns buffers at most max_bytes, so a
        paced transfer stays on the wire as long as its rate says."""
        old = self.run(ns, ["sysctl", "-n", "net.ipv4.tcp_rmem"]).stdout.split()
        self._sysctl(ns, "net.ipv4.tcp_rmem", "4096 %d %d" % (min(131072, max_bytes), max_bytes))
        try:
            yield
        finally:
            self._sysctl(ns, "net.ipv4.tcp_rmem", " ".join(old))

    def forget_pod_connections(self):
        """Drop every pod's TCP sockets but its listeners. A fresh engine
        starts with an empty flow table and picks masquerade ports anew; the
        pods still hold sockets of the last engine's flows (a flood's
        SYN-RECV, TIME_WAIT, downloads cut off when it stopped). A new flow
        whose masqueraded tuple lands on one has its SYN answered out of
        step, is reset, and retries a second later (a node behind
        kube-proxy with random-fully SNAT sees the same), which would blur
        what the tests measure. An engine restarted on its own snapshot
        (restart_engine) keeps them: those flows are handed over."""
        for pod in self.pods:
            r = self.run(pod.ns, ["ss", "-K", "-tn", "exclude", "listening"])
            if r.returncode != 0:
                raise LabError("ss -K in %s: %s" % (pod.ns, r.stderr.strip()))

    def restart_engine(self, eng, timeout=15.0):
        """SIGTERM eng, then start a new engine on the same configuration
        (and so the same flow snapshot); returns the new EngineProc."""
        eng.stop()
        return EngineProc(self, eng.path, eng.healthz, timeout)

    # ---- internals ----------------------------------------------------------

    def _need_up(self):
        if not self._is_up:
            raise LabError("lab is not up")

    def _add_ns(self, ns):
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _sysctl(self, ns, key, value):
        r = self.run(ns, ["sysctl", "-q", "-w", "%s=%s" % (key, value)])
        if r.returncode != 0:
            raise LabError("sysctl %s=%s in %s: %s" % (key, value, ns, r.stderr.strip()))

    def _start_podserver(self, pod):
        log_path = os.path.join(self._logdir, pod.name + ".log")
        with open(log_path, "wb") as log:
            pod.proc = self.popen(pod.ns, [sys.executable, "-m", "engine.lab.podserver", "--name", pod.name,
                                           "--http-port", str(pod.http_port), "--udp-port", str(pod.udp_port)],
                                  stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
        deadline = time.monotonic() + self.ready_timeout

        def fail(why):
            self._stop_procs([pod.proc])
            with open(log_path, errors="replace") as f:
                log_text = f.read().strip()
            raise LabError("pod %s (%s in %s) %s\n%s" % (pod.name, pod.ip, pod.ns, why, log_text))

        # 1. the server says it has bound its sockets (EOF means it died)
        left = deadline - time.monotonic()
        if not select.select([pod.proc.stdout], [], [], max(left, 0))[0]:
            fail("did not report ready within %.0fs" % self.ready_timeout)
        if not pod.proc.stdout.readline().startswith(b"ready"):
            fail("exited during startup (rc=%s)" % pod.proc.wait())
        # 2. it answers through the bridge from the node namespace
        left = max(deadline - time.monotonic(), 1.0)
        r = self.python(self.node_ns, _HTTP_READY, pod.ip, pod.http_port, pod.name, left, timeout=left + 10)
        if r.returncode != 0:
            fail("not reachable from the node over cbr0: %s" % (r.stdout + r.stderr).strip())

    @staticmethod
    def _stop_procs(procs, grace=2.0):
        live = [p for p in procs if p.poll() is None]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in live:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            for p in live:
                try:
                    p.wait(max(deadline - time.monotonic(), 0.01))
                except subprocess.TimeoutExpired:
                    pass
            live = [p for p in live if p.poll() is None]
            if not live:
                break
        for p in procs:
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()


# Snippets run with `python3 -c` inside a namespace (argv after the code).

_HTTP_READY = r"""
import socket, sys, time
ip, port, name, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
deadline = time.monotonic() + timeout
err = ""
while time.monotonic() < deadline:
    try:
        s = socket.create_connection((ip, port), timeout=0.5)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            b = s.recv(4096)
            if not b:
                break
            data += b
        s.close()
        if data.endswith(("\r\n\r\n" + name + "\n").encode()):
            sys.exit(0)
        err = "unexpected reply %r" % data[-200:]
    except OSError as e:
        err = str(e)
    time.sleep(0.02)
print(err)
sys.exit(1)
"""

_UDP_QUERY = r"""
import socket, sys
ip, port, payload, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(timeout)
s.sendto(payload.encode(), (ip, port))
try:
    sys.stdout.write(s.recv(65535).decode(errors="replace"))
except OSError as e:
    sys.stderr.write(str(e))
    sys.exit(1)
"""

_PING = r"""
import os, socket, struct, sys, time
from engine.lab.packets import echo_request
ip, timeout = sys.argv[1], float(sys.argv[2])
ident = os.getpid() & 0xFFFF
pkt = echo_request(ident, 1, b"engine-lab-ping")
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.sendto(pkt, (ip, 0))
deadline = time.monotonic() + timeout
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        sys.exit(1)
    s.settimeout(left)
    try:
        data, addr = s.recvfrom(65535)
    except socket.timeout:
        sys.exit(1)
    ihl = (data[0] & 0x0F) * 4
    t, _, _, rid, seq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
    if t == 0 and rid == ident and addr[0] == ip:
        sys.exit(0)
"""


class EngineProc:
    """`engine run CONFIG` in the node namespace of a Lab."""

    def __init__(self, lab, path, healthz, timeout, args=()):
        self.lab = lab
        self.path = path
        self.log_path = "%s.%d.log" % (path, time.monotonic_ns())   # one per start: restarts keep both
        self._log = open(self.log_path, "wb")
        self.socket = path + ".sock"
        self.proc = lab.popen(lab.node_ns, [sys.executable, "-m", "engine", *args, "run", path,
                                            "--control-socket", self.socket, "--state-file", path + ".flows"],
                              stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              cwd=REPO_ROOT)
        self.healthz = healthz
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise LabError("engine exited (rc=%s):\n%s" % (self.proc.returncode, self.log()))
            r = lab.run(lab.node_ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                      "-m", "1", "http://%s/healthz" % healthz])
            # healthz from *this* engine: another may hold the port
            if r.stdout == "200" and self.proc.poll() is None and \
                    ("engine running (pid %d)" % self.proc.pid) in self.log():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise LabError("engine not healthy within %.0fs:\n%s" % (timeout, self.log()))
            time.sleep(0.05)

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def ctl(self, *argv, input=None):
        """Run `engine ARGV --socket <this engine's socket>` (get, describe,
        conntrack, stats, apply, delete); returns the CompletedProcess."""
        return subprocess.run([sys.executable, "-m", "engine", *argv, "--socket", self.socket],
                              capture_output=True, text=True, input=input, cwd=REPO_ROOT, timeout=60)

    def send(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        """Signal the engine and wait; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False
