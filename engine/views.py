"""What the engine shows people: kubectl-, conntrack- and ipvsadm-like text."""
from __future__ import annotations


from . import snapshot
from .model import PROTO_NAMES, SCHEDULER_ANNOTATION
from .servicemap import dns_service_info, usable as usable_endpoints


def table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _ports(info):
    return ",".join(f"{p.port.port}:{p.node_port}/{p.port.protocol}" if p.node_port
                    else f"{p.port.port}/{p.port.protocol}" for p in info.ports) or "<none>"


def _external(info):
    s = info.svc
    if s.type == "ExternalName":
        return s.external_name
    exts = ([info.ingress_ip] if info.ingress_ip else ["<pending>"] if s.type == "LoadBalancer" else []) \
        + [e for e in s.external_ips if e != info.ingress_ip]
    return ",".join(exts) or "<none>"


def services(smap, dns_cfg=None):
    """One line per service, as `kubectl get svc -A` prints them; with
    dns_cfg, the engine's own DNS as kube-system/kube-dns among them."""
    rows = [("NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)")]
    infos = dict(smap.services)
    own = dns_service_info(dns_cfg) if dns_cfg is not None else None
    if own is not None and own.key not in infos:
        infos[own.key] = own
    for _, info in sorted(infos.items()):
        s = info.svc
        cip = "<none>" if s.type == "ExternalName" else info.cluster_ip
        rows.append((s.namespace, s.name, s.type, cip, _external(info), _ports(info)))
    return table(rows)


def _ready_eps(info):
    eps = []
    for p in info.ports:
        eps += [f"{e.ip}:{e.port}" for e in p.usable if f"{e.ip}:{e.port}" not in eps]
    return eps or [e.ip for e in usable_endpoints(info.addresses)]     # headless, no ports


def endpoints(smap):
    """As `kubectl get endpoints -A`: the addresses that take new flows."""
    rows = [("NAMESPACE", "NAME", "ENDPOINTS")]
    for _, info in sorted(smap.services.items()):
        if info.svc.type != "ExternalName":
            rows.append((info.svc.namespace, info.svc.name, ",".join(_ready_eps(info)) or "<none>"))
    return table(rows)


def describe_service(eng, name, namespace="default"):
    """As `kubectl describe svc NAME`."""
    info = eng.smap.services.get(f"{namespace}/{name}")
    if info is None:
        raise KeyError(f'services "{name}" not found in namespace {namespace}')
    s = info.svc
    sched = s.annotations.get(SCHEDULER_ANNOTATION, eng.cfg.engine.scheduler)
    lines = [
        ("Name", s.name), ("Namespace", s.namespace),
        ("Annotations", ", ".join(f"{k}: {v}" for k, v in sorted(s.annotations.items())) or "<none>"),
        ("Selector", ",".join(f"{k}={v}" for k, v in sorted((s.selector or {}).items())) or "<none>"),
        ("Type", s.type),
    ]
    if s.type == "ExternalName":
        lines.append(("External Name", s.external_name))
    else:
        lines.append(("IP", info.cluster_ip))
        if info.ingress_ip or s.type == "LoadBalancer":
            lines.append(("LoadBalancer Ingress", info.ingress_ip or "<pending>"))
        if s.external_ips:
            lines.append(("External IPs", ",".join(s.external_ips)))
    ids = eng.state.services.ids
    counters = eng.fp.service_counters([ids[n] for n in (info.port_name(p) for p in info.ports) if n in ids])
    for p in info.ports:
        pn = p.port.name or "<unset>"
        lines.append(("Port", f"{pn}  {p.port.port}/{p.port.protocol}"))
        tp = p.port.target_port
        lines.append(("TargetPort", f"{tp}/{p.port.protocol}"))
        if p.node_port:
            lines.append(("NodePort", f"{pn}  {p.node_port}/{p.port.protocol}"))
        eps = [f"{e.ip}:{e.port}" for e in p.usable]
        lines.append(("Endpoints", ",".join(eps) or "<none>"))
        unready = [f"{e.ip}:{e.port}" + (" (terminating)" if e.terminating else "")
                   for e in p.endpoints if e not in p.usable]
        if unready:
            lines.append(("NotReady", ",".join(unready)))
        c = counters.get(ids.get(info.port_name(p)))
        if c:
            lines.append(("Traffic", f"{c['flows']} flows, {c['packets']} packets, {c['bytes']} bytes, "
                                     f"{c['rejects']} refused, {c['denied']} denied"))
    lines.append(("Session Affinity", s.session_affinity + (f" ({s.affinity_timeout}s)" if s.session_affinity == "ClientIP" else "")))
    if s.type != "ExternalName":
        lines.append(("Scheduler", sched))
    if s.load_balancer_source_ranges:
        lines.append(("LoadBalancer Source Ranges", ",".join(s.load_balancer_source_ranges)))
    for w in info.warnings:
        lines.append(("Warning", w))
    lines.append(("Events", "<none>"))
    width = max(len(k) for k, _ in lines) + 2
    return "\n".join(f"{k + ':':<{width}}{v}" for k, v in lines)


def conntrack(eng, filters):
    """One line per flow, as `conntrack -L` prints them. Filters: proto,
    src, dst, sport, dport (of the original direction), service. The table
    is copied a chunk per lock hold (export_flows, as the snapshot) and
    formatted outside the lock: packets never wait for the listing."""
    names = {i: n for n, i in eng.state.services.ids.items()}
    want_proto = {"tcp": 6, "udp": 17}.get(str(filters.get("proto", "")).lower())
    want = {k: filters.get(k) for k in ("src", "dst", "sport", "dport")}
    sport = int(want["sport"]) if want["sport"] else None
    dport = int(want["dport"]) if want["dport"] else None
    lines = []
    for proto, state, left, (osrc, osport, odst, odport), (rsrc, rsport, rdst, rdport), svc, _ in \
            snapshot.records(eng.fp.export_flows()):
        if (want_proto and proto != want_proto or want["src"] and osrc != want["src"]
                or want["dst"] and odst != want["dst"] or sport is not None and osport != sport
                or dport is not None and odport != dport):
            continue
        name = names.get(svc, "?")
        if filters.get("service") and not name.startswith(filters["service"]):
            continue
        p = PROTO_NAMES.get(proto, str(proto))
        state = state if p == "tcp" else ("[UNREPLIED]" if state == "UNREPLIED" else "[ASSURED]")
        lines.append(f"{p:<8}{proto} {left} {state} "
                     f"src={osrc} dst={odst} sport={osport} dport={odport} "
                     f"src={rsrc} dst={rdst} sport={rsport} dport={rdport} service={name}")
    lines.append(f"engine conntrack: {len(lines)} flow entries have been shown.")
    return "\n".join(lines)


def stats(eng):
    c = eng.fp.counters()
    rows = [("COUNTER", "VALUE")]
    for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "flows", "max_flows", "flows_created",
              "flows_expired", "flows_evicted", "rejects", "write_errors", "drops"):
        rows.append((k, c[k]))
    for r, n in c["drops_by_reason"].items():
        rows.append((f"drops.{r}", n))
    for q, n in enumerate(eng.fp.queue_packets()):
        rows.append((f"queue{q}.rx_packets", n))
    rows.append(("queue_steering", f"ebpf ({eng.fp.tun_queues} queues)" if eng.fp.tun_queues > 1 else "off"))
    rows.append(("sync_seconds", f"{eng.sync_seconds:.6f}"))
    rows.append(("syncs", eng.syncs))
    rows.append(("services", len(eng.smap.services)))
    return table(rows)
