# Compiled service tables: what the control plane hands the fast path, built
# once per sync and swapped in whole (Dataplane.swap). Read-only once built, so
# a batch that holds a reference sees one consistent generation.
#
#   svcport_slots  (vip, port, proto) -> service-port row, open addressing
#   svcports       one row per service port: its backend slice and flags
#   backends     (addr, port) of every ready endpoint, grouped per service port
#   vip_slots    every live ClusterIP/external address: a packet to one of these
#                on a port that is not served is rejected, not dropped
#   ranges       source CIDRs of loadBalancerSourceRanges, per service port
#   drop_cidrs   serviceCIDR & co: an address in here that is not a VIP is dropped

MAGLEV_SIZE = MAGLEV_SLOTS


cdef inline uint32_t prefix_mask(int plen) noexcept:
    if plen <= 0:
        return 0
    if plen >= 32:
        return 0xffffffffU
    return <uint32_t>(0xffffffffU << (32 - plen))


cdef inline uint64_t svcport_peek_slot(const pkt_t *v, uint64_t svcport_mask) noexcept nogil:
    """For the batch stage: the home slot, in the service-port index, of what
    the packet is addressed to if it may open a flow; else NO_SLOT. A hint
    only: the packet path looks the service port up itself."""
    if not pkt_may_open(v):
        return NO_SLOT
    return mix64(svcport_key(v.key.daddr, v.key.dport, v.proto)) & svcport_mask


cdef class Tables:
    """One generation of compiled service tables (immutable once built)."""

    def __cinit__(self):
        self.svcport_slots = NULL
        self.svcports = NULL
        self.backends = NULL
        self.vip_slots = NULL
        self.ranges = NULL
        self.drop_cidrs = NULL
        self.node_addrs = NULL
        self.mh = NULL

    def __dealloc__(self):
        free(self.svcport_slots)
        free(self.svcports)
        free(self.backends)
        free(self.vip_slots)
        free(self.ranges)
        free(self.drop_cidrs)
        free(self.node_addrs)
        free(self.mh)

    def __init__(self, services, vips=(), drop_cidrs=(), node_addrs=()):
        """services: sequence of dicts (one per service port) with keys
             name, vip (int, host order; 0 for a node port), port, proto (6/17),
             backends [(addr int, port[, stable id])], source_ranges [(net int, prefixlen)],
             scheduler (int: SCHEDULER_IDS), id (stable service-port id; default: the row),
             affinity_timeout (seconds; 0 = no session affinity)
           vips: addresses (int) that are live service addresses
           drop_cidrs: [(net int, prefixlen)] where unallocated addresses are dropped
           node_addrs: addresses (int) on which node-port keys (vip 0) apply
        """
        cdef uint32_t i, j, b = 0, r, nb = 0, nr = 0, nmh = 0, m = 0
        cdef uint64_t size, h, key
        cdef svcport_t *sv
        services = list(services)
        for s in services:
            nb += len(s["backends"])
            nr += len(s.get("source_ranges") or ())
            if s.get("scheduler", 0) == SCHED_MH and s["backends"]:
                nmh += 1
        self.names = [s["name"] for s in services]
        self.nsvcports = len(services)
        self.max_id = 0
        self.max_bid = 0
        self.nranges = nr
        self.svcports = <svcport_t *>calloc(max(1, self.nsvcports), sizeof(svcport_t))
        self.ranges = <cidr_t *>calloc(max(1, nr), sizeof(cidr_t))
        size = 16
        while size < 2 * (<uint64_t>self.nsvcports) + 2:
            size <<= 1
        self.svcport_mask = size - 1
        self.svcport_slots = <svcport_slot_t *>malloc(size * sizeof(svcport_slot_t))
        if not self.svcports or not self.ranges or not self.svcport_slots:
            raise MemoryError()
        self.alloc_backends(nb, nmh)
        for h in range(size):
            self.svcport_slots[h].row = EMPTY
        r = 0
        for i, s in enumerate(services):
            sv = &self.svcports[i]
            sv.vip = htonl(s["vip"])
            sv.port = htons(s["port"])
            sv.proto = s["proto"]
            sv.scheduler = s.get("scheduler", 0)
            sv.flags = 0
            sv.id = s.get("id", i)
            if sv.id >= 0xffffffffU:
                raise ValueError(f"{s['name']}: service id out of range")
            self.max_id = max(self.max_id, <uint64_t>sv.id + 1)
            sv.affinity_timeout = s.get("affinity_timeout", 0)
            if sv.affinity_timeout:
                sv.flags |= SVCPORT_F_AFFINITY
            self.put_backends(i, s["backends"], &b, &m, None)
            sv.range_start = r
            for net, plen in s.get("source_ranges") or ():
                self.ranges[r].mask = prefix_mask(plen)
                self.ranges[r].net = net & self.ranges[r].mask
                r += 1
            sv.range_count = r - sv.range_start
            if sv.range_count:
                sv.flags |= SVCPORT_F_SOURCE_RANGES
            key = svcport_key(sv.vip, sv.port, sv.proto)
            h = mix64(key) & self.svcport_mask
            while self.svcport_slots[h].row != EMPTY:
                if self.svcport_slots[h].key == key:
                    raise ValueError(f"duplicate service key {s['name']}")
                h = (h + 1) & self.svcport_mask
            self.svcport_slots[h].key = key
            self.svcport_slots[h].row = i
        self.nbackends = b
        self.vip_slots = _addr_set([htonl(a) for a in vips], &self.vip_mask)
        self.ndrop = len(drop_cidrs)
        self.drop_cidrs = <cidr_t *>calloc(max(1, self.ndrop), sizeof(cidr_t))
        self.nnode = len(node_addrs)
        self.node_addrs = <uint32_t *>calloc(max(1, self.nnode), sizeof(uint32_t))
        if not self.drop_cidrs or not self.node_addrs:
            raise MemoryError()
        for j, (net, plen) in enumerate(drop_cidrs):
            self.drop_cidrs[j].mask = prefix_mask(plen)
            self.drop_cidrs[j].net = net & self.drop_cidrs[j].mask
        for j, a in enumerate(node_addrs):
            self.node_addrs[j] = htonl(a)

    cdef int alloc_backends(self, uint32_t nb, uint32_t nmh) except -1:
        self.backends = <backend_t *>calloc(max(1, nb), sizeof(backend_t))
        self.mh = <uint16_t *>malloc(<size_t>max(1, nmh) * MAGLEV_SLOTS * sizeof(uint16_t))
        self.nmh = nmh
        if not self.backends or not self.mh:
            raise MemoryError()
        return 0

    cdef int put_backends(self, uint32_t row, rows, uint32_t *b, uint32_t *m, Tables old) except -1:
        """The one fill of a row's backends and Maglev ring: rows
        [(addr, port[, id])] at backends[*b:], its ring at ring *m; with old,
        the row's backends and ring as they are in old instead (rows unused)."""
        cdef svcport_t *sv = &self.svcports[row]
        cdef svcport_t *osv
        cdef backend_t *be
        if old is not None:
            osv = &old.svcports[row]
            memcpy(self.backends + b[0], old.backends + osv.backend_start, osv.backend_count * sizeof(backend_t))
            sv.backend_start = b[0]
            b[0] += osv.backend_count
        else:
            if sv.scheduler == SCHED_MH and len(rows) > MAGLEV_MAX_BACKENDS:
                raise ValueError(f"{self.names[row]}: Maglev takes at most {MAGLEV_MAX_BACKENDS} backends")
            sv.backend_start = b[0]
            sv.rr = 0
            for r in rows:
                be = &self.backends[b[0]]
                be.addr = htonl(r[0])
                be.port = htons(r[1])
                be.id = r[2] if len(r) > 2 else b[0]
                if be.id >= 0xffffffffU:
                    raise ValueError(f"{self.names[row]}: backend id out of range")
                self.max_bid = max(self.max_bid, <uint64_t>be.id + 1)
                b[0] += 1
        sv.backend_count = b[0] - sv.backend_start
        sv.mh_start = sv.mh_size = 0
        if sv.scheduler == SCHED_MH and sv.backend_count:
            sv.mh_start = m[0] * MAGLEV_SLOTS
            sv.mh_size = MAGLEV_SLOTS
            if old is not None:
                memcpy(self.mh + sv.mh_start, old.mh + osv.mh_start, MAGLEV_SLOTS * sizeof(uint16_t))
            else:
                maglev_fill(self.mh + sv.mh_start, MAGLEV_SLOTS, self.backends + sv.backend_start,
                            sv.backend_count)
            m[0] += 1
        return 0

    @property
    def size(self):
        return self.nsvcports

    def with_backends(self, dict changes):
        """A new generation equal to this one but for the backends of the rows
        in changes ({row index: [(addr, port, id)]}): an endpoint change costs
        a copy of flat arrays, not a compile of every service port."""
        cdef Tables t = Tables.__new__(Tables)
        cdef uint32_t i, b = 0, nb = 0, m = 0, nmh = 0, count
        cdef uint64_t slots = self.svcport_mask + 1, vslots = self.vip_mask + 1
        for i in changes:
            if not 0 <= i < self.nsvcports:
                raise ValueError(f"no row {i}")
        for i in range(self.nsvcports):
            rows = changes.get(i)
            count = len(rows) if rows is not None else self.svcports[i].backend_count
            nb += count
            if self.svcports[i].scheduler == SCHED_MH and count:
                nmh += 1
        t.names = self.names
        t.nsvcports, t.svcport_mask, t.vip_mask = self.nsvcports, self.svcport_mask, self.vip_mask
        t.nranges, t.ndrop, t.nnode = self.nranges, self.ndrop, self.nnode
        t.max_id, t.max_bid = self.max_id, self.max_bid
        t.svcport_slots = <svcport_slot_t *>malloc(slots * sizeof(svcport_slot_t))
        t.svcports = <svcport_t *>malloc(max(1, self.nsvcports) * sizeof(svcport_t))
        t.vip_slots = <uint32_t *>malloc(vslots * sizeof(uint32_t))
        t.ranges = <cidr_t *>malloc(max(1, self.nranges) * sizeof(cidr_t))
        t.drop_cidrs = <cidr_t *>malloc(max(1, self.ndrop) * sizeof(cidr_t))
        t.node_addrs = <uint32_t *>malloc(max(1, self.nnode) * sizeof(uint32_t))
        if not (t.svcport_slots and t.svcports and t.vip_slots and t.ranges
                and t.drop_cidrs and t.node_addrs):
            raise MemoryError()
        t.alloc_backends(nb, nmh)
        memcpy(t.svcport_slots, self.svcport_slots, slots * sizeof(svcport_slot_t))
        memcpy(t.svcports, self.svcports, max(1, self.nsvcports) * sizeof(svcport_t))
        memcpy(t.vip_slots, self.vip_slots, vslots * sizeof(uint32_t))
        memcpy(t.ranges, self.ranges, max(1, self.nranges) * sizeof(cidr_t))
        memcpy(t.drop_cidrs, self.drop_cidrs, max(1, self.ndrop) * sizeof(cidr_t))
        memcpy(t.node_addrs, self.node_addrs, max(1, self.nnode) * sizeof(uint32_t))
        for i in range(self.nsvcports):
            rows = changes.get(i)
            t.put_backends(i, rows, &b, &m, self if rows is None else None)
        t.nbackends = b
        return t

    cdef inline svcport_t *lookup(self, uint32_t addr, uint16_t port, uint8_t proto) noexcept nogil:
        cdef uint64_t key = svcport_key(addr, port, proto)
        cdef uint64_t h = mix64(key) & self.svcport_mask
        while self.svcport_slots[h].row != EMPTY:
            if self.svcport_slots[h].key == key:
                return &self.svcports[self.svcport_slots[h].row]
            h = (h + 1) & self.svcport_mask
        return NULL

    cdef inline bint is_vip(self, uint32_t addr) noexcept nogil:
        cdef uint64_t h = mix64(addr) & self.vip_mask
        while self.vip_slots[h] != 0:
            if self.vip_slots[h] == addr:
                return True
            h = (h + 1) & self.vip_mask
        return False

    cdef inline bint is_node_addr(self, uint32_t addr) noexcept nogil:
        cdef uint32_t i
        for i in range(self.nnode):
            if self.node_addrs[i] == addr:
                return True
        return False

    cdef inline bint in_drop_cidrs(self, uint32_t addr) noexcept nogil:
        cdef uint32_t i, a = ntohl(addr)
        for i in range(self.ndrop):
            if (a & self.drop_cidrs[i].mask) == self.drop_cidrs[i].net:
                return True
        return False

    cdef inline bint source_allowed(self, const svcport_t *sv, uint32_t addr) noexcept nogil:
        cdef uint32_t i, a = ntohl(addr)
        for i in range(sv.range_start, sv.range_start + sv.range_count):
            if (a & self.ranges[i].mask) == self.ranges[i].net:
                return True
        return False


cdef uint32_t *_addr_set(list addrs, uint64_t *mask) except NULL:
    """Open-addressing set of raw addresses; 0 marks an empty slot."""
    cdef uint64_t size = 16, h
    cdef uint32_t a
    while size < 2 * len(addrs) + 2:
        size <<= 1
    cdef uint32_t *slots = <uint32_t *>calloc(size, sizeof(uint32_t))
    if not slots:
        raise MemoryError()
    for x in addrs:
        a = x
        if a == 0:
            continue
        h = mix64(a) & (size - 1)
        while slots[h] != 0 and slots[h] != a:
            h = (h + 1) & (size - 1)
        slots[h] = a
    mask[0] = size - 1
    return slots
