"""API events into the engine: each Service and EndpointSlice event is
parsed as the files' objects are and handed to the engine's change tracker
(engine.update(kind, (namespace, name), object or None, source="api")); a
sync follows, batching the events of `min_sync_period` (kube-proxy's
minSyncPeriod), so each event reaches the fast path through a partial sync.

An object the engine cannot take is reported (log, `refused`) and left out,
on its own: the rest of the cluster keeps flowing. This node's Node gives
the node's addresses."""

import ipaddress
import logging
import threading
import time

from .. import config as config_mod
from .lbstatus import is_ours

log = logging.getLogger("engine.kube")

PARSERS = {"Service": config_mod.parse_service, "EndpointSlice": config_mod.parse_endpointslice}


def node_addresses(node):
    """InternalIP then ExternalIP addresses of a Node object, in its order."""
    addrs = ((node or {}).get("status") or {}).get("addresses") or ()
    return [a["address"] for t in ("InternalIP", "ExternalIP") for a in addrs
            if a.get("type") == t and a.get("address")]


class EngineFeed:
    def __init__(self, engine, min_sync_period=0.05, on_node=None, lb_pools=(), on_service=None):
        self.engine = engine
        self.lb_pools = [ipaddress.ip_network(p) for p in lb_pools]
        self.on_service = on_service            # on_service() after each Service event (the LB status writer)
        self.min_sync_period = min_sync_period
        self.on_node = on_node                  # on_node(addresses) when this node's addresses change
        self.node_addresses = None
        self.refused = {}                       # "Kind ns/name" -> reason
        self.counts = {"events": 0, "refused": 0, "syncs": 0, "sync_errors": 0}
        self._pending = threading.Event()
        self._first = None                      # monotonic time of the oldest unsynced event
        self._stop = threading.Event()
        self._thread = None

    def __call__(self, kind, key, old, new):
        """The reflectors' callback."""
        self.counts["events"] += 1
        if kind == "Node":
            addrs = node_addresses(new) if new is not None else None
            if addrs != self.node_addresses:
                self.node_addresses = addrs
                log.info("node addresses from the Node object: %s", addrs)
                if self.on_node:
                    self.on_node(addrs)
                self._wake()
            return
        parse = PARSERS.get(kind)
        if parse is None:
            return
        ns, _, name = key.partition("/")
        what = f"{kind} {key}"
        obj = None
        if kind == "Service" and new is not None:
            new = self._with_allocated_ip(new)
        if new is not None:
            try:
                obj = parse(new, f"api:{what}")
            except config_mod.ConfigError as e:
                if self.refused.get(what) != str(e):
                    log.warning("%s left out: %s", what, e)
                    self.counts["refused"] += 1
                self.refused[what] = str(e)
        if obj is not None or new is None:
            self.refused.pop(what, None)
        self.engine.update(kind, (ns, name), obj, source="api")
        self._wake()
        if kind == "Service" and self.on_service:
            self.on_service()

    def _with_allocated_ip(self, svc):
        """A LoadBalancer service whose status holds an IP of our pool (the
        IPAM leader's allocation, engine.kube.lbstatus) is served on that IP
        by every node, as if it had asked for it in spec.loadBalancerIP."""
        spec = svc.get("spec") or {}
        if not self.lb_pools or not is_ours(svc) or spec.get("loadBalancerIP"):
            return svc
        for ing in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or ():
            try:
                ip = ipaddress.ip_address(ing.get("ip"))
            except (TypeError, ValueError):
                continue
            if any(ip in p for p in self.lb_pools):
                return dict(svc, spec=dict(spec, loadBalancerIP=str(ip)))
        return svc

    def _wake(self):
        if self._first is None:
            self._first = time.monotonic()
        self._pending.set()

    def start(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="api-sync", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._pending.set()
        if self._thread:
            self._thread.join(10)

    def _run(self):
        while not self._stop.is_set():
            self._pending.wait()
            if self._stop.is_set():
                return
            self._stop.wait(self.min_sync_period)      # let a burst of events gather
            self._pending.clear()
            noticed, self._first = self._first, None
            try:
                self.engine.sync(noticed=noticed)
                self.counts["syncs"] += 1
            except Exception as e:   # the running table stays; the next event or resync retries
                self.counts["sync_errors"] += 1
                log.error("sync after API changes failed, running table unchanged: %s", e)
