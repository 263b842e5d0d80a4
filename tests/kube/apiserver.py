"""A real control plane for tests: etcd and kube-apiserver (and optionally
kube-controller-manager) on loopback, in a temporary directory, with their
own CA, serving and client certificates and service-account key, RBAC on.
The binaries come from scripts/build_peers.sh's cache.

    with ControlPlane() as cp:
        cp.admin          # engine.kube.client.Client as system:masters
        cp.admin_kubeconfig

Everything it started is stopped on exit, also when starting fails."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from engine.kube.client import ApiError, Client, path_for
from engine.kube.kubeconfig import load_kubeconfig

from pki import PKI, kubeconfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_PEERS = os.path.join(ROOT, "scripts", "build_peers.sh")


class PeersMissing(RuntimeError):
    pass


def peer_paths(*names):
    """{name: path} of cached peers, from build_peers.sh --cached."""
    r = subprocess.run(["bash", BUILD_PEERS, "--cached", *names], capture_output=True, text=True)
    if r.returncode != 0:
        raise PeersMissing(f"{' '.join(names)} not built (run scripts/build_peers.sh): {r.stderr.strip()}")
    return dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ControlPlane:
    def __init__(self, host="127.0.0.1", service_cidr="10.96.0.0/12", controller_manager=False,
                 apiserver_args=(), workdir=None):
        self.host = host
        self.service_cidr = service_cidr
        self.controller_manager = controller_manager
        self.apiserver_args = list(apiserver_args)
        self._own_dir = workdir is None
        self.dir = workdir or tempfile.mkdtemp(prefix="engine-kube-")
        self.procs = {}
        self.logs = {}

    # -- lifecycle -------------------------------------------------------
    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        names = ["etcd", "kube-apiserver"] + (["kube-controller-manager"] if self.controller_manager else [])
        self.bin = peer_paths(*names)
        pki = PKI(os.path.join(self.dir, "pki"))
        self.pki = pki
        self.ca_file = pki.ca_file
        self.sa_key, self.sa_pub = pki.service_account_keys()
        serving = pki.issue("apiserver", "kube-apiserver", client=False,
                            server_names=(self.host, "localhost", "kubernetes", "kubernetes.default",
                                          "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"))
        self.etcd_port, self.etcd_peer_port, self.port = free_port(), free_port(), free_port(self.host)
        self.server = f"https://{self.host}:{self.port}"
        admin_crt, admin_key = pki.issue("admin", "admin", groups=("system:masters",))
        self.admin_kubeconfig = kubeconfig(os.path.join(self.dir, "admin.kubeconfig"), self.server,
                                           pki.ca_file, admin_crt, admin_key, user="admin")
        self.admin = Client(load_kubeconfig(self.admin_kubeconfig), user_agent="engine-tests")
        self.start_etcd()
        self.start_apiserver(serving)
        if self.controller_manager:
            self.start_controller_manager()

    def popen(self, argv, **kw):
        """Starts argv[0] (a peer built by build_peers.sh, run from its cached
        path) with its output in NAME.log, in its own process group so stop()
        ends it and anything it forks."""
        name = argv[0]
        log = open(os.path.join(self.dir, f"{name}.log"), "ab")
        self.logs[name] = log.name
        self.procs[name] = subprocess.Popen(argv, executable=self.bin[name], stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.dir, start_new_session=True, **kw)
        log.close()

    def log_tail(self, name, lines=40):
        try:
            with open(self.logs[name], errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except (KeyError, OSError):
            return ""

    def _wait(self, name, ready, timeout):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            p = self.procs[name]
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.log_tail(name)}")
            try:
                if ready():
                    return
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.2)
        raise TimeoutError(f"{name} not ready after {timeout}s (last: {last}):\n{self.log_tail(name)}")

    def start_etcd(self):
        self.etcd_dir = os.path.join(self.dir, "etcd")
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        self.popen(["etcd", "--name=default", f"--data-dir={self.etcd_dir}",
                             f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
                             f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                             f"--initial-cluster=default={peer}", "--unsafe-no-fsync=true",
                             "--log-level=warn"])
        import urllib.request

        def healthy():
            with urllib.request.urlopen(f"{client}/health", timeout=2) as r:
                return b'"true"' in r.read()
        self._wait("etcd", healthy, 60)

    def start_apiserver(self, serving=None):
        if serving is None:
            serving = (os.path.join(self.pki.dir, "apiserver.crt"), os.path.join(self.pki.dir, "apiserver.key"))
        self.popen([
            "kube-apiserver",
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--bind-address={self.host}", f"--secure-port={self.port}", f"--advertise-address={self.host}",
            f"--tls-cert-file={serving[0]}", f"--tls-private-key-file={serving[1]}",
            f"--client-ca-file={self.ca_file}",
            f"--service-cluster-ip-range={self.service_cidr}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self.sa_pub}",
            f"--service-account-signing-key-file={self.sa_key}",
            "--authorization-mode=RBAC",
            # no controller makes the default ServiceAccounts pods would need
            "--disable-admission-plugins=ServiceAccount",
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            f"--cert-dir={os.path.join(self.dir, 'pki')}",
            "--profiling=false",
            *self.apiserver_args])

        def ready():
            return self.admin.request("GET", "/readyz") is not None
        self._wait("kube-apiserver", ready, 180)

    def start_controller_manager(self, controllers="endpointslice"):
        """kube-controller-manager with just the controllers asked for (its
        EndpointSlice controller makes slices from Pods whose status the
        tests set: no kubelet runs here)."""
        crt, key = self.pki.issue("kcm", "system:kube-controller-manager", groups=("system:masters",))
        kc = kubeconfig(os.path.join(self.dir, "kcm.kubeconfig"), self.server, self.ca_file, crt, key, user="kcm")
        self.popen([
            "kube-controller-manager", f"--kubeconfig={kc}", f"--controllers={controllers}",
            "--leader-elect=false", "--secure-port=0", "--concurrent-service-endpoint-syncs=5",
            f"--service-cluster-ip-range={self.service_cidr}"])
        # up once it has been running a moment without exiting
        started = time.monotonic()
        self._wait("kube-controller-manager", lambda: time.monotonic() - started > 1.0, 30)

    def stop_process(self, name, sig=signal.SIGTERM, timeout=10):
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)

    def stop(self):
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            self.stop_process(name)
        if self._own_dir and not os.environ.get("ENGINE_KEEP_KUBE_DIR"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers for tests ------------------------------------------------
    def user_kubeconfig(self, name, user, groups=()):
        """A kubeconfig authenticating with a client certificate as USER."""
        crt, key = self.pki.issue(name, user, groups=groups)
        return kubeconfig(os.path.join(self.dir, f"{name}.kubeconfig"), self.server, self.ca_file,
                          crt, key, user=user)

    def service_account_kubeconfig(self, namespace, name, expiration=3600):
        """A kubeconfig with a real token of ServiceAccount namespace/name,
        from the TokenRequest API (the account must exist)."""
        tr = self.admin.create(path_for("ServiceAccount", namespace, name, "token"),
                               {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                "spec": {"expirationSeconds": expiration}})
        return kubeconfig(os.path.join(self.dir, f"sa-{namespace}-{name}.kubeconfig"), self.server,
                          self.ca_file, token=tr["status"]["token"], user=f"{namespace}-{name}")

    def ensure_namespace(self, name):
        try:
            self.admin.create(path_for("Namespace"), {"apiVersion": "v1", "kind": "Namespace",
                                                      "metadata": {"name": name}})
        except ApiError as e:
            if e.status != 409:
                raise


class NetnsForwarder:
    """A TCP port inside network namespace NETNS that leads to an address in
    ours (the API server on loopback), so engines in the lab's namespaces
    reach it without any link or route in the root namespace. The listening
    socket is made by a thread that entered NETNS (setns is per thread; a
    socket stays in the namespace it was made in)."""

    def __init__(self, netns, listen, target):
        import ctypes
        import threading
        self.target = target
        made = {}

        def make():
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, 0x40000000) != 0:         # CLONE_NEWNET
                    made["error"] = OSError(ctypes.get_errno(), f"setns {netns}")
                    return
                made["sock"] = socket.create_server(listen)
            except OSError as e:
                made["error"] = e
            finally:
                os.close(fd)
        t = threading.Thread(target=make)   # its namespace dies with it
        t.start()
        t.join()
        if "error" in made:
            raise made["error"]
        self.sock = made["sock"]
        self._stop = False
        self.conns = set()          # open connections, cut by close()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.target, timeout=5)
                up.settimeout(None)
            except OSError:
                conn.close()
                continue
            self.conns.update((conn, up))
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()     # each socket is the source of one pipe: closed once
            self.conns.discard(src)

    def close(self):
        """Stops listening and cuts every open connection (as a network
        partition between the node and the API server would)."""
        self._stop = True
        for s in [self.sock] + list(self.conns):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.sock.close()
