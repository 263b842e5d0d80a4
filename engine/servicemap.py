"""Objects -> the service map: every Service with its addresses allocated and
its endpoints resolved, per port. Pure policy; nothing here touches packets.

Allocation is stable: an address or port is derived from a hash of the
service's name (so restarts give the same answer) and `previous` keeps what a
running engine already handed out.
"""
from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from typing import Optional

from .config import ConfigError
from .model import Endpoint, Service, ServicePort


@dataclass
class PortInfo:
    port: ServicePort
    node_port: Optional[int]
    endpoints: list            # every known endpoint (ready, serving, terminating)

    @property
    def usable(self):
        return usable(self.endpoints)


def usable(endpoints):
    """Endpoints that take new flows: ready ones, else serving-terminating
    ones (kube-proxy's fallback since KEP-1669)."""
    ready = [e for e in endpoints if e.ready]
    return ready or [e for e in endpoints if e.serving and e.terminating]


@dataclass
class ServiceInfo:
    svc: Service
    cluster_ip: Optional[str]          # None for ExternalName, "None" for headless
    ports: list                        # [PortInfo]
    ingress_ip: Optional[str] = None   # LoadBalancer ingress; None: pending
    warnings: list = field(default_factory=list)
    # a headless service without ports still has endpoints, by address
    # alone (port 0): cluster DNS answers one A record per ready one
    addresses: list = field(default_factory=list)

    @property
    def key(self):
        return self.svc.key

    def port_name(self, pi):
        return f"{self.svc.namespace}/{self.svc.name}" + (f":{pi.port.name}" if pi.port.name else "")


@dataclass
class ServiceMap:
    services: dict                     # key -> ServiceInfo, sorted by key
    warnings: list = field(default_factory=list)
    # what endpoint-only changes need (update_endpoints), kept from build()
    pods: dict = field(default_factory=dict, repr=False)        # (ns, name) -> Pod
    index: object = field(default=None, repr=False)             # PodIndex of pods
    _selectors: object = field(default=None, repr=False)

    def selectors(self):
        """(services by (ns, label key, value) of their selector, services by
        (ns, name)), built once per map and handed on while services stay."""
        if self._selectors is None:
            by_label, by_name = {}, {}
            for info in self.services.values():
                s = info.svc
                by_name[(s.namespace, s.name)] = s
                for k, v in (s.selector or {}).items():
                    by_label.setdefault((s.namespace, k, v), []).append(s)
            self._selectors = (by_label, by_name)
        return self._selectors
    slices: dict = field(default_factory=dict, repr=False)      # (ns, service) -> {slice key: [slices]}
    # what is handed out, for a partial update: address -> service key,
    # (node port, protocol) -> service key, ingress address -> service key
    ips: dict = field(default_factory=dict, repr=False)
    node_ports: dict = field(default_factory=dict, repr=False)
    ingress: dict = field(default_factory=dict, repr=False)

    def allocations(self):
        """What to keep stable on the next build (see build(previous=))."""
        out = {}
        for k, s in self.services.items():
            out[k] = {"cluster_ip": s.cluster_ip, "ingress_ip": s.ingress_ip,
                      "node_ports": {(p.port.port, p.port.protocol): p.node_port for p in s.ports}}
        return out


DNS_SERVICE_KEY = "kube-system/kube-dns"


def dns_service_info(dns_cfg):
    """The engine's own cluster DNS as Kubernetes shows it: the Service
    kube-system/kube-dns on dns.clusterIP, ports dns (UDP) and dns-tcp.
    Shown and resolvable, never compiled: the address is the node's own."""
    if not dns_cfg.cluster_ip:
        return None
    ports = [ServicePort(name="dns", protocol="UDP", port=dns_cfg.port, target_port=dns_cfg.port, node_port=None),
             ServicePort(name="dns-tcp", protocol="TCP", port=dns_cfg.port, target_port=dns_cfg.port, node_port=None)]
    svc = Service(namespace="kube-system", name="kube-dns", type="ClusterIP", cluster_ip=dns_cfg.cluster_ip,
                  selector=None, ports=ports)
    return ServiceInfo(svc=svc, cluster_ip=dns_cfg.cluster_ip,
                       ports=[PortInfo(port=p, node_port=None, endpoints=[]) for p in ports])


def _hash(s):
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big")


def build(cfg, previous=None):
    """Config -> ServiceMap. Raises ConfigError on conflicts."""
    eng = cfg.engine
    previous = previous or {}
    cidr = ipaddress.IPv4Network(eng.service_cidr)
    services = sorted(cfg.services, key=lambda s: s.key)
    infos = {}
    used_ips = {}
    if eng.dns.cluster_ip:
        used_ips[eng.dns.cluster_ip] = "the cluster DNS service (dns.clusterIP)"

    # 1. explicit cluster IPs first: they win over allocation, conflicts are errors
    for s in services:
        info = ServiceInfo(svc=s, cluster_ip=None, ports=[])
        infos[s.key] = info
        if s.type == "ExternalName":
            continue
        if s.cluster_ip and s.cluster_ip != "None":
            ip = ipaddress.IPv4Address(s.cluster_ip)
            if ip not in cidr:
                raise ConfigError(s.source, "spec.clusterIP", f"{ip} is not in serviceCIDR {cidr}")
            if ip in (cidr.network_address, cidr.broadcast_address):
                raise ConfigError(s.source, "spec.clusterIP", f"{ip} is the network or broadcast address of {cidr}")
            # kube-dns itself (as `kubectl get svc -A -o yaml` dumps it) may
            # describe the engine's DNS address; any other service may not
            own_dns = s.key == DNS_SERVICE_KEY and str(ip) == eng.dns.cluster_ip
            if str(ip) in used_ips and not own_dns:
                raise ConfigError(s.source, "spec.clusterIP", f"{ip} is already allocated to {used_ips[str(ip)]}")
            used_ips[str(ip)] = f"service {s.key}"
            info.cluster_ip = str(ip)
        elif s.cluster_ip == "None":
            info.cluster_ip = "None"
    # 2. allocate the rest, keeping earlier allocations
    for s in services:
        info = infos[s.key]
        if s.type == "ExternalName" or info.cluster_ip:
            continue
        info.cluster_ip = _allocate_ip(s, cidr, used_ips, (previous.get(s.key) or {}).get("cluster_ip"))

    _node_ports(eng, services, infos, previous)
    _ingress(eng, services, infos, previous, used_ips)
    pods = PodIndex(cfg.pods)
    slices = {}
    for sl in cfg.slices:
        slices.setdefault((sl.namespace, sl.service_name), {}).setdefault(_slice_key(sl), []).append(sl)
    warnings = []
    for s in services:
        _resolve(infos[s.key], pods, slices)
        warnings.extend(f"{s.source}: {w}" for w in infos[s.key].warnings)
    smap = ServiceMap(services=infos, warnings=warnings, slices=slices, index=pods,
                      pods={(p.namespace, p.name): p for p in cfg.pods})
    smap.ips = {ip: k[8:] for ip, k in used_ips.items() if k.startswith("service ")}
    smap.node_ports = {np_: k for k, info in infos.items() for np_ in _node_port_keys(info)}
    smap.ingress = {info.ingress_ip: k for k, info in infos.items() if info.ingress_ip}
    return smap


def _allocate_ip(s, cidr, used_ips, prev):
    """A cluster IP for s: prev when it is still free, else the first free
    address from a hash of its name."""
    hosts = cidr.num_addresses - 2
    if prev and prev != "None" and prev not in used_ips and ipaddress.IPv4Address(prev) in cidr:
        ip = prev
    else:
        if hosts <= len(used_ips):
            raise ConfigError(s.source, "spec.clusterIP", f"serviceCIDR {cidr} is full")
        start = _hash(s.key) % hosts
        for i in range(hosts):
            ip = str(cidr.network_address + 1 + (start + i) % hosts)
            if ip not in used_ips:
                break
    used_ips[ip] = f"service {s.key}"
    return ip


def _node_port_keys(info):
    return [(pi.node_port, pi.port.protocol) for pi in info.ports if pi.node_port]


def _resolve(info, pods, slices):
    """The endpoints of every port of info (and the addresses of a port-less
    headless service), from the pods its selector picks or the slices of the
    service; the one place endpoints are resolved."""
    s = info.svc
    info.warnings = [w for w in info.warnings if "matches no pod" not in w]
    sl = [x for group in slices.get((s.namespace, s.name), {}).values() for x in group]
    selected = pods.select(s.namespace, s.selector) if s.selector is not None else None
    for pi in info.ports:
        if selected is not None:
            pi.endpoints = _selector_endpoints(s, pi.port, selected)
        else:
            pi.endpoints = _slice_endpoints(pi.port, sl)
    _portless(info, pods, sl)
    if s.type != "ExternalName" and s.selector is not None and not selected:
        info.warnings.append(f"selector {_fmt_sel(s.selector)} matches no pod")


def _slice_key(sl):
    """Slices of one object (an Endpoints' subsets) share its key."""
    return (sl.source.kind, sl.namespace, sl.source.name) if sl.source else (sl.namespace, sl.name)


class NeedFull(Exception):
    """A change a partial update does not make (an address or port claimed
    twice, say): the caller does a full build, which sorts it out or names
    the error."""


def update(smap, eng, services=(), pods=(), slices=()):
    """A new ServiceMap for a set of object changes (kube-proxy's service
    and endpoints change trackers): only what they touch is recomputed.
      services: [(key "ns/name", Service or None)]
      pods:     [((ns, name), Pod or None)]
      slices:   [(slice key, namespace, service name, [slices] or None)];
                a slice that moved from one service to another is given
                twice: None for the one it left, then for the one it joined
    Returns (new smap, keys of the services recomputed, keys removed).
    Raises NeedFull when only a full build can say. The new map's services
    are in no particular order (build's are sorted) and its warnings are
    those of the last build: the recomputed services carry their own."""
    infos = dict(smap.services)
    ips = dict(smap.ips) if services else smap.ips
    node_ports = dict(smap.node_ports) if services else smap.node_ports
    ingress = dict(smap.ingress) if services else smap.ingress
    by_label, by_name = smap.selectors()
    affected, removed = set(), set()
    if services:
        by_label, by_name = dict(by_label), dict(by_name)
        for key, _ in services:                 # release first: a change may reuse its own addresses
            old = infos.pop(key, None)
            if old is None:
                continue
            _release(old, ips, node_ports, ingress, by_label, by_name)
            removed.add(key)
        for key, svc in services:
            if svc is None:
                continue
            prev = smap.services.get(key)
            infos[key] = _allocate(svc, eng, prev, ips, node_ports, ingress)
            _index_selector(svc, by_label, by_name)
            affected.add(key)
            removed.discard(key)
    new_pods, index, new_slices, owners, touched = _endpoint_changes(smap, pods, slices)
    for p in touched:
        for k, v in p.labels.items():
            for s in by_label.get((p.namespace, k, v), ()):
                if _matches(s.selector, p.labels):
                    affected.add(s.key)
    for owner in owners:
        s = by_name.get(owner)
        if s is not None and s.selector is None:
            affected.add(s.key)
    warnings = smap.warnings
    for key in affected:
        old = infos[key]
        info = ServiceInfo(svc=old.svc, cluster_ip=old.cluster_ip, ingress_ip=old.ingress_ip,
                           ports=[PortInfo(port=pi.port, node_port=pi.node_port, endpoints=[]) for pi in old.ports],
                           warnings=list(old.warnings))
        _resolve(info, index, new_slices)
        infos[key] = info
    out = ServiceMap(services=infos, warnings=warnings, pods=new_pods, slices=new_slices, index=index,
                     _selectors=(by_label, by_name), ips=ips, node_ports=node_ports, ingress=ingress)
    return out, affected, removed


def _release(info, ips, node_ports, ingress, by_label, by_name):
    s = info.svc
    if ips.get(info.cluster_ip) == s.key:
        del ips[info.cluster_ip]
    for k in _node_port_keys(info):
        if node_ports.get(k) == s.key:
            del node_ports[k]
    if info.ingress_ip and ingress.get(info.ingress_ip) == s.key:
        del ingress[info.ingress_ip]
    by_name.pop((s.namespace, s.name), None)
    for k, v in (s.selector or {}).items():
        lst = [x for x in by_label.get((s.namespace, k, v), ()) if x.key != s.key]
        if lst:
            by_label[(s.namespace, k, v)] = lst
        else:
            by_label.pop((s.namespace, k, v), None)


def _index_selector(s, by_label, by_name):
    by_name[(s.namespace, s.name)] = s
    for k, v in (s.selector or {}).items():
        by_label[(s.namespace, k, v)] = by_label.get((s.namespace, k, v), []) + [s]


def _allocate(s, eng, prev, ips, node_ports, ingress):
    """ServiceInfo of one added or changed service, its addresses and node
    ports taken from what is free (prev's first)."""
    info = ServiceInfo(svc=s, cluster_ip=None, ports=[PortInfo(port=p, node_port=None, endpoints=[]) for p in s.ports])
    cidr = ipaddress.IPv4Network(eng.service_cidr)
    used = _UsedIPs(ips, eng.dns.cluster_ip)
    if s.type != "ExternalName":
        if s.cluster_ip == "None":
            info.cluster_ip = "None"
        elif s.cluster_ip:
            ip = ipaddress.IPv4Address(s.cluster_ip)
            if s.cluster_ip in used or ip not in cidr or ip in (cidr.network_address, cidr.broadcast_address):
                raise NeedFull()
            info.cluster_ip = s.cluster_ip
        else:
            info.cluster_ip = _allocate_ip(s, cidr, used, prev.cluster_ip if prev else None)
        if info.cluster_ip != "None":
            ips[info.cluster_ip] = s.key
    if s.type in ("NodePort", "LoadBalancer"):
        lo, hi = eng.node_port_range
        had = {(p.port.port, p.port.protocol): p.node_port for p in prev.ports} if prev else {}
        for pi in info.ports:
            proto, p = pi.port.protocol, pi.port.node_port
            if p is not None:
                if (p, proto) in node_ports or not lo <= p <= hi:
                    raise NeedFull()
            else:
                p = had.get((pi.port.port, proto))
                if not (p and lo <= p <= hi and (p, proto) not in node_ports):
                    start = _hash(f"{s.key}:{pi.port.port}/{proto}") % (hi - lo + 1)
                    p = next((lo + (start + j) % (hi - lo + 1) for j in range(hi - lo + 1)
                              if (lo + (start + j) % (hi - lo + 1), proto) not in node_ports), None)
                    if p is None:
                        raise NeedFull()
            node_ports[(p, proto)] = s.key
            pi.node_port = p
    if s.type == "LoadBalancer":
        if s.load_balancer_ip:
            if s.load_balancer_ip in ingress or s.load_balancer_ip in used:
                raise NeedFull()
            info.ingress_ip = s.load_balancer_ip
        elif not eng.load_balancer_cidr:
            info.warnings.append("no loadBalancerCIDR: the ingress IP stays <pending>")
        else:
            pool = ipaddress.IPv4Network(eng.load_balancer_cidr)
            p = prev.ingress_ip if prev else None
            if p and p not in ingress and ipaddress.IPv4Address(p) in pool:
                info.ingress_ip = p
            else:
                hosts = pool.hosts() if pool.num_addresses > 1 else [pool.network_address]
                info.ingress_ip = next((str(a) for a in hosts if str(a) not in ingress), None)
                if info.ingress_ip is None:
                    info.warnings.append(f"loadBalancerCIDR {pool} is exhausted: the ingress IP stays <pending>")
        if info.ingress_ip:
            ingress[info.ingress_ip] = s.key
    return info


class _UsedIPs:
    """The cluster IPs handed out (ips: address -> service key) and the DNS
    address, as _allocate_ip asks: without copying ips."""

    def __init__(self, ips, dns_ip):
        self.ips, self.dns_ip = ips, dns_ip

    def __contains__(self, ip):
        return ip in self.ips or ip == self.dns_ip

    def __len__(self):
        return len(self.ips) + (1 if self.dns_ip and self.dns_ip not in self.ips else 0)

    def __setitem__(self, ip, what):
        pass                        # the caller records the address in ips itself


def _endpoint_changes(smap, pods, slices):
    """Pods and slices after the changes: (pods, PodIndex, slices by
    service, services whose slices changed, old and new versions of the
    changed pods)."""
    new_pods = dict(smap.pods)
    touched = []
    for key, pod in pods:
        old = new_pods.pop(key, None)
        if old is not None:
            touched.append(old)
        if pod is not None:
            new_pods[key] = pod
            touched.append(pod)
    new_slices = dict(smap.slices)
    owners = set()
    for skey, ns, svc_name, group in slices:
        # (a slice that moved to another service comes as two entries: None
        # for the service it left, its slices for the one it joined)
        owner = (ns, svc_name)
        cur = dict(new_slices.get(owner, {}))
        cur.pop(skey, None)
        if group:
            cur[skey] = group
        new_slices[owner] = cur
        owners.add(owner)
    removed = [p for p in touched if new_pods.get((p.namespace, p.name)) is not p]
    added = [p for p in touched if new_pods.get((p.namespace, p.name)) is p]
    index = smap.index.updated(removed, added) if touched else smap.index
    return new_pods, index, new_slices, owners, touched


def _node_ports(eng, services, infos, previous):
    lo, hi = eng.node_port_range
    used = {}
    for s in services:
        info = infos[s.key]
        info.ports = [PortInfo(port=p, node_port=None, endpoints=[]) for p in s.ports]
        if s.type not in ("NodePort", "LoadBalancer"):
            continue
        for i, pi in enumerate(info.ports):
            np_ = pi.port.node_port
            if np_ is None:
                continue
            if not lo <= np_ <= hi:
                raise ConfigError(s.source, f"spec.ports[{i}].nodePort", f"{np_} is not in nodePortRange {lo}-{hi}")
            k = (np_, pi.port.protocol)
            if k in used:
                raise ConfigError(s.source, f"spec.ports[{i}].nodePort", f"{np_}/{pi.port.protocol} is already allocated to {used[k]}")
            used[k] = f"service {s.key}"
            pi.node_port = np_
    size = hi - lo + 1
    for s in services:
        if s.type not in ("NodePort", "LoadBalancer"):
            continue
        prev = (previous.get(s.key) or {}).get("node_ports", {})
        for i, pi in enumerate(infos[s.key].ports):
            if pi.node_port is not None:
                continue
            proto = pi.port.protocol
            p = prev.get((pi.port.port, proto))
            if not (p and lo <= p <= hi and (p, proto) not in used):
                start = _hash(f"{s.key}:{pi.port.port}/{proto}") % size
                for j in range(size):
                    p = lo + (start + j) % size
                    if (p, proto) not in used:
                        break
                else:
                    raise ConfigError(s.source, f"spec.ports[{i}].nodePort", f"nodePortRange {lo}-{hi} is full")
            used[(p, proto)] = f"service {s.key}"
            pi.node_port = p


def _ingress(eng, services, infos, previous, used_ips):
    pool = ipaddress.IPv4Network(eng.load_balancer_cidr) if eng.load_balancer_cidr else None
    taken = {}
    for s in services:
        if s.type == "LoadBalancer" and s.load_balancer_ip:
            if s.load_balancer_ip in taken:
                raise ConfigError(s.source, "spec.loadBalancerIP", f"{s.load_balancer_ip} is already used by {taken[s.load_balancer_ip]}")
            if s.load_balancer_ip in used_ips:
                raise ConfigError(s.source, "spec.loadBalancerIP", f"{s.load_balancer_ip} is a cluster IP of {used_ips[s.load_balancer_ip]}")
            taken[s.load_balancer_ip] = f"service {s.key}"
            infos[s.key].ingress_ip = s.load_balancer_ip
    for s in services:
        if s.type != "LoadBalancer" or s.load_balancer_ip:
            continue
        if pool is None:
            infos[s.key].warnings.append("no loadBalancerCIDR: the ingress IP stays <pending>")
            continue
        prev = (previous.get(s.key) or {}).get("ingress_ip")
        if prev and prev not in taken and ipaddress.IPv4Address(prev) in pool:
            ip = prev
        else:
            ip = next((str(a) for a in pool.hosts() if str(a) not in taken), None) if pool.num_addresses > 1 \
                else (str(pool.network_address) if str(pool.network_address) not in taken else None)
            if ip is None:
                infos[s.key].warnings.append(f"loadBalancerCIDR {pool} is exhausted: the ingress IP stays <pending>")
                continue
        taken[ip] = f"service {s.key}"
        infos[s.key].ingress_ip = ip


class PodIndex:
    """Pods by namespace and label, so a selector costs the size of its
    smallest label set instead of a scan of every pod."""

    def __init__(self, pods):
        self.by_label = {}          # (namespace, key, value) -> [pod]
        for p in pods:
            for k, v in p.labels.items():
                self.by_label.setdefault((p.namespace, k, v), []).append(p)
        self._cache = {}

    def updated(self, removed, added):
        """A new index without `removed` and with `added` pods; lists of
        untouched labels are shared with this one."""
        new = PodIndex(())
        new.by_label = dict(self.by_label)
        copied = set()
        for p, add in [(p, False) for p in removed] + [(p, True) for p in added]:
            for k, v in p.labels.items():
                key = (p.namespace, k, v)
                if key not in copied:
                    new.by_label[key] = list(new.by_label.get(key, ()))
                    copied.add(key)
                lst = new.by_label[key]
                if add:
                    lst.append(p)
                else:
                    lst[:] = [x for x in lst if x is not p]
        return new

    def select(self, namespace, selector):
        """Pods of namespace whose labels include selector, sorted by name
        (an empty selector selects nothing, as for a Service)."""
        if not selector:
            return []
        key = (namespace, tuple(sorted(selector.items())))
        hit = self._cache.get(key)
        if hit is None:
            sets = sorted((self.by_label.get((namespace, k, v), ()) for k, v in selector.items()), key=len)
            hit = [p for p in sets[0] if _matches(selector, p.labels)]
            hit.sort(key=lambda p: p.name)
            self._cache[key] = hit
        return hit


def _matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _fmt_sel(sel):
    return ",".join(f"{k}={v}" for k, v in sorted(sel.items()))


def _selector_endpoints(svc, sp, pods):
    out = []
    for p in pods:
        if not p.ip:
            continue
        if isinstance(sp.target_port, int):
            port = sp.target_port
        else:
            cp = p.container_ports.get(sp.target_port)
            if cp is None or cp[1] != sp.protocol:
                continue      # this pod does not expose the named port
            port = cp[0]
        out.append(_pod_endpoint(svc, p, port))
    return out


def _pod_endpoint(svc, p, port):
    """The endpoint pod p gives svc on port (0: by address alone)."""
    return Endpoint(ip=p.ip, port=port, ready=(p.ready or svc.publish_not_ready) and not p.terminating,
                    serving=p.ready or svc.publish_not_ready, terminating=p.terminating,
                    pod=p.name, hostname=p.hostname)


def _portless(info, pods, slices):
    """info.addresses of a headless service without ports: its selected pods,
    or the endpoints of its slices that list no ports (as the endpoints
    controller writes them for such a service)."""
    s = info.svc
    if info.cluster_ip != "None" or info.ports:
        return
    if s.selector is not None:
        info.addresses = [_pod_endpoint(s, p, 0) for p in pods.select(s.namespace, s.selector) if p.ip]
    else:
        seen = set()
        info.addresses = [e for sl in slices if not sl.ports for e in sl.endpoints
                          if e.ip not in seen and not seen.add(e.ip)]


def _slice_endpoints(sp, slices):
    out, seen = [], set()
    for sl in slices:
        for name, port, proto in sl.ports:
            if name != sp.name or proto != sp.protocol:
                continue
            for e in sl.endpoints:
                if (e.ip, port) in seen:
                    continue
                seen.add((e.ip, port))
                out.append(Endpoint(ip=e.ip, port=port, ready=e.ready, serving=e.serving,
                                    terminating=e.terminating, pod=e.pod, hostname=e.hostname))
    return out
