"""Service map -> flat fast-path tables (engine._fastpath.Tables).

One row per (address, port, protocol) that opens flows: the cluster IP of
every service port, each node port (address 0: any node address), the
LoadBalancer ingress IP (with its source ranges) and every external IP.
"""
from __future__ import annotations

import ipaddress
import socket
import struct

from .model import PROTOCOLS

SCHEDULER_IDS = {"random": 0, "rr": 1, "lc": 2, "sh": 3, "mh": 4}
SCHEDULER_ANNOTATION = "engine.io/scheduler"     # per service, as kube-router's


class Ids:
    """Stable small integers for names (service ports, backends) across
    syncs: the fast path keys counters and flow counts by them. Released ids
    are reused, last released first."""

    def __init__(self, limit):
        self.limit = limit
        self.ids = {}
        self.free = []
        self.used = set()           # keys asked for since the last retain()

    def get(self, key):
        self.used.add(key)
        i = self.ids.get(key)
        if i is None:
            if self.free:
                i = self.free.pop()
            elif len(self.ids) < self.limit:
                i = len(self.ids)
            else:
                raise ValueError(f"more than {self.limit} distinct ids")
            self.ids[key] = i
        return i

    def retain(self, keys):
        """Release the ids of every key not in keys."""
        for k in [k for k in self.ids if k not in keys]:
            self.free.append(self.ids.pop(k))
        self.used = set()


class CompileState:
    """What one running engine keeps between compiles."""

    def __init__(self, max_services=65536, max_backends=1 << 20):
        self.services = Ids(max_services)
        self.backends = Ids(max_backends)


def _int(ip, _unpack=struct.Struct("!I").unpack, _aton=socket.inet_aton):
    # addresses here were validated by config.py; inet_aton is ~10x ipaddress
    return _unpack(_aton(ip))[0]


def _cidr(c):
    n = ipaddress.IPv4Network(c)
    return (int(n.network_address), n.prefixlen)


def backend_rows(name, pi, state):
    """The backends of one service port as a table row takes them."""
    bid = state.backends.get
    return [(_int(e.ip), e.port, bid((name, e.ip, e.port))) for e in pi.usable]


def rows(smap, engine_cfg, extra=(), state=None):
    """The table rows as plain dicts. With a CompileState, rows carry stable
    service and backend ids."""
    out = []
    for info in smap.services.values():
        s = info.svc
        if s.type == "ExternalName" or info.cluster_ip in (None, "None"):
            continue
        sched = SCHEDULER_IDS[s.annotations.get(SCHEDULER_ANNOTATION, engine_cfg.scheduler)]
        for pi in info.ports:
            proto = PROTOCOLS[pi.port.protocol]
            name = info.port_name(pi)
            if state:
                # one id per (service port, endpoint): lc counts flows per service, as IPVS
                backends = backend_rows(name, pi, state)
            else:
                backends = [(_int(e.ip), e.port) for e in pi.usable]
            base = dict(name=name, port=pi.port.port, proto=proto, backends=backends, scheduler=sched)
            if state:
                base["id"] = state.services.get(name)
            if s.session_affinity == "ClientIP":
                base["affinity_timeout"] = s.affinity_timeout
            out.append(dict(base, vip=_int(info.cluster_ip)))
            if pi.node_port:
                out.append(dict(base, vip=0, port=pi.node_port, nodeport=True))
            if info.ingress_ip:
                out.append(dict(base, vip=_int(info.ingress_ip),
                                source_ranges=[_cidr(c) for c in s.load_balancer_source_ranges]))
            for ext in s.external_ips:
                if ext != info.ingress_ip:
                    out.append(dict(base, vip=_int(ext)))
    for r in extra:
        if state:
            r = dict(r, id=state.services.get(r["name"]),
                     backends=[(a, p, state.backends.get((r["name"], str(ipaddress.IPv4Address(a)), p)))
                               for a, p, *_ in r["backends"]])
        out.append(r)
    return out


def compile_tables(smap, engine_cfg, node_addrs=(), extra=(), state=None):
    """Build one generation of fast-path tables."""
    from . import _fastpath
    rs = rows(smap, engine_cfg, extra, state)
    if state:
        state.services.retain(state.services.used)
        state.backends.retain(state.backends.used)
    vips = sorted({r["vip"] for r in rs if r["vip"]})
    drop = [_cidr(engine_cfg.service_cidr)]
    if engine_cfg.load_balancer_cidr:
        drop.append(_cidr(engine_cfg.load_balancer_cidr))
    return _fastpath.Tables(rs, vips=vips, drop_cidrs=drop,
                            node_addrs=[_int(a) for a in node_addrs])
