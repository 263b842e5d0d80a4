"""The reflector's edge cases against a small local HTTP server that plays
scripted list and watch answers: bookmarks, 410 Gone (as a status and as an
ERROR event), a dropped connection, a silent connection, a server that is
down, paging, resync. The real kube-apiserver runs in tests/kube/."""

import json
import queue
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from engine.kube.client import Client
from engine.kube.kubeconfig import ClusterConfig
from engine.kube.reflector import Backoff, Reflector


def svc(name, rv, ns="default", **spec):
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": str(rv)}, "spec": spec}


def ev(typ, obj):
    o = dict(obj, kind="Service", apiVersion="v1")
    return ("event", {"type": typ, "object": o})


def bookmark(rv):
    return ("event", {"type": "BOOKMARK", "object": {"kind": "Service", "apiVersion": "v1",
                                                     "metadata": {"resourceVersion": str(rv)}}})


class FakeAPI:
    """Lists answer from `lists` (a queue of (items, rv) or (status, body)),
    watches play the next script from `watches`: a list of steps
    ("event", dict) | ("sleep", s) | ("drop",) | ("hang",) | ("status", code, body)
    ending with an implicit clean end of the stream."""

    def __init__(self, port=0):
        self.lists = queue.Queue()
        self.watches = queue.Queue()
        self.requests = []            # (path, {param: value})
        self.release = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                u = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(u.query))
                api.requests.append((u.path, q))
                if q.get("watch") == "true":
                    api.serve_watch(self)
                else:
                    api.serve_list(self, q)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def reply(h, code, body):
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def serve_list(self, h, q):
        try:
            answer = self.lists.get(timeout=5)
        except queue.Empty:
            return self.reply(h, 500, {"kind": "Status", "message": "no list scripted"})
        if answer[0] == "status":
            return self.reply(h, answer[1], answer[2])
        items, rv, cont = (answer + (None,))[:3]
        md = {"resourceVersion": str(rv)}
        if cont:
            md["continue"] = cont
        self.reply(h, 200, {"kind": "ServiceList", "apiVersion": "v1", "metadata": md, "items": items})

    def serve_watch(self, h):
        try:
            steps = self.watches.get(timeout=5)
        except queue.Empty:
            steps = [("hang",)]
        if steps and steps[0][0] == "status":
            return self.reply(h, steps[0][1], steps[0][2])
        if steps and steps[0][0] == "silent":      # accept, never answer
            self.release.wait(30)
            return
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for step in steps:
            if step[0] == "event":
                line = json.dumps(step[1]).encode() + b"\n"
                h.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                h.wfile.flush()
            elif step[0] == "raw":
                h.wfile.write(b"%x\r\n%s\r\n" % (len(step[1]), step[1]))
                h.wfile.flush()
            elif step[0] == "sleep":
                time.sleep(step[1])
            elif step[0] == "drop":   # mid-stream, no terminating chunk
                h.connection.shutdown(socket.SHUT_RDWR)
                h.close_connection = True
                return
            elif step[0] == "hang":   # headers sent, then silence
                self.release.wait(30)
                return
        h.wfile.write(b"0\r\n\r\n")
        h.close_connection = True


class Recorder:
    def __init__(self):
        self.events = []
        self.cond = threading.Condition()

    def __call__(self, kind, key, old, new):
        with self.cond:
            self.events.append((kind, key, old, new))
            self.cond.notify_all()

    def wait_for(self, n, timeout=10):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.events) >= n, timeout), self.events
            return list(self.events)

    def summary(self, start=0):
        out = []
        for kind, key, old, new in self.events[start:]:
            op = "add" if old is None else "delete" if new is None else "resync" if old is new else "update"
            out.append((op, key))
        return out


@pytest.fixture
def api():
    a = FakeAPI()
    yield a
    a.close()


def reflector(api, rec, **kw):
    client = Client(ClusterConfig(server=f"http://127.0.0.1:{api.port}"), connect_timeout=2)
    kw.setdefault("read_timeout", 5)
    kw.setdefault("backoff", Backoff(initial=0.05, cap=0.2))
    kw.setdefault("resync_period", 0)
    return Reflector(client, "Service", rec, label_selector="!service.kubernetes.io/service-proxy-name", **kw)


def wait(cond, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_list_then_watch_with_bookmarks(api):
    api.lists.put(([svc("a", 5), svc("b", 6)], 10))
    api.watches.put([ev("ADDED", svc("c", 11)), ev("MODIFIED", svc("a", 12, port=80)),
                     ev("DELETED", svc("b", 13)), bookmark(20)])
    api.watches.put([("hang",)])
    rec = Recorder()
    r = reflector(api, rec).start()
    try:
        events = rec.wait_for(5)
        assert rec.summary() == [("add", "default/a"), ("add", "default/b"), ("add", "default/c"),
                                 ("update", "default/a"), ("delete", "default/b")]
        # list items lack kind/apiVersion: filled in
        assert all(e[3] is None or (e[3]["kind"], e[3]["apiVersion"]) == ("Service", "v1") for e in events)
        assert events[3][2]["metadata"]["resourceVersion"] == "5"       # old object of the update
        assert events[4][2]["metadata"]["name"] == "b"                  # delete carries the last state
        assert wait(lambda: len([q for p, q in api.requests if q.get("watch")]) == 2)
        watches = [q for p, q in api.requests if q.get("watch")]
        assert watches[0]["resourceVersion"] == "10"                    # from the list
        assert watches[0]["allowWatchBookmarks"] == "true"
        assert watches[0]["labelSelector"] == "!service.kubernetes.io/service-proxy-name"
        assert watches[1]["resourceVersion"] == "20"                    # from the bookmark
        assert sorted(r.snapshot()) == ["default/a", "default/c"]
        assert r.counts["lists"] == 1 and r.counts["bookmarks"] == 1
        assert r.synced.is_set() and r.connected
    finally:
        r.stop()


@pytest.mark.parametrize("how", ["error-event", "http-status"])
def test_gone_relists_and_reports_deletions_made_in_the_gap(api, how):
    api.lists.put(([svc("a", 5), svc("b", 6), svc("c", 7)], 10))
    gone = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410, "reason": "Expired",
            "message": "too old resource version: 10 (50)"}
    api.watches.put([ev("MODIFIED", svc("a", 11))] +
                    ([("event", {"type": "ERROR", "object": gone})] if how == "error-event" else []))
    if how == "http-status":
        api.watches.put([("status", 410, gone)])
    # in the gap: b deleted, c changed, d created; a unchanged since the watch saw it
    api.lists.put(([svc("a", 11), svc("c", 40), svc("d", 41)], 50))
    api.watches.put([("hang",)])
    rec = Recorder()
    r = reflector(api, rec).start()
    try:
        rec.wait_for(7)
        assert rec.summary() == [("add", "default/a"), ("add", "default/b"), ("add", "default/c"),
                                 ("update", "default/a"),
                                 ("delete", "default/b"), ("update", "default/c"), ("add", "default/d")]
        assert sorted(r.snapshot()) == ["default/a", "default/c", "default/d"]
        assert r.counts["relists_gone"] == 1 and r.counts["lists"] == 2
        assert wait(lambda: [q for p, q in api.requests if q.get("watch")][-1]["resourceVersion"] == "50")
    finally:
        r.stop()


def test_dropped_connection_resumes_from_last_resource_version(api):
    api.lists.put(([svc("a", 5)], 10))
    api.watches.put([ev("ADDED", svc("b", 11)), ("drop",)])
    api.watches.put([ev("ADDED", svc("c", 12))])
    api.watches.put([("hang",)])
    rec = Recorder()
    r = reflector(api, rec).start()
    try:
        rec.wait_for(3)
        assert rec.summary() == [("add", "default/a"), ("add", "default/b"), ("add", "default/c")]
        watches = [q["resourceVersion"] for p, q in api.requests if q.get("watch")]
        assert watches[:2] == ["10", "11"]
        assert r.counts["lists"] == 1          # no relist for a dropped connection
        assert r.counts["errors"] >= 1
    finally:
        r.stop()


def test_silent_watch_is_given_up_after_the_read_timeout(api):
    api.lists.put(([svc("a", 5)], 10))
    api.watches.put([ev("ADDED", svc("b", 11)), ("hang",)])     # headers, one event, then silence
    api.watches.put([("silent",)])                               # accepts, never answers
    api.watches.put([ev("ADDED", svc("c", 12))])
    api.watches.put([("hang",)])
    states = []
    rec = Recorder()
    r = reflector(api, rec, read_timeout=0.5, on_state=lambda r, up, err: states.append(up)).start()
    try:
        rec.wait_for(3, timeout=15)
        assert rec.summary() == [("add", "default/a"), ("add", "default/b"), ("add", "default/c")]
        assert r.counts["read_timeouts"] >= 1
        assert [q["resourceVersion"] for p, q in api.requests if q.get("watch")][:3] == ["10", "11", "11"]
        assert states[:3] == [True, False, True]       # the silent server counts as unreachable
        assert r.counts["lists"] == 1
    finally:
        r.stop()


def test_server_down_keeps_cache_and_converges_when_back():
    # a port with nothing listening, then a server on it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rec = Recorder()
    states = []
    client = Client(ClusterConfig(server=f"http://127.0.0.1:{port}"), connect_timeout=1)
    r = Reflector(client, "Service", rec, read_timeout=2, resync_period=0,
                  backoff=Backoff(initial=0.05, cap=0.2), on_state=lambda r, up, err: states.append((up, err)))
    r.start()
    try:
        assert wait(lambda: r.counts["errors"] >= 2)
        assert not r.connected and not r.synced.is_set()
        assert "Connection refused" in r.last_error or "NewConnectionError" in r.last_error
        srv = FakeAPI(port)      # the server comes up on the port the reflector keeps trying
        try:
            srv.lists.put(([svc("a", 5)], 10))
            srv.watches.put([("hang",)])
            rec.wait_for(1)
            assert rec.summary() == [("add", "default/a")]
            assert r.connected and r.synced.is_set()
        finally:
            srv.close()
    finally:
        r.stop()


def test_paged_list(api):
    api.lists.put(([svc("a", 5)], 10, "tok1"))
    api.lists.put(([svc("b", 6)], 10, "tok2"))
    api.lists.put(([svc("c", 7)], 10))
    api.watches.put([("hang",)])
    rec = Recorder()
    r = reflector(api, rec, page_size=1).start()
    try:
        rec.wait_for(3)
        lists = [q for p, q in api.requests if not q.get("watch")]
        assert [q.get("continue") for q in lists] == [None, "tok1", "tok2"]
        assert all(q["limit"] == "1" for q in lists)
        assert sorted(r.snapshot()) == ["default/a", "default/b", "default/c"]
    finally:
        r.stop()


def test_expired_continue_token_falls_back_to_one_full_list(api):
    api.lists.put(([svc("a", 5)], 10, "tok1"))
    api.lists.put(("status", 410, {"kind": "Status", "code": 410, "reason": "Expired"}))
    api.lists.put(([svc("a", 5), svc("b", 12)], 12))
    api.watches.put([("hang",)])
    rec = Recorder()
    r = reflector(api, rec, page_size=1).start()
    try:
        rec.wait_for(2)
        assert rec.summary() == [("add", "default/a"), ("add", "default/b")]
        lists = [q for p, q in api.requests if not q.get("watch")]
        assert "limit" not in lists[2] and "continue" not in lists[2]
    finally:
        r.stop()


def test_resync_replays_the_cache(api):
    api.lists.put(([svc("a", 5), svc("b", 6)], 10))
    for _ in range(20):
        api.watches.put([])        # the server ends each watch at once (as at timeoutSeconds)
    rec = Recorder()
    r = reflector(api, rec, resync_period=0.3).start()
    try:
        rec.wait_for(4, timeout=15)
        assert rec.summary()[:4] == [("add", "default/a"), ("add", "default/b"),
                                     ("resync", "default/a"), ("resync", "default/b")]
        assert r.counts["lists"] == 1
        # the watch asked the server to end it by the time the resync is due
        assert all(int(q["timeoutSeconds"]) <= 2 for p, q in api.requests if q.get("watch"))
    finally:
        r.stop()


def test_bad_line_and_refused_watch_are_errors_not_crashes(api):
    api.lists.put(([svc("a", 5)], 10))
    api.watches.put([("raw", b"this is not json\n")])
    api.watches.put([("status", 403, {"kind": "Status", "code": 403, "message": "forbidden"})])
    api.lists.put(([svc("a", 5)], 12))
    api.watches.put([ev("ADDED", svc("b", 13))])
    api.watches.put([("hang",)])
    rec = Recorder()
    r = reflector(api, rec).start()
    try:
        rec.wait_for(2)
        assert rec.summary() == [("add", "default/a"), ("add", "default/b")]
        assert r.counts["errors"] == 2
        assert r.counts["lists"] == 2          # a refused watch lists again
    finally:
        r.stop()


def test_callback_failure_does_not_stop_the_watch(api):
    api.lists.put(([svc("a", 5)], 10))
    api.watches.put([ev("ADDED", svc("b", 11))])
    api.watches.put([("hang",)])
    seen = []

    def cb(kind, key, old, new):
        seen.append(key)
        if key == "default/a":
            raise RuntimeError("consumer bug")
    r = reflector(api, cb).start()
    try:
        assert wait(lambda: seen == ["default/a", "default/b"])
        assert r.counts["callback_errors"] == 1
    finally:
        r.stop()


def test_stop_interrupts_a_blocked_watch(api):
    api.lists.put(([], 10))
    api.watches.put([("hang",)])
    r = reflector(api, Recorder(), read_timeout=60).start()
    assert wait(lambda: r.counts["watches"] == 1)
    t = time.monotonic()
    r.stop()
    assert time.monotonic() - t < 3
    assert not r._thread.is_alive()
