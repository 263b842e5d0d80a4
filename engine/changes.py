"""One change tracker for every source of objects, and the sources' layers.

Sources (the watched files, SIGHUP, `engine apply/delete`, an API watch)
each hand over object events: (kind, key, old, new), key = (namespace,
name), old/new a parsed object (engine.model), a list of them (the slices
of one Endpoints object) or None (absent). ChangeTracker keeps, per object,
the state the running tables were built from and the latest state, as
kube-proxy's ServiceChangeTracker and EndpointsChangeTracker do; a change
that returns an object to where it was is dropped. The engine's sync takes
the pending changes and applies them partially or fully.

Sources layers the sources that may define the same object: an object
applied with `engine apply` wins over the files' version of it until it is
deleted, whatever the files say meanwhile.
"""
from __future__ import annotations

import threading
import time

SERVICE_KINDS = ("Service",)
ENDPOINT_KINDS = ("Pod", "EndpointSlice", "Endpoints")
KINDS = SERVICE_KINDS + ENDPOINT_KINDS


def _norm(objs):
    """None, one object or several -> None or a tuple."""
    if objs is None:
        return None
    if isinstance(objs, (list, tuple)):
        return tuple(objs) or None
    return (objs,)


class Change:
    """One object's pending change: what the tables have, what it is now,
    and since when (time.monotonic() of the first event: network
    programming latency is measured from it)."""
    __slots__ = ("previous", "current", "since")

    def __init__(self, previous, current, since):
        self.previous, self.current, self.since = previous, current, since

    def __repr__(self):
        return f"Change({self.previous!r} -> {self.current!r})"


class ChangeTracker:
    """Pending changes keyed by (kind, namespace, name). Thread-safe: any
    source may call update() from its own thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items = {}
        self.totals = {"service": 0, "endpoint": 0}     # changes ever recorded, by group

    def update(self, kind, key, old, new, when=None):
        """Record one object event (when: time.monotonic() it was noticed;
        now by default). Returns True when something is now pending for the
        object (False: a no-op, or a change undone)."""
        if kind not in KINDS:
            raise ValueError(f"the engine tracks {', '.join(KINDS)}, not {kind!r}")
        k = (kind,) + tuple(key)
        old, new = _norm(old), _norm(new)
        with self._lock:
            c = self._items.get(k)
            previous = c.previous if c is not None else old
            if previous == new:
                self._items.pop(k, None)
                return False
            since = c.since if c is not None else (when if when is not None else time.monotonic())
            self._items[k] = Change(previous, new, since)
            self.totals["service" if kind in SERVICE_KINDS else "endpoint"] += 1
            return True

    def take(self):
        """The pending changes, {(kind, ns, name): Change}; the tracker is
        left empty."""
        with self._lock:
            items, self._items = self._items, {}
        return items

    def put_back(self, items):
        """Changes a sync could not apply, pending again (newer updates of
        the same objects stay the latest)."""
        with self._lock:
            for k, c in items.items():
                later = self._items.get(k)
                self._items[k] = Change(c.previous, later.current if later else c.current, c.since)
                if self._items[k].previous == self._items[k].current:
                    del self._items[k]

    def pending(self):
        """(service changes, endpoint changes) pending."""
        with self._lock:
            svc = sum(1 for k in self._items if k[0] in SERVICE_KINDS)
            return svc, len(self._items) - svc

    def __len__(self):
        return len(self._items)


DELETED = ()        # an `engine delete`d object: hides the files' version


class Sources:
    """Objects per source layer, highest first; the highest layer that has a
    key decides it. Every change of what decides a key goes to the tracker."""

    ORDER = ("apply", "api", "files")

    def __init__(self, tracker):
        self.tracker = tracker
        self.layers = {name: {} for name in self.ORDER}

    def effective(self, key):
        for name in self.ORDER:
            v = self.layers[name].get(key)
            if v is not None:
                return v or None        # DELETED: absent
        return None

    def set(self, layer, key, objs, when=None):
        """key = (kind, namespace, name); objs: objects, DELETED (apply
        layer only) or None (the layer no longer has it)."""
        before = self.effective(key)
        if objs is None:
            self.layers[layer].pop(key, None)
        else:
            self.layers[layer][key] = DELETED if objs is DELETED else _norm(objs)
        after = self.effective(key)
        if before != after:
            self.tracker.update(key[0], key[1:], before, after, when)

    def replace(self, layer, objects, when=None):
        """The whole of a layer anew ({key: objects}); only the keys that
        differ become changes."""
        cur = self.layers[layer]
        for key in [k for k in cur if k not in objects]:
            self.set(layer, key, None, when)
        for key, objs in objects.items():
            if cur.get(key) != _norm(objs):
                self.set(layer, key, objs, when)

    def snapshot(self):
        return {name: dict(v) for name, v in self.layers.items()}

    def restore(self, snap):
        self.layers = snap

    def all(self):
        """Every object that decides its key: {key: tuple of objects}."""
        out = {}
        for name in reversed(self.ORDER):
            for key, v in self.layers[name].items():
                if v:
                    out[key] = v
                else:
                    out.pop(key, None)
        return out
