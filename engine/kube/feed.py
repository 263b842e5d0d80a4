"""API events into the engine: Services and EndpointSlices go to
Engine.on_api_event (validated, tracked, synced in batches there); this
node's Node gives the node's addresses; a LoadBalancer IP that the IPAM
leader wrote to a service's status is served by every node."""

import ipaddress
import logging

from .lbstatus import is_ours

log = logging.getLogger("engine.kube")


def node_addresses(node):
    """InternalIP then ExternalIP addresses of a Node object, in its order."""
    addrs = ((node or {}).get("status") or {}).get("addresses") or ()
    return [a["address"] for t in ("InternalIP", "ExternalIP") for a in addrs
            if a.get("type") == t and a.get("address")]


class EngineFeed:
    """The reflectors' callback (kind, key, old, new)."""

    def __init__(self, engine, on_node=None, lb_pools=(), on_service=None):
        self.engine = engine
        self.lb_pools = [ipaddress.ip_network(p) for p in lb_pools]
        self.on_node = on_node                  # on_node(addresses) when this node's addresses change
        self.on_service = on_service            # on_service() after each Service event (the LB status writer)
        self.node_addresses = None

    def __call__(self, kind, key, old, new):
        if kind == "Node":
            addrs = node_addresses(new) if new is not None else None
            if addrs != self.node_addresses:
                self.node_addresses = addrs
                log.info("node addresses from the Node object: %s", addrs)
                if self.on_node:
                    self.on_node(addrs)
                self.engine.request_sync()
            return
        if kind == "Service" and new is not None:
            new = self._with_allocated_ip(new)
        self.engine.on_api_event(kind, key, old, new)
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
