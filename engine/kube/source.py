"""The API server as a source of objects, as kube-proxy follows it: Services
and EndpointSlices not claimed by another proxy (headless ones kept: the
engine serves their DNS) and this node's own Node."""

import socket
import threading

from .client import Client
from .kubeconfig import load
from .reflector import Backoff, Reflector

# kube-proxy's selector without its `!service.kubernetes.io/headless`
PROXY_SELECTOR = "!service.kubernetes.io/service-proxy-name"


def node_name(hostname_override=None):
    """hostnameOverride, else the hostname, lower-cased (as kube-proxy)."""
    name = (hostname_override or socket.gethostname()).strip().lower()
    if not name:
        raise ValueError("empty node name: set hostnameOverride")
    return name


class ApiSource:
    """Three reflectors feeding one callback(kind, key, old, new)."""

    def __init__(self, client, node, on_event, resync_period=900.0, read_timeout=120.0, on_state=None,
                 backoff_cap=30.0):
        self.client, self.node = client, node
        self.on_state = on_state
        self._lock = threading.Lock()
        def kw():
            return dict(resync_period=resync_period, read_timeout=read_timeout, on_state=self._state,
                        backoff=Backoff(cap=backoff_cap))
        self.reflectors = [
            Reflector(client, "Service", on_event, label_selector=PROXY_SELECTOR, **kw()),
            Reflector(client, "EndpointSlice", on_event, label_selector=PROXY_SELECTOR, **kw()),
            Reflector(client, "Node", on_event, field_selector=f"metadata.name={node}", **kw()),
        ]
        self.connected = False

    @classmethod
    def from_config(cls, kubeconfig, hostname_override, on_event, **kw):
        """kubeconfig None: the in-cluster config."""
        return cls(Client(load(kubeconfig), user_agent="engine"), node_name(hostname_override), on_event, **kw)

    def reflector(self, kind):
        return next(r for r in self.reflectors if r.kind == kind)

    def start(self):
        for r in self.reflectors:
            r.start()
        return self

    def stop(self):
        for r in self.reflectors:
            r.stop()

    def wait_synced(self, timeout=None):
        return all(r.synced.wait(timeout) for r in self.reflectors)

    def _state(self, reflector, up, error):
        with self._lock:
            connected = all(r.connected for r in self.reflectors)
            changed = connected != self.connected
            self.connected = connected
        if changed and self.on_state:
            self.on_state(connected, error)

    def metrics(self):
        """Counters by kind, for the metrics endpoint."""
        out = {"connected": int(self.connected)}
        for r in self.reflectors:
            for k, v in r.counts.items():
                out[f"{r.kind}_{k}"] = v
            out[f"{r.kind}_objects"] = len(r.cache)
        return out
