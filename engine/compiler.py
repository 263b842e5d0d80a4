"""Service map -> flat fast-path tables (engine._fastpath.Tables).

One row per (address, port, protocol) that opens flows: the cluster IP of
every service port, each node port (address 0: any node address), the
LoadBalancer ingress IP (with its source ranges) and every external IP.
"""
from __future__ import annotations

import ipaddress

from .model import PROTOCOLS

SCHEDULER_IDS = {"random": 0, "rr": 1, "lc": 2, "sh": 3, "mh": 4}


def _int(ip):
    return int(ipaddress.IPv4Address(ip))


def _cidr(c):
    n = ipaddress.IPv4Network(c)
    return (int(n.network_address), n.prefixlen)


def rows(smap, engine_cfg, extra=()):
    """The table rows as plain dicts (also what `engine check` prints)."""
    out = []
    sched = SCHEDULER_IDS[engine_cfg.scheduler]
    for info in smap.services.values():
        s = info.svc
        if s.type == "ExternalName" or info.cluster_ip in (None, "None"):
            continue
        for pi in info.ports:
            proto = PROTOCOLS[pi.port.protocol]
            backends = [(_int(e.ip), e.port) for e in pi.usable]
            base = dict(name=info.port_name(pi), port=pi.port.port, proto=proto,
                        backends=backends, scheduler=sched)
            out.append(dict(base, vip=_int(info.cluster_ip)))
            if pi.node_port:
                out.append(dict(base, vip=0, port=pi.node_port, nodeport=True))
            if info.ingress_ip:
                out.append(dict(base, vip=_int(info.ingress_ip),
                                source_ranges=[_cidr(c) for c in s.load_balancer_source_ranges]))
            for ext in s.external_ips:
                if ext != info.ingress_ip:
                    out.append(dict(base, vip=_int(ext)))
    out.extend(extra)
    return out


def compile_tables(smap, engine_cfg, node_addrs=(), extra=()):
    """Build one generation of fast-path tables."""
    from . import _fastpath
    rs = rows(smap, engine_cfg, extra)
    vips = sorted({r["vip"] for r in rs if r["vip"]})
    drop = [_cidr(engine_cfg.service_cidr)]
    if engine_cfg.load_balancer_cidr:
        drop.append(_cidr(engine_cfg.load_balancer_cidr))
    return _fastpath.Tables(rs, vips=vips, drop_cidrs=drop,
                            node_addrs=[_int(a) for a in node_addrs])
