"""A reflector: keeps a local copy of one resource in step with the API
server and reports every change, as client-go's reflector + informer do.

list -> watch from the list's resourceVersion (with bookmarks) -> on a clean
end of the watch, watch again from the last resourceVersion seen; on a
connection error or a silent connection (client-side read timeout), retry
with backoff from there; on 410 Gone, list again and diff the new list
against the cache, so deletions made while we were away are reported too.
Every configSyncPeriod the whole cache is replayed as updates (old is new).

Each change reaches `callback(kind, key, old, new)`: key is namespace/name
(name for cluster-scoped kinds), old or new is None for an add or a delete,
objects are plain dicts with kind and apiVersion filled in (list items lack
them). Callbacks run on the reflector's thread, in order."""

import logging
import random
import threading
import time

import urllib3

from .client import RESOURCES, ApiError, path_for

log = logging.getLogger("engine.kube")


class Gone(Exception):
    """The resourceVersion we resume from is too old (HTTP 410)."""


class Backoff:
    """Exponential with jitter, as client-go's (0.8 s doubling to 30 s)."""

    def __init__(self, initial=0.8, cap=30.0):
        self.initial, self.cap, self.failures = initial, cap, 0

    def next(self):
        d = min(self.cap, self.initial * (2 ** self.failures))
        self.failures += 1
        return d * random.uniform(0.5, 1.0)

    def reset(self):
        self.failures = 0


def object_key(obj):
    md = obj.get("metadata") or {}
    ns = md.get("namespace")
    return f"{ns}/{md.get('name')}" if ns else md.get("name")


class Reflector:
    def __init__(self, client, kind, callback, namespace=None, label_selector=None, field_selector=None,
                 resync_period=900.0, read_timeout=120.0, watch_timeout=(300, 600), page_size=500,
                 backoff=None, on_state=None):
        if kind not in RESOURCES:
            raise ValueError(f"unknown kind {kind}")
        self.client, self.kind, self.callback = client, kind, callback
        self.api_version = RESOURCES[kind][0]
        self.path = path_for(kind, namespace)
        self.selectors = {"labelSelector": label_selector, "fieldSelector": field_selector}
        self.resync_period = resync_period
        self.read_timeout = read_timeout
        self.watch_timeout = watch_timeout      # server-side timeoutSeconds, randomised as client-go's
        self.page_size = page_size
        self.backoff = backoff or Backoff()
        self.on_state = on_state                # on_state(reflector, connected: bool, error: str|None)

        self.cache = {}                         # key -> object; replaced whole on relist
        self.resource_version = None
        self.synced = threading.Event()         # set after the first full list
        self.connected = False
        self.last_error = None
        self.counts = {"lists": 0, "relists_gone": 0, "watches": 0, "events": 0, "bookmarks": 0,
                       "errors": 0, "read_timeouts": 0, "resyncs": 0, "callback_errors": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch = None
        self._thread = None
        self._next_resync = None

    # -- lifecycle -------------------------------------------------------
    def start(self):
        """Starts (or, after stop(), resumes from the cache and resourceVersion kept)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name=f"reflector-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout=5.0):
        self._stop.set()
        w = self._watch
        if w is not None:
            w.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def snapshot(self):
        with self._lock:
            return dict(self.cache)

    # -- the loop --------------------------------------------------------
    def run(self):
        while not self._stop.is_set():
            try:
                if self.resource_version is None:
                    self._relist()
                    self._next_resync = time.monotonic() + self.resync_period if self.resync_period else None
                self._resync_if_due()
                self._watch_once()
            except Gone:
                # resuming is impossible: list again at once, diffing against the cache
                self.counts["relists_gone"] += 1
                log.info("%s: watch expired (410 Gone) at resourceVersion %s; listing again",
                         self.kind, self.resource_version)
                self.resource_version = None
            except (ApiError, urllib3.exceptions.HTTPError, OSError, ValueError) as e:
                if self._stop.is_set():
                    break
                self.counts["errors"] += 1
                if isinstance(e, ApiError) and e.status not in (429, 500, 502, 503, 504):
                    # refused (403, 404, ...): list again once the cause is fixed
                    self.resource_version = None
                self._set_state(False, f"{type(e).__name__}: {e}")
                self._stop.wait(self.backoff.next())

    def _set_state(self, connected, error=None):
        changed = connected != self.connected
        self.connected, self.last_error = connected, error
        if changed or error:
            if connected:
                log.info("%s: API server reachable again", self.kind)
            else:
                log.warning("%s: API server unreachable, keeping the last state: %s", self.kind, error)
        if self.on_state and changed:
            self.on_state(self, connected, error)

    def _relist(self):
        items, rv = self._list()
        self.counts["lists"] += 1
        new = {}
        for o in items:
            self._fill(o)
            new[object_key(o)] = o
        with self._lock:
            old, self.cache = self.cache, new
            self.resource_version = rv
        self._set_state(True)
        self.backoff.reset()
        for k, o in old.items():
            if k not in new:
                self._emit(k, o, None)
        for k, o in new.items():
            prev = old.get(k)
            if prev is None:
                self._emit(k, None, o)
            elif _rv(prev) != _rv(o):
                self._emit(k, prev, o)
        self.synced.set()

    def _list(self):
        params = dict(self.selectors, limit=self.page_size or None)
        items = []
        while True:
            try:
                page = self.client.get(self.path, params)
            except ApiError as e:
                if e.status == 410 and params.get("continue"):
                    # the continue token expired mid-list: one unpaged list instead
                    params, items = dict(self.selectors), []
                    continue
                raise
            items.extend(page.get("items") or ())
            md = page.get("metadata") or {}
            if not md.get("continue"):
                return items, md.get("resourceVersion")
            params["continue"] = md["continue"]

    def _watch_once(self):
        timeout = random.randint(*self.watch_timeout)
        if self._next_resync is not None:   # end the watch when the resync is due
            timeout = max(1, min(timeout, int(self._next_resync - time.monotonic()) + 1))
        params = dict(self.selectors, resourceVersion=self.resource_version, allowWatchBookmarks="true",
                      timeoutSeconds=timeout)
        try:
            w = self.client.watch(self.path, params, self.read_timeout)
        except ApiError as e:
            if e.status == 410:
                raise Gone() from e
            raise
        self._watch = w
        self.counts["watches"] += 1
        self._set_state(True)
        started, seen = time.monotonic(), 0
        try:
            if self._stop.is_set():   # stop() came before self._watch was set
                return
            for ev in w:
                if self._stop.is_set():
                    return
                seen += 1
                self.backoff.reset()
                self._handle(ev)
            if not seen and time.monotonic() - started < 1:
                # ended at once with nothing said: don't spin on such a server
                self._stop.wait(self.backoff.next())
        except urllib3.exceptions.ReadTimeoutError:
            # silent for read_timeout: resume from the last resourceVersion
            self.counts["read_timeouts"] += 1
            log.info("%s: watch silent for %ss; watching again", self.kind, self.read_timeout)
        except urllib3.exceptions.ProtocolError as e:
            if self._stop.is_set():
                return
            # the connection dropped mid-stream: resume, with backoff
            raise OSError(f"watch connection lost: {e}") from e
        finally:
            self._watch = None
            w.close()

    def _handle(self, ev):
        typ, obj = ev.get("type"), ev.get("object") or {}
        if typ == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise ApiError(obj.get("code") or 500, obj, f"watch {self.path}")
        rv = _rv(obj)
        if typ == "BOOKMARK":
            self.counts["bookmarks"] += 1
            if rv:
                self.resource_version = rv
            return
        if typ not in ("ADDED", "MODIFIED", "DELETED"):
            raise ValueError(f"watch {self.path}: unknown event type {typ!r}")
        self._fill(obj)
        k = object_key(obj)
        with self._lock:
            old = self.cache.get(k)
            if typ == "DELETED":
                self.cache.pop(k, None)
            else:
                self.cache[k] = obj
            if rv:
                self.resource_version = rv
        self.counts["events"] += 1
        if typ == "DELETED":
            if old is not None:
                self._emit(k, old, None)
        else:
            self._emit(k, old, obj)

    def _resync_if_due(self):
        if self._next_resync is None or time.monotonic() < self._next_resync:
            return
        self._next_resync = time.monotonic() + self.resync_period
        self.counts["resyncs"] += 1
        for k, o in self.snapshot().items():
            self._emit(k, o, o)

    def _fill(self, obj):
        obj.setdefault("kind", self.kind)
        obj.setdefault("apiVersion", self.api_version)

    def _emit(self, key, old, new):
        try:
            self.callback(self.kind, key, old, new)
        except Exception:  # a consumer's bug must not stop the watch
            self.counts["callback_errors"] += 1
            log.exception("%s %s: the change handler failed", self.kind, key)


def _rv(obj):
    return (obj.get("metadata") or {}).get("resourceVersion")
