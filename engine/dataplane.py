"""The running engine: owns the TUN, the fast-path worker and table swaps.

  objects (Config) -> servicemap.build -> compiler.compile_tables
                   -> Dataplane.swap (one atomic pointer swap)
                   -> housekeeping (stale UDP flows, metrics)
"""
from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time

from . import _fastpath, compiler, servicemap
from . import config as config_mod
from .config import ConfigError
from .tun import Tun

log = logging.getLogger("engine.dataplane")


def timeouts_from(ct):
    return {"ESTABLISHED": ct.tcp_established_timeout, "CLOSE_WAIT": ct.tcp_close_wait_timeout,
            "UNREPLIED": ct.udp_timeout, "ASSURED": ct.udp_stream_timeout}


class Engine:
    def __init__(self, cfg):
        self.cfg = cfg
        eng = cfg.engine
        self.fp = _fastpath.Dataplane(int(ipaddress.IPv4Address(eng.masquerade_ip)),
                                      max_flows=eng.conntrack.max,
                                      seed=int.from_bytes(os.urandom(4), "little") or 1,
                                      timeouts=timeouts_from(eng.conntrack))
        self.tun = None
        self.smap = None
        self.state = compiler.CompileState()
        self.dns = None
        self.state_file = cfg.engine.state_file or f"/run/engine/{cfg.engine.tun_name}.flows"
        self.base = cfg                 # objects from the files
        self.overrides = {}             # engine apply/delete: key -> [objects] | None
        self.lock = threading.RLock()   # one sync at a time
        self._stamps = self._file_stamps()      # the files as loaded: later writes are changes
        self._pending = None
        self._last_snapshot = time.monotonic()
        self.programmed = False
        self.last_sync_wall = None
        self.sync_seconds = 0.0
        self.syncs = 0
        self._stop = threading.Event()
        self._workers = []
        self.queues = max(1, min(2, os.cpu_count() or 1))   # one nogil worker per core

    # -- setup and teardown ---------------------------------------------------

    def start(self):
        eng = self.cfg.engine
        self.tun = Tun(eng.tun_name)
        try:
            self.tun.open(queues=self.queues, vnet=True)
            if self.queues > 1:
                self._steer_queues(eng)
            self.tun.enable_forwarding()
            if eng.dns.cluster_ip:
                # the DNS VIP is an address of the node (on the TUN), as IPVS
                # mode binds its VIPs: queries are delivered locally with the
                # client's own source address, so the server can tell cluster
                # clients from others and rate-limit per client
                self.tun.add_address(eng.dns.cluster_ip)
                from .dns import DNSServer
                self.dns = DNSServer(eng.dns, eng.dns.cluster_ip, eng.dns.port).start()
            self.sync(self.cfg)             # program before traffic is steered in
            self.restore_flows()
            self.tun.add_route(eng.service_cidr)
            self.tun.add_route(f"{eng.masquerade_ip}/32")
            if eng.load_balancer_cidr:
                self.tun.add_route(eng.load_balancer_cidr)
        except Exception:
            self.tun.close()
            raise
        for q in range(self.queues):
            io = _fastpath.IOWorker(self.fp, vnet=self.tun.vnet)
            th = threading.Thread(target=self._run, args=(io, self.tun.fileno(q)),
                                  name=f"fastpath-{q}", daemon=True)
            th.start()
            self._workers.append(th)
        self.programmed = True
        log.info("dataplane up on %s: %d queues, %d service rows", eng.tun_name, self.queues,
                 self.fp.current_tables.size)

    def _steer_queues(self, eng):
        """Both directions of a flow on one queue (engine/steering.py)."""
        from . import steering
        try:
            steering.attach(self.tun.fileno(0), int(ipaddress.IPv4Address(eng.masquerade_ip)))
        except OSError as e:
            log.warning("no queue steering (%s): the two directions of a flow may take different queues", e)
            return
        self.fp.steer_queues = self.queues
        log.info("queue steering: eBPF, both directions of a flow on one of %d queues", self.queues)

    def _run(self, io, fd):
        run = io.run
        stop = self._stop.is_set
        while not stop():
            run(fd, 200)

    def stop(self):
        self._stop.set()
        for th in self._workers:
            th.join(timeout=2)
        if self._workers:
            self.save_flows()
        if self.dns:
            self.dns.close()
        if self.tun:
            self.tun.close()
        self.programmed = False

    # -- sync -----------------------------------------------------------------

    def sync(self, cfg):
        """Build and swap in the tables for cfg; raises (and changes nothing)
        when cfg is bad."""
        with self.lock:
            return self._sync(cfg)

    def _sync(self, cfg):
        t0 = time.perf_counter()
        previous = self.smap.allocations() if self.smap else None
        smap = servicemap.build(cfg, previous)
        node_addrs = self.node_port_addresses(cfg.engine)
        try:
            tables = compiler.compile_tables(smap, cfg.engine, node_addrs=node_addrs, state=self.state)
        except ValueError as e:        # e.g. two services claiming one external IP:port
            raise ConfigError(cfg.path or "config", "", str(e)) from None
        self.fp.swap(tables)
        if self.tun:
            self._steer(cfg.engine, smap, node_addrs)
        if self.dns:
            self.dns.update(smap)
        old = self.smap
        self.cfg, self.smap = cfg, smap
        self._cleanup_stale_udp(old, smap)
        self.sync_seconds = time.perf_counter() - t0
        self.last_sync_wall = time.time()
        self.syncs += 1
        for w in smap.warnings:
            log.warning("%s", w)
        return smap

    # -- restart without loss ---------------------------------------------------------

    SNAPSHOT_MAX_AGE = 600      # seconds; an older snapshot describes flows long gone

    def save_flows(self, quiet=False):
        """Write the flow table for the next start (on SIGTERM/SIGINT, and
        every conntrack.snapshotInterval while running)."""
        import json
        with self.lock:         # ids as the flows name them: no sync in between
            data = self.fp.export_flows()
            header = {"version": 1, "time": time.time(), "masq": self.cfg.engine.masquerade_ip,
                      "entry_bytes": _fastpath.ENTRY_BYTES,
                      "services": {i: n for n, i in self.state.services.ids.items()},
                      "backends": {i: list(k) for k, i in self.state.backends.ids.items()}}
        try:
            os.makedirs(os.path.dirname(self.state_file) or ".", mode=0o700, exist_ok=True)
            tmp = self.state_file + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(header).encode() + b"\n" + data)
            os.replace(tmp, self.state_file)
            (log.debug if quiet else log.info)("saved %d flows to %s", len(data) // _fastpath.ENTRY_BYTES,
                                               self.state_file)
        except OSError as e:
            log.warning("cannot save flows to %s: %s", self.state_file, e)

    def snapshot_if_due(self):
        """The periodic snapshot: what a crash (SIGKILL) leaves for the next
        start. Returns True when one was written."""
        every = self.base.engine.conntrack.snapshot_interval
        now = time.monotonic()
        if not every or not self.programmed or now - self._last_snapshot < every:
            return False
        self._last_snapshot = now
        self.save_flows(quiet=True)
        return True

    def restore_flows(self):
        """Take over the flows a previous engine saved, then remove the file."""
        import json
        try:
            with open(self.state_file, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return 0
        except OSError as e:
            log.warning("cannot read %s: %s", self.state_file, e)
            return 0
        try:
            os.unlink(self.state_file)
        except OSError:
            pass
        try:
            line, data = raw.split(b"\n", 1)
            h = json.loads(line)
            age = time.time() - float(h["time"])
            if h.get("version") != 1 or h.get("entry_bytes") != _fastpath.ENTRY_BYTES:
                raise ValueError("snapshot of another format")
            if h.get("masq") != self.cfg.engine.masquerade_ip:
                raise ValueError("snapshot of another masquerade address")
            if not 0 <= age < self.SNAPSHOT_MAX_AGE:
                raise ValueError(f"snapshot is {age:.0f}s old")
            svc = {int(old): self.state.services.ids[name] for old, name in h["services"].items()
                   if name in self.state.services.ids}
            bk = {int(old): self.state.backends.ids[tuple(k)] for old, k in h["backends"].items()
                  if tuple(k) in self.state.backends.ids}
            n = self.fp.import_flows(data, svc_ids=svc, backend_ids=bk, elapsed=int(age))
            log.info("took over %d flows from %s (%.1fs old)", n, self.state_file, age)
            return n
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring flow snapshot %s: %s", self.state_file, e)
            return 0

    # -- live changes ---------------------------------------------------------------

    # settings that shape the TUN and routes: a change needs a restart
    RESTART_FIELDS = ("tun_name", "service_cidr", "masquerade_ip", "load_balancer_cidr",
                      "node_port_range", "metrics_bind_address", "healthz_bind_address",
                      "control_socket", "state_file", "dns")

    def reload(self):
        """Re-read the configuration files and apply them. A bad change is
        refused (ConfigError) and the running table stays as it was."""
        stamps = self._file_stamps()
        cfg = config_mod.load(self.base.path)      # parsed outside the lock: inspection goes on
        with self.lock:
            cfg.engine.control_socket = self.base.engine.control_socket     # may come from the command line
            cfg.engine.state_file = self.base.engine.state_file
            for f in self.RESTART_FIELDS:
                if getattr(cfg.engine, f) != getattr(self.base.engine, f):
                    raise ConfigError(self.base.path, f, "changes only on restart; reload refused")
            if cfg.engine.conntrack != self.base.engine.conntrack:
                self.fp.set_timeouts(timeouts_from(cfg.engine.conntrack))
            self.sync(config_mod.merge(cfg, self.overrides))
            self.base = cfg
            self._stamps = stamps

    def apply(self, text, name, delete=False):
        """engine apply/delete -f: objects in text replace (or remove) those
        with the same kind, namespace and name. Returns one line per object."""
        with self.lock:
            objs = config_mod.parse_text(text, name)
            changes = {}
            for o in objs.services + objs.pods + objs.slices:
                changes.setdefault(config_mod.object_key(o), []).append(o)
            overrides = dict(self.overrides)
            for key, group in changes.items():
                overrides[key] = None if delete else group
            # a Service applied again unchanged (kubectl apply -f of a whole
            # manifest) does not force a full sync
            endpoint_changes = {k: g for k, g in changes.items() if k[0] != "Service"}
            services_same = not objs.services or (not delete and all(self._unchanged(o) for o in objs.services))
            if services_same and self.smap is not None and self._sync_endpoints(endpoint_changes, delete):
                pass        # endpoints only: the incremental path took it
            else:
                self.sync(config_mod.merge(self.base, overrides))
            self.overrides = overrides
            verb = "deleted" if delete else "configured"
            return [f"{kind.lower()}/{n} {verb}" for kind, ns, n in changes] + \
                [f"note: {x}" for x in objs.notes]

    def _file_stamps(self):
        """What the watcher compares: each file's (mtime, size), and the
        listing of each manifests folder (a new file is a change)."""
        import os
        stamps = {}
        paths = list(self.base.files)
        for entry in self.base.engine.manifests:
            d = entry if os.path.isabs(entry) else os.path.join(os.path.dirname(self.base.path), entry)
            if os.path.isdir(d):
                stamps[d] = tuple(sorted(os.listdir(d)))
        for f in paths:
            try:
                st = os.stat(f)
                stamps[f] = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamps[f] = None
        return stamps

    def watch_once(self):
        """Reload if a watched file changed and has stayed the same since the
        last check (a file being written is not read half-way); returns True
        when it reloaded."""
        stamps = self._file_stamps()
        if stamps == self._stamps:
            self._pending = None
            return False
        if stamps != self._pending:
            self._pending = stamps          # changed: read it once it holds still
            return False
        self._pending = None
        self._stamps = stamps               # a refused change is not retried until the next one
        self.reload()
        return True

    def node_port_addresses(self, eng):
        """Node addresses on which node ports answer: every address of the
        node (but loopback and the TUN's), or those within nodePortAddresses."""
        if not self.tun:
            return []
        addrs = self.tun.node_addresses()
        if eng.node_port_addresses:
            nets = [ipaddress.IPv4Network(c) for c in eng.node_port_addresses]
            addrs = [a for a in addrs if any(ipaddress.IPv4Address(a) in n for n in nets)]
        return addrs

    def _steer(self, eng, smap, node_addrs):
        """Routes and rules that bring this table's traffic into the TUN."""
        if any(pi.node_port for info in smap.services.values() for pi in info.ports):
            self.tun.steer_node_ports(node_addrs, eng.node_port_range)
        routed = [ipaddress.IPv4Network(eng.service_cidr)]
        if eng.load_balancer_cidr:
            routed.append(ipaddress.IPv4Network(eng.load_balancer_cidr))
        extra = set()
        for info in smap.services.values():
            if info.svc.type == "ExternalName":
                continue
            for ip in ([info.ingress_ip] if info.ingress_ip else []) + list(info.svc.external_ips):
                if not any(ipaddress.IPv4Address(ip) in n for n in routed):
                    extra.add(f"{ip}/32")
        self.tun.set_routes(extra)

    def _unchanged(self, svc):
        import dataclasses
        info = self.smap.services.get(svc.key) if self.smap else None
        return info is not None and dataclasses.replace(info.svc, source=None) == dataclasses.replace(svc, source=None)

    def _sync_endpoints(self, changes, delete):
        """Pods and EndpointSlices changed, no Service: recompute the services
        whose endpoints can change and patch only their rows of the current
        tables (as kube-proxy's endpoints change tracker). Returns False when
        the change needs a full sync."""
        t0 = time.perf_counter()
        pods, slices = [], []
        for (kind, ns, name), group in changes.items():
            if kind == "Pod":
                pods.append(((ns, name), None if delete else group[0]))
            elif kind in ("EndpointSlice", "Endpoints"):
                svc_name = group[0].service_name
                slices.append(((kind, ns, name), ns, svc_name, None if delete else group))
            else:
                return False
        smap, affected = servicemap.update_endpoints(self.smap, pods, slices)
        tables = self.fp.current_tables
        if getattr(self, "_rows_of", (None,))[0] is not tables.names:
            rows = {}
            for i, n in enumerate(tables.names):
                rows.setdefault(n, []).append(i)
            self._rows_of = (tables.names, rows)     # row indexes by name, per generation's names
        rows = self._rows_of[1]
        patch = {}
        for key in affected:
            info = smap.services[key]
            for pi in info.ports:
                name = info.port_name(pi)
                if name in rows:
                    be = compiler.backend_rows(name, pi, self.state)
                    for i in rows[name]:
                        patch[i] = be
        try:
            self.fp.swap(tables.with_backends(patch))
        except ValueError as e:
            raise ConfigError(self.base.path or "config", "", str(e)) from None
        old = self.smap
        self.smap = smap
        if self.dns and (affected or pods):      # endpoint names and PTRs; pods verified, namespaces
            self.dns.update(smap)
        self._cleanup_stale_udp(old, smap, affected)
        self.sync_seconds = time.perf_counter() - t0
        self.last_sync_wall = time.time()
        self.syncs += 1
        return True

    def _cleanup_stale_udp(self, old, new, keys=None):
        """kube-proxy's stale-UDP cleanup: flows to an endpoint that no longer
        serves a UDP service port are removed so their clients move over.
        keys: only these services changed."""
        if old is None:
            return
        def serving(smap):
            out = set()
            for k, info in smap.services.items():
                if keys is not None and k not in keys:
                    continue
                for pi in info.ports:
                    if pi.port.protocol == "UDP":
                        out.update((e.ip, e.port) for e in pi.usable)
            return out
        for ip, port in serving(old) - serving(new):
            n = self.fp.delete_flows(17, int(ipaddress.IPv4Address(ip)), port)
            if n:
                log.info("removed %d stale UDP flows to %s:%d", n, ip, port)

    # -- views ----------------------------------------------------------------

    def metrics_text(self):
        c = self.fp.counters()
        lines = [
            "# HELP engine_packets_total Packets read from the TUN.",
            "# TYPE engine_packets_total counter",
            f"engine_packets_total {c['rx_packets']}",
            "# TYPE engine_bytes_total counter",
            f"engine_bytes_total {c['rx_bytes']}",
            "# TYPE engine_tx_packets_total counter",
            f"engine_tx_packets_total {c['tx_packets']}",
            "# HELP engine_drops_total Packets dropped, by reason.",
            "# TYPE engine_drops_total counter",
        ]
        lines += [f'engine_drops_total{{reason="{r}"}} {n}' for r, n in c["drops_by_reason"].items()]
        lines += [
            "# TYPE engine_rejects_total counter",
            f"engine_rejects_total {c['rejects']}",
            "# TYPE engine_conntrack_entries gauge",
            f"engine_conntrack_entries {c['flows']}",
            "# TYPE engine_flows_created_total counter",
            f"engine_flows_created_total {c['flows_created']}",
        ]
        per = self.fp.service_counters(sorted(self.state.services.ids.values()))
        names = {i: n for n, i in self.state.services.ids.items()}
        for metric, key, help_ in (("engine_service_packets_total", "packets", "Packets of a service port, both directions."),
                                   ("engine_service_bytes_total", "bytes", "Bytes of a service port, both directions."),
                                   ("engine_service_flows_total", "flows", "Flows opened to a service port."),
                                   ("engine_service_rejects_total", "rejects", "New flows refused: no ready endpoint."),
                                   ("engine_service_denied_total", "denied", "New flows dropped by loadBalancerSourceRanges.")):
            lines += [f"# HELP {metric} {help_}", f"# TYPE {metric} counter"]
            lines += [f'{metric}{{service="{names[i]}"}} {c[key]}' for i, c in sorted(per.items())]
        if self.dns:
            lines += ["# HELP engine_dns_requests_total Cluster DNS requests, by outcome.",
                      "# TYPE engine_dns_requests_total counter"]
            lines += [f'engine_dns_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self.dns.stats.items())]
            from .dnsmetrics import metrics_text      # CoreDNS's names: coredns_dns_*, coredns_cache_*
            lines += metrics_text(self.dns).rstrip("\n").split("\n")
        lines += [
            "# HELP kubeproxy_sync_proxy_rules_duration_seconds Last sync duration.",
            "# TYPE kubeproxy_sync_proxy_rules_duration_seconds gauge",
            f"kubeproxy_sync_proxy_rules_duration_seconds {self.sync_seconds:.6f}",
            "# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge",
            f"kubeproxy_sync_proxy_rules_last_timestamp_seconds {self.last_sync_wall or 0:.3f}",
        ]
        return "\n".join(lines) + "\n"
