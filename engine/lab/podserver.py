"""Tiny stand-in for an nginx pod, run inside a lab pod namespace.

    python3 -m engine.lab.podserver --name NAME [--http-port 80] [--udp-port 5353]

HTTP (HTTP/1.0, so every connection closes after one response):
  GET /bytes/N   -> N bytes of b"x", streamed in chunks (multi-GB is fine)
  GET <other>    -> 200, body "NAME\\n"
  Every response carries X-Pod-Name and X-Client-Addr (the source address the
  pod saw: useful to check SNAT to the masquerade IP).
UDP: each datagram is answered with b"NAME " + payload.

Prints one "ready" line to stdout once both sockets are bound, so a parent can
wait for it instead of polling. Exits at once on SIGTERM/SIGINT. Stdlib only.
"""

import argparse
import os
import re
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = b"x" * (256 * 1024)
BYTES_PATH = re.compile(r"/bytes/(\d+)")


class Server(ThreadingHTTPServer):
    # The default backlog of 5 drops SYNs under connection-rate benchmarks.
    request_queue_size = 1024
    daemon_threads = True
    allow_reuse_address = True


def make_handler(name):
    body = (name + "\n").encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"
        def version_string(self):
            return "podserver"

        def _head(self, length):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(length))
            self.send_header("X-Pod-Name", name)
            self.send_header("X-Client-Addr", "%s:%d" % self.client_address[:2])
            self.end_headers()

        def _serve(self, with_body):
            m = BYTES_PATH.fullmatch(self.path.split("?", 1)[0])
            try:
                if m is None:
                    self._head(len(body))
                    if with_body:
                        self.wfile.write(body)
                    return
                left = int(m.group(1))
                self._head(left)
                if not with_body:
                    return
                view = memoryview(CHUNK)
                while left > 0:
                    n = min(left, len(CHUNK))
                    self.wfile.write(view[:n])
                    left -= n
            except (BrokenPipeError, ConnectionResetError):
                pass  # client went away mid-download: not an error here

        def do_GET(self):
            self._serve(True)

        def do_HEAD(self):
            self._serve(False)

        def log_message(self, *args):
            pass  # quiet: no per-request noise in test logs

    return Handler


def udp_echo(sock, name):
    prefix = (name + " ").encode()
    while True:
        try:
            data, addr = sock.recvfrom(65535)
            sock.sendto(prefix + data, addr)
        except OSError:
            continue  # e.g. ICMP error from a previous send; keep serving


def main(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m engine.lab.podserver")
    p.add_argument("--name", required=True)
    p.add_argument("--http-port", type=int, default=80)
    p.add_argument("--udp-port", type=int, default=5353)
    p.add_argument("--bind", default="0.0.0.0")
    args = p.parse_args(argv)

    # Immediate exit: nothing to flush, and the lab wants teardown to be fast.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: os._exit(0))

    httpd = Server((args.bind, args.http_port), make_handler(args.name))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((args.bind, args.udp_port))
    threading.Thread(target=udp_echo, args=(udp, args.name), daemon=True).start()

    print("ready %s http=%d udp=%d" % (args.name, args.http_port, args.udp_port), flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
