"""The running engine on one node, as kube-proxy's Proxier: sources feed one
change tracker, one sync applies the changes partially or fully, the fast
path gets one atomic swap.

  sources (files, SIGHUP, engine apply/delete, API watch)
     -> changes.ChangeTracker (per object: previous, current)
     -> servicemap.update (partial) | servicemap.build (full)
     -> compiler.Compiler.partial | .full -> Dataplane.swap
     -> housekeeping (host routes, cluster DNS zone, stale UDP flows, metrics)

Host plumbing goes through engine.host (LinuxHost, or FakeHost in tests); the
fast path is engine._fastpath or engine.refpath.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import threading
import time

from . import config as config_mod
from . import servicemap, snapshot
from .changes import DELETED, ENDPOINT_KINDS, ChangeTracker, Sources
from .compiler import Compiler
from .config import ConfigError
from .host import LinuxHost
from .model import PROTOCOLS, ip_int

log = logging.getLogger("engine.proxier")


def timeouts_from(ct):
    return {"ESTABLISHED": ct.tcp_established_timeout, "CLOSE_WAIT": ct.tcp_close_wait_timeout,
            "UNREPLIED": ct.udp_timeout, "ASSURED": ct.udp_stream_timeout}


class NotFound(ValueError):
    """engine delete of an object the engine does not have."""


class Engine:
    """cfg: the configuration as loaded (settings and the files' objects).
    host: engine.host.Host (LinuxHost of cfg's TUN by default). fastpath:
    the module whose Dataplane and Tables run the packets (engine._fastpath
    by default, engine.refpath for the reference). serve_dns: run the
    cluster DNS server when dns.clusterIP is set."""

    # more changes than this share of the services (and than FULL_SYNC_MIN):
    # a full sync is cheaper
    FULL_SYNC_SHARE = 0.5
    FULL_SYNC_MIN = 100

    def __init__(self, cfg, host=None, fastpath=None, serve_dns=True, file_cache=None):
        if fastpath is None:
            from . import _fastpath as fastpath
        self.fastpath = fastpath
        self.cfg = cfg
        eng = cfg.engine
        self.fp = fastpath.Dataplane(ip_int(eng.masquerade_ip), max_flows=eng.conntrack.max,
                                     seed=int.from_bytes(os.urandom(4), "little") or 1,
                                     timeouts=timeouts_from(eng.conntrack))
        self.host = host if host is not None else LinuxHost(eng.tun_name)
        self.serve_dns = serve_dns
        self.file_cache = file_cache if file_cache is not None else config_mod.FileCache()
        self.compiler = Compiler(fastpath)
        from .metrics import Metrics
        self.metrics = Metrics(self)
        self.state = self.compiler.state        # stable ids (flow snapshots, stats)
        self.tracker = ChangeTracker()
        self.sources = Sources(self.tracker)
        self.sources.replace("files", config_mod.objects_by_key(cfg))
        self.objects = {}               # {(kind, ns, name): objects} the tables were built from
        self.smap = None
        self.node_addrs = None
        self.api = None                 # the API source when following an API server (engine.kube)
        self.api_node_addresses = None  # this node's addresses from its Node object
        self._full_needed = True        # first sync, new settings, a failed partial
        self._routes = {}               # service key -> extra /32 routes it needs
        self._node_port_services = set()
        self.dns = None
        self._dns_smap = None
        self._dns_wake = threading.Event()
        self.state_file = eng.state_file or f"/run/engine/{eng.tun_name}.flows"
        self.lock = threading.RLock()   # one sync at a time
        self._last_snapshot = time.monotonic()
        self.programmed = False
        self.last_sync_wall = None
        self.sync_seconds = 0.0
        self.last_sync_kind = None      # "full" | "partial"
        self.syncs = 0
        self._stop = threading.Event()
        self._sync_thread = None
        self._sync_wake = threading.Event()
        self.synced_event = threading.Event()  # set after each sync of the sync thread (tests wait on it)
        self.api_refused = 0
        self._workers = []
        self.queues = max(1, min(2, os.cpu_count() or 1))   # one nogil worker per core

    @property
    def base(self):
        """The configuration as loaded from the files."""
        return self.cfg

    # -- setup and teardown ---------------------------------------------------

    def start(self):
        eng = self.cfg.engine
        host = self.host
        try:
            host.open(self.queues)
            if self.queues > 1 and host.filenos():
                self._steer_queues(eng)
            host.enable_forwarding()
            if eng.dns.cluster_ip and self.serve_dns:
                # the DNS VIP is an address of the node (on the TUN), as IPVS
                # mode binds its VIPs: queries are delivered locally with the
                # client's own source address, so the server can tell cluster
                # clients from others and rate-limit per client
                host.add_address(eng.dns.cluster_ip)
                from .dns import DNSServer
                self.dns = DNSServer(eng.dns, eng.dns.cluster_ip, eng.dns.port).start()
                threading.Thread(target=self._dns_zone_loop, name="dns-zone", daemon=True).start()
            self.sync(full=True)            # program before traffic is steered in
            self.restore_flows()
            host.add_route(eng.service_cidr)
            host.add_route(f"{eng.masquerade_ip}/32")
            if eng.load_balancer_cidr:
                host.add_route(eng.load_balancer_cidr)
        except Exception:
            if self.dns:
                self.dns.close()
            host.close()
            raise
        for q, fd in enumerate(host.filenos()):
            io = self.fastpath.IOWorker(self.fp, vnet=host.vnet)
            th = threading.Thread(target=self._run, args=(io, fd), name=f"fastpath-{q}", daemon=True)
            th.start()
            self._workers.append(th)
        self.programmed = True
        log.info("dataplane up on %s: %d queues, %d service rows", eng.tun_name, len(self._workers),
                 self.fp.current_tables.size)

    def _steer_queues(self, eng):
        try:
            self.host.attach_flow_steering(eng.masquerade_ip)
        except OSError as e:
            log.warning("no queue steering (%s): the two directions of a flow may take different queues", e)
            return
        self.fp.tun_queues = self.queues
        log.info("queue steering: eBPF, both directions of a flow on one of %d queues", self.queues)

    def _run(self, io, fd):
        run = io.run
        stop = self._stop.is_set
        while not stop():
            run(fd, 200)

    def stop(self):
        self._stop.set()
        self._dns_wake.set()
        self._sync_wake.set()
        for th in self._workers:
            th.join(timeout=2)
        if self._workers:
            self.save_flows()
        if self.dns:
            self.dns.close()
        self.host.close()
        self.programmed = False

    # -- sync -----------------------------------------------------------------

    def sync(self, cfg=None, full=False, noticed=None):
        """Apply what the tracker holds (and, with cfg, the files' objects of
        cfg anew: only those that differ are changes; noticed: when the
        files were seen to change, time.monotonic()) in one swap. Raises
        ConfigError, and changes nothing, when the change is bad."""
        with self.lock:
            if cfg is None:
                return self._sync(full)
            snap = self.sources.snapshot()
            self.sources.replace("files", config_mod.objects_by_key(cfg), noticed)
            try:
                return self._sync(full)
            except Exception:
                self._undo(snap)
                raise

    def _undo(self, snap):
        """A refused change: sources back as they were, and nothing pending
        but what still differs from the tables."""
        self.sources.restore(snap)
        self.tracker.take()
        now = self.sources.all()
        for key in set(now) | set(self.objects):
            if now.get(key) != self.objects.get(key):
                self.tracker.update(key[0], key[1:], self.objects.get(key), now.get(key))

    def _sync(self, full=False):
        t0 = time.perf_counter()
        changes = self.tracker.take()
        eng = self.cfg.engine
        node_addrs = self.node_port_addresses(eng)
        full = full or self._full_needed or node_addrs != self.node_addrs or \
            len(changes) > max(self.FULL_SYNC_MIN, self.FULL_SYNC_SHARE * len(self.smap.services))
        if not changes and not full:
            return self.smap
        objects = dict(self.objects)
        for k, c in changes.items():
            if c.current is None:
                objects.pop(k, None)
            else:
                objects[k] = c.current
        try:
            if not full:
                try:
                    smap, keys, removed = self._partial(changes)
                except servicemap.NeedFull:
                    full = True
            if full:
                smap = self._full(objects, node_addrs)
                keys = removed = None
        except Exception:
            self.tracker.put_back(changes)
            self._full_needed = True            # the compiler's cache may be half-changed
            raise
        swapped = time.monotonic()
        old = self.smap
        self.objects, self.smap, self.node_addrs = objects, smap, node_addrs
        self._full_needed = False
        self._housekeeping(old, smap, keys, removed)
        self.sync_seconds = time.perf_counter() - t0
        self.last_sync_kind = "full" if full else "partial"
        self.last_sync_wall = time.time()
        self.syncs += 1
        n_svc = sum(1 for k in changes if k[0] == "Service")
        self.metrics.synced(self.last_sync_kind, self.sync_seconds, self.last_sync_wall,
                            [swapped - c.since for c in changes.values()], n_svc, len(changes) - n_svc)
        for w in smap.warnings if full else (f"{smap.services[k].svc.source}: {w}"
                                             for k in keys for w in smap.services[k].warnings):
            log.warning("%s", w)
        return smap

    def _full(self, objects, node_addrs):
        cfg = config_mod.from_objects(self.cfg, objects)
        smap = servicemap.build(cfg, self.smap.allocations() if self.smap else None)
        try:
            tables = self.compiler.full(smap, cfg.engine, node_addrs)
        except ValueError as e:        # e.g. two services claiming one external IP:port
            raise ConfigError(self.cfg.path or "config", "", str(e)) from None
        self.fp.swap(tables)
        return smap

    def _partial(self, changes):
        services, pods, slices = [], [], []
        for (kind, ns, name), c in changes.items():
            if kind == "Service":
                services.append((f"{ns}/{name}", c.current[0] if c.current else None))
            elif kind == "Pod":
                pods.append(((ns, name), c.current[0] if c.current else None))
            elif kind in ENDPOINT_KINDS:
                owner = (c.current or c.previous)[0].service_name
                if c.previous and c.previous[0].service_name != owner:      # moved: leaves the old one too
                    slices.append(((kind, ns, name), ns, c.previous[0].service_name, None))
                slices.append(((kind, ns, name), ns, owner, list(c.current) if c.current else None))
        smap, keys, removed = servicemap.update(self.smap, self.cfg.engine, services, pods, slices)
        try:
            tables = self.compiler.partial(self.fp.current_tables, smap, keys, removed)
        except ValueError as e:
            raise ConfigError(self.cfg.path or "config", "", str(e)) from None
        self.fp.swap(tables)
        return smap, keys, removed

    def _housekeeping(self, old, smap, keys, removed):
        """After the swap: host routes, the DNS zone, stale UDP flows."""
        changed = None if keys is None else keys | removed
        self._route(self.cfg.engine, smap, changed)
        # every service's endpoints have names and PTRs, and pods matter to
        # `pods verified` and to which namespaces exist: any change of them too
        if self.dns is not None and (changed is None or removed or keys or old.pods is not smap.pods):
            self._dns_smap = smap               # the zone is rebuilt off the sync path (coalesced)
            self._dns_wake.set()
        self._cleanup_stale_udp(old, smap, changed)

    def _dns_zone_loop(self):
        while not self._stop.is_set():
            self._dns_wake.wait()
            self._dns_wake.clear()
            smap, self._dns_smap = self._dns_smap, None
            if smap is not None and self.dns is not None:
                try:       # in key order, as a full build gives it
                    self.dns.update(dataclasses.replace(smap, services=dict(sorted(smap.services.items()))))
                except Exception:       # the zone stays as it was; the next change tries again
                    log.exception("cluster DNS zone update failed")

    # -- restart without loss ---------------------------------------------------------

    def save_flows(self, quiet=False):
        """Write the flow table for the next start (on SIGTERM/SIGINT, and
        every conntrack.snapshotInterval while running)."""
        eb = self.fastpath.ENTRY_BYTES
        with self.lock:         # ids as the flows name them: no sync in between
            data = self.fp.export_flows()
            header = {"version": snapshot.VERSION, "time": time.time(), "masq": self.cfg.engine.masquerade_ip,
                      "entry_bytes": eb,
                      "services": {i: n for n, i in self.state.services.ids.items()},
                      "backends": {i: list(k) for k, i in self.state.backends.ids.items()}}
        try:
            snapshot.write(self.state_file, header, data)
            (log.debug if quiet else log.info)("saved %d flows to %s", len(data) // eb, self.state_file)
        except OSError as e:
            log.warning("cannot save flows to %s: %s", self.state_file, e)

    def snapshot_if_due(self):
        """The periodic snapshot: what a crash (SIGKILL) leaves for the next
        start. Returns True when one was written."""
        every = self.cfg.engine.conntrack.snapshot_interval
        now = time.monotonic()
        if not every or not self.programmed or now - self._last_snapshot < every:
            return False
        self._last_snapshot = now
        self.save_flows(quiet=True)
        return True

    def restore_flows(self):
        """Take over the flows a previous engine saved whose service port and
        backend the new table still has. The file stays until a new snapshot
        replaces it: a crash soon after this start still finds it."""
        path, eb = self.state_file, self.fastpath.ENTRY_BYTES
        snapshot.remove_stale_tmp(path)
        ct = self.cfg.engine.conntrack
        try:
            got = snapshot.read(path, max_bytes=(ct.max + 1) * eb + (64 << 20))
            if got is None:
                return 0
            h, data = got
            age = time.time() - float(h["time"])
            if h.get("entry_bytes") != eb:
                raise ValueError("snapshot of another format")
            if h.get("masq") != self.cfg.engine.masquerade_ip:
                raise ValueError("snapshot of another masquerade address")
            if not 0 <= age < snapshot.MAX_AGE:
                raise ValueError(f"snapshot is {age:.0f}s old")
            sids, bids = self.state.services.ids, self.state.backends.ids
            services = {int(old): name for old, name in h["services"].items() if name in sids}
            backends = {int(old): tuple(k) for old, k in h["backends"].items() if tuple(k) in bids}
            data, _, left = snapshot.keep(data, eb, services, backends, snapshot.state_timeouts(timeouts_from(ct)))
            n = self.fp.import_flows(data, svc_ids={o: sids[n] for o, n in services.items()},
                                     backend_ids={o: bids[k] for o, k in backends.items()}, elapsed=int(age))
            log.info("took over %d flows from %s (%.1fs old; %d left behind: service or backend gone, "
                     "or half-open)", n, path, age, left)
            return n
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring flow snapshot %s: %s", path, e)
            return 0

    # -- live changes ---------------------------------------------------------------

    # settings that shape the TUN and routes: a change needs a restart
    RESTART_FIELDS = ("tun_name", "service_cidr", "masquerade_ip", "load_balancer_cidr",
                      "node_port_range", "metrics_bind_address", "healthz_bind_address",
                      "control_socket", "state_file", "dns")

    def reload(self, cfg=None, noticed=None, paths=None):
        """Re-read the configuration files (or take cfg) and apply them
        (noticed: when the change was seen, time.monotonic(); paths: only
        these manifest files changed). A bad change is refused (ConfigError)
        and the running table stays as it was."""
        if cfg is None and paths is not None and self.cfg.path not in paths:
            return self._reload_files(paths, noticed)
        if cfg is None:     # parsed outside the lock (inspection goes on); unchanged files are not read
            cfg = config_mod.load(self.cfg.path, cache=self.file_cache)
        with self.lock:
            cfg.engine.control_socket = self.cfg.engine.control_socket     # may come from the command line
            cfg.engine.state_file = self.cfg.engine.state_file
            for f in self.RESTART_FIELDS:
                if getattr(cfg.engine, f) != getattr(self.cfg.engine, f):
                    raise ConfigError(self.cfg.path, f, "changes only on restart; reload refused")
            old = self.cfg
            settings_changed = cfg.engine != old.engine
            self.cfg = cfg
            try:
                self.sync(cfg, full=settings_changed, noticed=noticed)
            except Exception:
                self.cfg = old
                raise
            if cfg.engine.conntrack != old.engine.conntrack:
                self.fp.set_timeouts(timeouts_from(cfg.engine.conntrack))

    def _reload_files(self, paths, noticed):
        """Some manifest files changed (not the main configuration): read
        those alone and hand over the objects that differ; cost grows with
        the files changed, not with every file watched."""
        cache = self.file_cache
        cache.read = []
        saved = {p: cache.entries.get(p) for p in paths}
        try:
            changes, had = {}, set()
            for p in paths:
                old = config_mod.objects_by_key(saved[p][1]) if saved[p] else {}
                had.update(old)
                new = {}
                if os.path.isfile(p):
                    frag, inner = cache.get(p)
                    if inner:
                        raise ConfigError(p, "", "EngineConfiguration belongs in the main configuration file")
                    new = config_mod.objects_by_key(frag)
                else:
                    cache.entries.pop(p, None)
                for k in old:
                    changes.setdefault(k, None)
                changes.update(new)
            with self.lock:
                files = self.sources.layers["files"]
                for (kind, ns, name), v in changes.items():
                    if v is not None and (kind, ns, name) in files and (kind, ns, name) not in had:
                        raise ConfigError(v[0].source, "metadata.name",
                                          f"duplicate {kind} {ns}/{name} (also in another file)")
                snap = self.sources.snapshot()
                for k, v in changes.items():
                    self.sources.set("files", k, v, noticed)
                try:
                    self._sync()
                except Exception:
                    self._undo(snap)
                    raise
                listed = set(self.cfg.files)
                self.cfg.files = [f for f in self.cfg.files if f == self.cfg.path or os.path.isfile(f)] + \
                    sorted(p for p in paths if p not in listed and os.path.isfile(p))
        except Exception:
            for p, e in saved.items():      # refused: the cache forgets what it read
                if e is None:
                    cache.entries.pop(p, None)
                else:
                    cache.entries[p] = e
            raise

    def apply(self, text, name, delete=False):
        """engine apply/delete -f: objects in text replace (or remove) those
        with the same kind, namespace and name. Returns one line per object."""
        objs = config_mod.parse_text(text, name)
        changes = config_mod.objects_by_key(objs)
        with self.lock:
            missing = [k for k in changes if delete and self.sources.effective(k) is None]
            snap = self.sources.snapshot()
            for key, group in changes.items():
                if key not in missing:
                    self.sources.set("apply", key, DELETED if delete else group)
            try:
                self._sync()
            except Exception:
                self._undo(snap)
                raise
        verb = "deleted" if delete else "configured"
        lines = [f"{kind.lower()}/{n} {verb}" for kind, ns, n in (k for k in changes if k not in missing)] + \
            [f"note: {x}" for x in objs.notes]
        if missing:             # as kubectl: the others are deleted, the command fails
            raise NotFound("\n".join(lines + [f'Error from server (NotFound): {kind.lower()}s "{n}" not found'
                                               for kind, ns, n in missing]))
        return lines

    def update(self, kind, key, new, source="api"):
        """One object event from a source that holds its own objects (the
        API watch): key = (namespace, name), new = the object (a list for
        Endpoints) or None when it is gone. The change is pending until
        the next sync()."""
        with self.lock:
            self.sources.set(source, (kind,) + tuple(key), new)

    def on_api_event(self, kind, key, old, new):
        """An API watch's event, as engine.kube's reflectors call it: kind,
        key "namespace/name", the objects as dicts (None: absent). The
        object is validated and handed to the tracker; a sync follows on the
        sync thread, which takes every event pending by then in one sync. A
        bad object is refused with a warning (and counted), the rest goes on."""
        if kind not in ("Service", "EndpointSlice", "Endpoints", "Pod"):
            return False
        ns, _, name = key.rpartition("/")
        try:
            objs = config_mod.parse_object(new, f"api:{kind}/{key}") if new is not None else None
        except ConfigError as e:
            self.api_refused += 1
            log.warning("refused from the API: %s", e)
            return False
        self.update(kind, (ns or "default", name), objs or None)
        self.request_sync()
        return True

    def request_sync(self):
        """Sync soon, on the sync thread (started on first use): changes
        arriving meanwhile are taken together."""
        with self.lock:
            if self._sync_thread is None:
                self._sync_thread = threading.Thread(target=self._sync_loop, name="sync", daemon=True)
                self._sync_thread.start()
        self._sync_wake.set()

    def _sync_loop(self):
        while not self._stop.is_set():
            self._sync_wake.wait()
            self._sync_wake.clear()
            if self._stop.is_set():
                return
            try:
                self.sync()
            except ConfigError as e:
                log.error("sync refused, running table unchanged: %s", e)
            except Exception:
                log.exception("sync failed")
            finally:
                self.synced_event.set()

    def _file_stamps(self):
        """What the watcher compares: each file's (mtime, size), and the
        listing of each manifests folder (a new file is a change)."""
        stamps = {}
        for entry in self.cfg.engine.manifests:
            d = entry if os.path.isabs(entry) else os.path.join(os.path.dirname(self.cfg.path), entry)
            if os.path.isdir(d):
                stamps[d] = tuple(sorted(os.listdir(d)))
        for f in self.cfg.files:
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
        if not hasattr(self, "_stamps"):
            self._stamps, self._pending = self._file_stamps(), None
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

    def watched(self):
        """(files, manifest folders) of the configuration in force."""
        folders = []
        for entry in self.cfg.engine.manifests:
            d = entry if os.path.isabs(entry) else os.path.join(os.path.dirname(self.cfg.path), entry)
            if os.path.isdir(d):
                folders.append(d)
        return list(self.cfg.files), folders

    def node_port_addresses(self, eng):
        """Node addresses on which node ports answer: every address of the
        node (but loopback and the TUN's), or those within nodePortAddresses."""
        # following an API server, the Node object says which addresses are the node's
        addrs = self.api_node_addresses or self.host.node_addresses()
        if eng.node_port_addresses:
            nets = [ipaddress.IPv4Network(c) for c in eng.node_port_addresses]
            addrs = [a for a in addrs if any(ipaddress.IPv4Address(a) in n for n in nets)]
        return addrs

    def set_api_node_addresses(self, addrs):
        """This node's addresses from its Node (None: back to the host's);
        the next sync applies them."""
        self.api_node_addresses = list(addrs) if addrs else None

    def _route(self, eng, smap, keys=None):
        """Routes and rules that bring this table's traffic into the TUN.
        keys: only these services changed."""
        routed = [ipaddress.IPv4Network(eng.service_cidr)]
        if eng.load_balancer_cidr:
            routed.append(ipaddress.IPv4Network(eng.load_balancer_cidr))
        full = keys is None
        if full:
            self._routes, self._node_port_services = {}, set()
            keys = smap.services.keys()
        before = (set().union(*self._routes.values()), bool(self._node_port_services))
        for k in keys:
            info = smap.services.get(k)
            self._routes.pop(k, None)
            self._node_port_services.discard(k)
            if info is None or info.svc.type == "ExternalName":
                continue
            if any(pi.node_port for pi in info.ports):
                self._node_port_services.add(k)
            extra = {f"{ip}/32" for ip in ([info.ingress_ip] if info.ingress_ip else []) + list(info.svc.external_ips)
                     if not any(ipaddress.IPv4Address(ip) in n for n in routed)}
            if extra:
                self._routes[k] = extra
        after = (set().union(*self._routes.values()), bool(self._node_port_services))
        if after[1] and (full or not before[1]):
            self.host.route_node_ports(self.node_addrs, eng.node_port_range)
        if full or after[0] != before[0]:
            self.host.set_routes(after[0])

    def _cleanup_stale_udp(self, old, new, keys=None):
        """kube-proxy's stale-UDP cleanup: flows to an endpoint that no longer
        serves a UDP service port are removed so their clients move over.
        keys: only these services changed."""
        if old is None:
            return
        def serving(smap):
            out = set()
            for k in (smap.services if keys is None else keys):
                info = smap.services.get(k)
                for pi in info.ports if info else ():
                    if pi.port.protocol == "UDP":
                        out.update((e.ip, e.port) for e in pi.usable)
            return out
        for ip, port in serving(old) - serving(new):
            n = self.fp.delete_flows(PROTOCOLS["UDP"], ip_int(ip), port)
            if n:
                log.info("removed %d stale UDP flows to %s:%d", n, ip, port)

    # -- views ----------------------------------------------------------------

    def metrics_text(self):
        return self.metrics.text()
