"""LoadBalancer IPAM for a cluster: exactly one engine (the holder of a
Lease) allocates ingress IPs from loadBalancerCIDR and writes them to each
Service's status.loadBalancer.ingress, so `kubectl get svc` shows the
EXTERNAL-IP and every node's engine serves the same IPs.

Allocations are read back from the Services' status, so they survive
restarts and leader changes: an IP already in a service's status stays
with it; only services without one get the lowest free address."""

import ipaddress
import logging
import threading

import urllib3

from .client import ApiError, path_for

log = logging.getLogger("engine.kube.lbstatus")


def is_ours(svc, load_balancer_class=None):
    """LoadBalancer services without a class are the default implementation's
    (ours); a service naming a class belongs to that class's controller."""
    spec = svc.get("spec") or {}
    return spec.get("type") == "LoadBalancer" and spec.get("loadBalancerClass") == load_balancer_class


def _key(svc):
    md = svc.get("metadata") or {}
    return f"{md.get('namespace')}/{md.get('name')}"


def _families(svc):
    return (svc.get("spec") or {}).get("ipFamilies") or ["IPv4"]


def _status_ips(svc):
    out = []
    for ing in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or ():
        try:
            out.append(ipaddress.ip_address(ing.get("ip")))
        except (TypeError, ValueError):
            pass
    return out


def allocate(services, pools, load_balancer_class=None):
    """{service key: [ip, ...]} for our LoadBalancer services: one IP from
    each pool whose family the service has. Order of precedence:
    spec.loadBalancerIP, then an IP the service already has in its status
    (older services first on a clash), then the lowest free address."""
    pools = [ipaddress.ip_network(p) for p in pools]
    ours = sorted((s for s in services if is_ours(s, load_balancer_class)),
                  key=lambda s: ((s.get("metadata") or {}).get("creationTimestamp") or "", _key(s)))
    taken, result, wanted = {}, {}, []
    for s in ours:
        result[_key(s)] = {}
        requested = (s.get("spec") or {}).get("loadBalancerIP")
        try:
            requested = [ipaddress.ip_address(requested)] if requested else []
        except ValueError:
            log.warning("service %s: spec.loadBalancerIP %r is not an IP", _key(s), requested)
            requested = []
        for pool in pools:
            fam = f"IPv{pool.version}"
            if fam not in _families(s):
                continue
            keep = next((ip for ip in requested + _status_ips(s)
                         if ip.version == pool.version and (ip in pool or ip in requested) and ip not in taken), None)
            if keep is not None:
                taken[keep] = _key(s)
                result[_key(s)][pool] = keep
            else:
                wanted.append((s, pool))
    for s, pool in wanted:
        hosts = pool.hosts() if pool.num_addresses > 2 else iter(pool)
        ip = next((a for a in hosts if a not in taken), None)
        if ip is None:
            log.warning("service %s: loadBalancerCIDR %s is exhausted; its ingress stays pending", _key(s), pool)
            continue
        taken[ip] = _key(s)
        result[_key(s)][pool] = ip
    return {k: [str(v[p]) for p in pools if p in v] for k, v in result.items()}


def desired_ingress(svc, ips, pools):
    """Our IPs first, then entries that others wrote (outside our pools)."""
    pools = [ipaddress.ip_network(p) for p in pools]
    mine = [{"ip": ip, "ipMode": "VIP"} for ip in ips]
    others = []
    for ing in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or ():
        try:
            ip = ipaddress.ip_address(ing.get("ip"))
            if any(ip in p for p in pools) or str(ip) in ips:
                continue
        except (TypeError, ValueError):
            pass
        others.append(ing)
    return mine + others


class StatusWriter:
    """While `elector` leads, keeps status.loadBalancer.ingress of our
    services equal to allocate(). `services()` returns the current Services
    (e.g. a reflector's snapshot); call changed() on each Service event."""

    def __init__(self, client, services, pools, elector, load_balancer_class=None, period=30.0):
        self.client, self.services, self.pools, self.elector = client, services, list(pools), elector
        self.load_balancer_class = load_balancer_class
        self.period = period
        self.writes = 0
        self.errors = 0
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread = None

    def changed(self, *_):
        self._dirty.set()

    def start(self):
        self._thread = threading.Thread(target=self.run, name="lb-status", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._dirty.set()
        if self._thread:
            self._thread.join(10)

    def run(self):
        while not self._stop.is_set():
            self._dirty.wait(self.period)
            self._dirty.clear()
            if self._stop.is_set():
                return
            if self.elector.is_leader:
                self.sync()
            self._stop.wait(0.2)    # at most a few passes a second, even when retrying

    def sync(self):
        """One pass: write every status that differs; returns the allocation."""
        got = self.services()
        svcs = list(got.values()) if isinstance(got, dict) else list(got)
        alloc = allocate(svcs, self.pools, self.load_balancer_class)
        by_key = {_key(s): s for s in svcs}
        for key, ips in alloc.items():
            s = by_key[key]
            want = desired_ingress(s, ips, self.pools)
            have = ((s.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
            if want == have:
                continue
            md = s["metadata"]
            try:
                self.client.merge_patch(path_for("Service", md["namespace"], md["name"], "status"),
                                        {"metadata": {"resourceVersion": md.get("resourceVersion")},
                                         "status": {"loadBalancer": {"ingress": want}}})
                self.writes += 1
                log.info("service %s: status.loadBalancer.ingress = %s", key, [w.get("ip") for w in want])
            except ApiError as e:
                if e.status != 409:    # 409: it changed meanwhile; its watch event brings us back
                    self.errors += 1
                    log.warning("service %s: cannot write the ingress status: %s", key, e)
                if e.status in (404, 409):
                    continue
                self._dirty.set()
            except (urllib3.exceptions.HTTPError, OSError) as e:
                self.errors += 1
                log.warning("service %s: cannot write the ingress status: %s", key, e)
                self._dirty.set()
                break
        return alloc
