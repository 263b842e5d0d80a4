"""Health and metrics over HTTP, as kube-proxy serves them.

/healthz answers 200 once the dataplane is programmed and 503 before
(kube-proxy's :10256/healthz); /metrics is Prometheus text. Each listener
serves only its own paths: the healthz port /healthz and /livez, the
metrics port /metrics (and /healthz, as kube-proxy's metrics port does).

A listener is one thread running a selector loop, not a thread per
connection: a slow client costs one descriptor, never a thread, and at most
max_connections of them are held (the oldest is closed for a newcomer, so
a crowd of slow clients cannot keep a probe out). Every connection has a
total deadline for its request and answer, not an idle timer that a trickle
of bytes restarts.
"""
from __future__ import annotations

import collections
import json
import logging
import resource
import selectors
import socket
import threading
import time

log = logging.getLogger("engine.control")

HEALTHZ_PATHS = ("/healthz", "/livez")
METRICS_PATHS = ("/metrics", "/healthz")
CONNECTION_DEADLINE = 5.0       # seconds for a whole request and its answer
MAX_HEADER = 8192               # bytes of request line and headers
FD_RESERVE = 512                # descriptors kept for the engine's own work


def raise_fd_limit():
    """Raise the soft RLIMIT_NOFILE to the hard limit (systemd starts services
    with a soft limit of 1,024): descriptors are the engine's to budget, and
    it keeps FD_RESERVE of them out of reach of its listeners. Returns the
    (soft, hard) limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, e)
    return soft, hard


def connection_cap():
    """Connections one HTTP listener may hold: a quarter of what the
    descriptor limit leaves after the reserve (two listeners and the DNS
    server's TCP connections share it), between 16 and 1,024."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, min(1024, (soft - FD_RESERVE) // 4))


def http_endpoints(engine, healthz_bind, metrics_bind):
    """The started listeners for the two bind addresses (None: not served);
    one listener serves both path sets when the addresses are the same."""
    paths = {}
    if healthz_bind:
        paths.setdefault(healthz_bind, set()).update(HEALTHZ_PATHS)
    if metrics_bind:
        paths.setdefault(metrics_bind, set()).update(METRICS_PATHS)
    return [HTTPEndpoint(engine, bind, p).start() for bind, p in paths.items()]


class _Conn:
    __slots__ = ("sock", "deadline", "inbuf", "outbuf")

    def __init__(self, sock, deadline):
        self.sock = sock
        self.deadline = deadline
        self.inbuf = b""
        self.outbuf = b""


class HTTPEndpoint:
    """One HTTP listener (healthz, metrics or both) in a daemon thread."""

    def __init__(self, engine, bind, paths=HEALTHZ_PATHS + METRICS_PATHS, max_connections=None,
                 deadline=CONNECTION_DEADLINE):
        host, _, port = bind.rpartition(":")
        self.engine = engine
        self.paths = frozenset(paths)
        self.max_connections = max_connections or connection_cap()
        self.deadline = deadline
        host = host.strip("[]")
        self.listener = socket.create_server((host, int(port)), backlog=socket.SOMAXCONN,
                                             family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ)
        self.conns = collections.OrderedDict()      # fd -> _Conn, oldest first
        self.closed_for_room = 0                    # slow clients closed for a newcomer
        self.timed_out = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"http-{bind}", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def close(self):
        self._stop.set()
        self.thread.join(5)
        for c in list(self.conns.values()):
            self._drop(c)
        self.sel.close()
        self.listener.close()

    # -- the loop ------------------------------------------------------------

    def _loop(self):
        while not self._stop.is_set():
            try:
                events = self.sel.select(0.25)
            except OSError:
                continue
            for key, mask in events:
                if key.fileobj is self.listener:
                    self._accept()
                    continue
                c = key.data
                if c.sock.fileno() not in self.conns:
                    continue
                try:
                    if mask & selectors.EVENT_READ:
                        self._read(c)
                    elif mask & selectors.EVENT_WRITE:
                        self._write(c)
                except OSError:
                    self._drop(c)
                except Exception:       # a bug answering one client must not end the listener
                    log.exception("http request failed")
                    self._drop(c)
            now = time.monotonic()
            while self.conns:           # deadlines are in accept order
                c = next(iter(self.conns.values()))
                if c.deadline > now:
                    break
                self.timed_out += 1
                self._drop(c)

    def _accept(self):
        for _ in range(64):             # a burst, then the other connections get a turn
            try:
                s, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:        # EMFILE/ENFILE: make room rather than spin
                log.warning("http accept: %s", e)
                if self.conns:
                    self.closed_for_room += 1
                    self._drop(next(iter(self.conns.values())))
                else:
                    time.sleep(0.05)
                return
            while len(self.conns) >= self.max_connections:
                self.closed_for_room += 1
                self._drop(next(iter(self.conns.values())))
            s.setblocking(False)
            c = _Conn(s, time.monotonic() + self.deadline)
            self.conns[s.fileno()] = c
            self.sel.register(s, selectors.EVENT_READ, c)

    def _drop(self, c):
        fd = c.sock.fileno()
        if self.conns.pop(fd, None) is not None:
            try:
                self.sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
        c.sock.close()

    def _read(self, c):
        data = c.sock.recv(4096)
        if not data:
            self._drop(c)
            return
        c.inbuf += data
        end = c.inbuf.find(b"\r\n\r\n")
        if end < 0:
            end = c.inbuf.find(b"\n\n")
        if end < 0:
            if len(c.inbuf) > MAX_HEADER:
                self._answer(c, 431, b"request header too large\n", "text/plain")
            return
        self._answer(c, *self._route(c.inbuf[:end]))

    def _route(self, head):
        parts = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return 400, b"bad request\n", "text/plain"
        method, target = parts[0], parts[1].decode("latin-1")
        path = target.split("?", 1)[0]
        if path not in self.paths:
            return 404, b"not found\n", "text/plain"
        if method != b"GET":
            return 405, b"method not allowed\n", "text/plain"
        eng = self.engine
        if path == "/metrics":
            return 200, eng.metrics_text().encode(), "text/plain; version=0.0.4"
        ok = eng.programmed
        body = json.dumps({"lastUpdated": eng.last_sync_wall, "currentTime": time.time(),
                           "healthy": ok}).encode()
        return (200 if ok else 503), body, "application/json"

    def _answer(self, c, code, body, ctype):
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large", 503: "Service Unavailable"}[code]
        head = (f"HTTP/1.1 {code} {reason}\r\nServer: engine\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        c.outbuf = head + body
        self.sel.modify(c.sock, selectors.EVENT_WRITE, c)
        self._write(c)

    def _write(self, c):
        n = c.sock.send(c.outbuf)
        c.outbuf = c.outbuf[n:]
        if not c.outbuf:
            self._drop(c)


# -- the control socket: kubectl-style inspection and live changes ---------------

import os
import socket
import socketserver

from . import views

MAX_REQUEST = 32 * 1024 * 1024     # bytes of one request (an `engine apply` file)
REQUEST_DEADLINE = 30.0             # seconds to send a whole request
IN_FLIGHT_BUDGET = 2 * MAX_REQUEST  # bytes all unfinished requests together may hold


class _Budget:
    """Bytes held by requests still being read, shared by all connections: a
    crowd of clients that never finish cannot pin more than this between them."""

    def __init__(self, total):
        self.free = total
        self.lock = threading.Lock()

    def take(self, n):
        with self.lock:
            if n > self.free:
                return False
            self.free -= n
            return True

    def give(self, n):
        with self.lock:
            self.free += n


class _ControlHandler(socketserver.BaseRequestHandler):
    """One JSON request line in, one JSON response line out."""

    def handle(self):
        try:
            resp = {"ok": True, "text": self.server.dispatch(self._request())}
        except Exception as e:      # any failure is the client's answer, never the engine's end
            from .config import ConfigError
            if not isinstance(e, (ConfigError, ValueError, KeyError, OSError)):
                log.exception("control request failed")
            resp = {"ok": False, "error": str(e)}
        try:
            self.request.settimeout(REQUEST_DEADLINE)
            self.request.sendall((json.dumps(resp) + "\n").encode())
        except OSError:
            pass                    # the client left; nothing to tell it

    def _request(self):
        """The request line, read against a total deadline and the shared
        byte budget."""
        sock, budget = self.request, self.server.budget
        deadline = time.monotonic() + REQUEST_DEADLINE
        chunks, held = [], 0
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ValueError(f"request not complete within {REQUEST_DEADLINE:.0f}s")
                sock.settimeout(left)
                try:
                    data = sock.recv(1 << 16)
                except socket.timeout:
                    continue
                if not data:
                    raise ValueError("request ended before its newline")
                if held + len(data) > MAX_REQUEST + 1:
                    raise ValueError(f"request too large (more than {MAX_REQUEST >> 20} MB)")
                if not budget.take(len(data)):
                    raise ValueError("engine busy: too many large requests in flight, try again")
                held += len(data)
                chunks.append(data)
                if b"\n" in data:
                    break
            line = b"".join(chunks).split(b"\n", 1)[0]
            chunks = None
            req = json.loads(line)
        finally:
            budget.give(held)
        if not isinstance(req, dict):
            raise ValueError("request must be a JSON object")
        return req


class ControlServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, engine, path):
        self.engine = engine
        self.path = path
        self.budget = _Budget(IN_FLIGHT_BUDGET)
        d = os.path.dirname(path)
        if d:
            os.makedirs(d, mode=0o700, exist_ok=True)
        if os.path.exists(path):
            # a socket left by a crashed engine; refuse to steal a live one
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                raise OSError(f"control socket {path} is in use by another engine")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)
            finally:
                s.close()
        old = os.umask(0o177)           # root-only from the first instant: 0600
        try:
            super().__init__(path, _ControlHandler)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.thread = threading.Thread(target=self.serve_forever, name="control", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def close(self):
        self.shutdown()
        self.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def dispatch(self, req):
        eng = self.engine
        cmd = req.get("cmd")
        if cmd == "get":
            what = req.get("what")
            if what in ("svc", "service", "services"):
                return views.services(eng.smap, eng.cfg.engine.dns)
            if what in ("endpoints", "ep"):
                return views.endpoints(eng.smap)
            raise ValueError(f"unknown resource {what!r} (svc, endpoints)")
        if cmd == "describe":
            return views.describe_service(eng, req.get("name", ""), req.get("namespace", "default"))
        if cmd == "conntrack":
            return views.conntrack(eng, req.get("filters") or {})
        if cmd == "stats":
            return views.stats(eng)
        if cmd in ("apply", "delete"):
            return "\n".join(eng.apply(req.get("text", ""), req.get("name", "<stdin>"), delete=cmd == "delete"))
        if cmd == "reload":
            eng.reload()
            return "reloaded"
        raise ValueError(f"unknown command {cmd!r}")


def request(path, req, timeout=90):
    """Client side: send one request, return the response dict. A request
    over the engine's limit, or one the engine refuses half-way, is an
    {"ok": False} answer like any other refusal."""
    data = (json.dumps(req) + "\n").encode()
    if len(data) > MAX_REQUEST + 1:
        return {"ok": False, "error": f"request of {len(data) / 1e6:.1f} MB is over the engine's "
                                      f"limit of {MAX_REQUEST >> 20} MB"}
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(path)
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass                # the engine stopped reading: its answer says why
        buf = b""
        while not buf.endswith(b"\n"):
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:
                break
            except socket.timeout:
                return {"ok": False, "error": f"no answer from the engine within {timeout:.0f}s"}
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    if not buf:
        return {"ok": False, "error": "the engine closed the connection without an answer"}
    return json.loads(buf)
