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
