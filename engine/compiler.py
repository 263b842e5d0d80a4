"""Service map -> flat fast-path tables (the Tables of engine._fastpath, or
of engine.refpath: the target is a parameter).

One row per (address, port, protocol) that opens flows, i.e. per service
*port* and address: the cluster IP of every service port, each node port
(address 0: any node address), the LoadBalancer ingress IP (with its source
ranges) and every external IP.

Compiler keeps, for one running engine, the stable ids and the rows of the
generation in the fast path, so that a partial change compiles only the
services it touches: endpoints alone patch backends in place
(Tables.with_backends), anything else re-lays the rows it has cached.
"""
from __future__ import annotations

from .model import PROTOCOLS, SCHEDULER_ANNOTATION, SCHEDULER_IDS, cidr, ip_int


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

    def release(self, keys):
        for k in keys:
            i = self.ids.pop(k, None)
            if i is not None:
                self.free.append(i)

    def retain(self, keys):
        """Release the ids of every key not in keys."""
        self.release([k for k in self.ids if k not in keys])
        self.used = set()


class CompileState:
    """What one running engine keeps between compiles."""

    def __init__(self, max_services=65536, max_backends=1 << 20):
        self.services = Ids(max_services)
        self.backends = Ids(max_backends)


def backend_rows(name, pi, state):
    """The backends of one service port as a table row takes them."""
    bid = state.backends.get
    return [(ip_int(e.ip), e.port, bid((name, e.ip, e.port))) for e in pi.usable]


def service_rows(info, engine_cfg, state=None):
    """The table rows of one service, as plain dicts. With a CompileState,
    rows carry stable service-port and backend ids."""
    s = info.svc
    if s.type == "ExternalName" or info.cluster_ip in (None, "None"):
        return []
    out = []
    sched = SCHEDULER_IDS[s.annotations.get(SCHEDULER_ANNOTATION, engine_cfg.scheduler)]
    for pi in info.ports:
        name = info.port_name(pi)
        if state:
            # one id per (service port, endpoint): lc counts flows per service port, as IPVS
            backends = backend_rows(name, pi, state)
        else:
            backends = [(ip_int(e.ip), e.port) for e in pi.usable]
        base = dict(name=name, port=pi.port.port, proto=PROTOCOLS[pi.port.protocol], backends=backends,
                    scheduler=sched)
        if state:
            base["id"] = state.services.get(name)
        if s.session_affinity == "ClientIP":
            base["affinity_timeout"] = s.affinity_timeout
        out.append(dict(base, vip=ip_int(info.cluster_ip)))
        if pi.node_port:
            out.append(dict(base, vip=0, port=pi.node_port))      # vip 0: any node address
        if info.ingress_ip:
            out.append(dict(base, vip=ip_int(info.ingress_ip),
                            source_ranges=[cidr(c) for c in s.load_balancer_source_ranges]))
        for ext in s.external_ips:
            if ext != info.ingress_ip:
                out.append(dict(base, vip=ip_int(ext)))
    return out


def rows(smap, engine_cfg, state=None):
    """Every table row of a service map."""
    return [r for info in smap.services.values() for r in service_rows(info, engine_cfg, state)]


def _target(fastpath):
    if fastpath is None:
        from . import _fastpath as fastpath
    return fastpath


def _tables(fastpath, rs, engine_cfg, node_addrs):
    drop = [cidr(engine_cfg.service_cidr)]
    if engine_cfg.load_balancer_cidr:
        drop.append(cidr(engine_cfg.load_balancer_cidr))
    return fastpath.Tables(rs, vips=sorted({r["vip"] for r in rs if r["vip"]}), drop_cidrs=drop,
                           node_addrs=[ip_int(a) for a in node_addrs])


def compile_tables(smap, engine_cfg, node_addrs=(), state=None, fastpath=None):
    """Build one generation of tables for fastpath (engine._fastpath by
    default, or engine.refpath)."""
    rs = rows(smap, engine_cfg, state)
    if state:
        state.services.retain(state.services.used)
        state.backends.retain(state.backends.used)
    return _tables(_target(fastpath), rs, engine_cfg, node_addrs)


class Compiler:
    """Compiles service maps for one running engine (see the module doc)."""

    def __init__(self, fastpath=None, state=None):
        self.fastpath = _target(fastpath)
        self.state = state or CompileState()
        self.rows = {}          # service key -> its rows, in table order
        self.bkeys = {}         # service key -> the backend id keys its rows hold
        self.index = {}         # service key -> row indexes in the tables last built
        self.engine_cfg = None
        self.node_addrs = ()

    def full(self, smap, engine_cfg, node_addrs=()):
        """Every service compiled anew."""
        self.rows = {k: service_rows(info, engine_cfg, self.state) for k, info in smap.services.items()}
        self.bkeys = {k: _backend_keys(smap.services[k]) for k, r in self.rows.items() if r}
        self.state.services.retain(self.state.services.used)
        self.state.backends.retain(self.state.backends.used)
        self.engine_cfg, self.node_addrs = engine_cfg, tuple(node_addrs)
        return self._lay_out()

    def _lay_out(self):
        rs, i = [], 0
        self.index = {}
        for k, group in self.rows.items():
            self.index[k] = list(range(i, i + len(group)))
            rs.extend(group)
            i += len(group)
        return _tables(self.fastpath, rs, self.engine_cfg, self.node_addrs)

    def partial(self, tables, smap, keys, removed=()):
        """tables (the generation in the fast path) with the services keys
        compiled anew and the services removed taken out. Endpoint changes
        patch backends; a change of rows (ports, type, addresses, scheduler,
        affinity, a service added or removed) re-lays the cached rows."""
        ids = self.state
        relay = False
        patch = {}
        for key in removed:
            old = self.rows.pop(key, None)
            if old is not None:
                self._release(key, old, [], set())
                relay = True
        for key in keys:
            info = smap.services[key]
            new = service_rows(info, self.engine_cfg, ids)
            old = self.rows.get(key)
            self.rows[key] = new
            self._release(key, old or [], new, _backend_keys(info) if new else set())
            if old is not None and len(old) == len(new) and all(_same_row(a, b) for a, b in zip(old, new)):
                for i, r in zip(self.index[key], new):
                    patch[i] = r["backends"]
            else:
                relay = True
        ids.services.used, ids.backends.used = set(), set()     # (full() asks for every key again)
        if relay:
            return self._lay_out()
        return tables.with_backends(patch) if patch else tables

    def _release(self, key, old, new, bkeys):
        """Give back the ids old's rows held that new's do not."""
        self.state.services.release({r["name"] for r in old} - {r["name"] for r in new})
        self.state.backends.release(self.bkeys.pop(key, set()) - bkeys)
        if bkeys:
            self.bkeys[key] = bkeys


def _backend_keys(info):
    return {(info.port_name(pi), e.ip, e.port) for pi in info.ports for e in pi.usable}


def _same_row(a, b):
    """Rows equal but for their backends: a patch in place will do."""
    return len(a) == len(b) and all(a[k] == b.get(k) for k in a if k != "backends")
