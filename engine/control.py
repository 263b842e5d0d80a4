"""Health and metrics over HTTP, as kube-proxy serves them.

/healthz answers 200 once the dataplane is programmed and 503 before
(kube-proxy's :10256/healthz); /metrics is Prometheus text.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("engine.control")


class _Handler(BaseHTTPRequestHandler):
    server_version = "engine"

    def log_message(self, fmt, *args):      # keep stderr for the engine's own log
        pass

    def do_GET(self):
        eng = self.server.engine
        path = self.path.split("?")[0]
        if path in ("/healthz", "/livez"):
            ok = eng.programmed
            body = json.dumps({"lastUpdated": eng.last_sync_wall, "currentTime": time.time(),
                               "healthy": ok}).encode()
            self._send(200 if ok else 503, body, "application/json")
        elif path == "/metrics":
            self._send(200, eng.metrics_text().encode(), "text/plain; version=0.0.4")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, code, body, ctype):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class HTTPEndpoint:
    """One HTTP listener (healthz or metrics) in a daemon thread."""

    def __init__(self, engine, bind):
        host, _, port = bind.rpartition(":")
        self.httpd = ThreadingHTTPServer((host, int(port)), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.engine = engine
        self.thread = threading.Thread(target=self.httpd.serve_forever, name=f"http-{bind}", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# -- the control socket: kubectl-style inspection and live changes ---------------

import os
import socket
import socketserver

from . import views

MAX_REQUEST = 32 * 1024 * 1024


class _ControlHandler(socketserver.StreamRequestHandler):
    """One JSON request line in, one JSON response line out."""

    def handle(self):
        line = self.rfile.readline(MAX_REQUEST + 1)
        try:
            if len(line) > MAX_REQUEST:
                raise ValueError("request too large")
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("request must be a JSON object")
            resp = {"ok": True, "text": self.server.dispatch(req)}
        except Exception as e:      # any failure is the client's answer, never the engine's end
            from .config import ConfigError
            if not isinstance(e, (ConfigError, ValueError, KeyError)):
                log.exception("control request failed")
            resp = {"ok": False, "error": str(e)}
        self.wfile.write((json.dumps(resp) + "\n").encode())


class ControlServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, engine, path):
        self.engine = engine
        self.path = path
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


def request(path, req, timeout=30):
    """Client side: send one request, return the response dict."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall((json.dumps(req) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    return json.loads(buf)
