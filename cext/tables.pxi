# Compiled service tables: what the control plane hands the fast path, built
# once per sync and swapped in whole (Dataplane.swap). Read-only once built, so
# a batch that holds a reference sees one consistent generation.
#
#   svc_slots    (vip, port, proto) -> service-port index, open addressing
#   svcs         one row per service port: its backend slice and flags
#   backends     (addr, port) of every ready endpoint, grouped per service port
#   vip_slots    every live ClusterIP/external address: a packet to one of these
#                on a port that is not served is rejected, not dropped
#   ranges       source CIDRs of loadBalancerSourceRanges, per service port
#   drop_cidrs   serviceCIDR & co: an address in here that is not a VIP is dropped

cdef enum:
    SVC_F_SOURCE_RANGES = 1     # only sources within ranges[] may open flows
    SVC_F_NODEPORT = 2          # key addr is 0: any node address
    SVC_F_AFFINITY = 4          # sessionAffinity: ClientIP

# Schedulers (IPVS names); Python's compiler.SCHEDULER_IDS must agree.
cdef enum:
    SCHED_RANDOM = 0            # kube-proxy iptables/nftables mode
    SCHED_RR = 1                # round robin
    SCHED_LC = 2                # fewest active flows
    SCHED_SH = 3                # source (client address) hash
    SCHED_MH = 4                # Maglev hashing on client address and port

MAGLEV_SIZE = 65537             # prime; > 100 x backends keeps the spread within 1%

ctypedef struct svc_slot_t:
    uint64_t key                # vip << 32 | port << 8 | proto, all raw
    uint32_t svc                # index into svcs, EMPTY when unused
    uint32_t pad

ctypedef struct svc_t:
    uint32_t backend_start
    uint32_t backend_count
    uint32_t range_start
    uint32_t range_count
    uint32_t flags
    uint32_t scheduler
    uint32_t id                 # stable service-port id: stats, affinity
    uint32_t affinity_timeout   # seconds
    uint32_t mh_start           # Maglev ring slice in mh[] (SCHED_MH)
    uint32_t mh_size
    uint32_t rr                 # round-robin cursor (mutable; racy by design)
    uint32_t vip                # raw; the address replies come from
    uint16_t port               # raw
    uint8_t proto
    uint8_t pad

ctypedef struct backend_t:
    uint32_t addr               # raw
    uint16_t port               # raw
    uint16_t pad
    uint32_t id                 # stable backend id: active-flow counts

ctypedef struct cidr_t:
    uint32_t net                # host order, for masking
    uint32_t mask

cdef extern from *:
    """#define ENGINE_EMPTY_SLOT 0xffffffffu"""
    const uint32_t EMPTY "ENGINE_EMPTY_SLOT"


cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    # splitmix64 finalizer: cheap and spreads nearby keys over the table
    x ^= x >> 30
    x *= 0xbf58476d1ce4e5b9ULL
    x ^= x >> 27
    x *= 0x94d049bb133111ebULL
    x ^= x >> 31
    return x


cdef inline uint32_t prefix_mask(int plen) noexcept:
    if plen <= 0:
        return 0
    if plen >= 32:
        return 0xffffffffU
    return <uint32_t>(0xffffffffU << (32 - plen))


cdef inline uint64_t svc_key(uint32_t addr, uint16_t port, uint8_t proto) noexcept nogil:
    return (<uint64_t>addr << 32) | (<uint64_t>port << 8) | proto


cdef enum:
    NO_SLOT = 0xffffffff        # svc_peek_slot: the packet opens no flow worth staging


cdef inline uint64_t svc_peek_slot(const uint8_t *p, Py_ssize_t n, uint64_t svc_mask) noexcept nogil:
    """For the batch stage: the home slot, in the service index, of what the
    packet is addressed to, if it may open a flow (a TCP SYN, or UDP);
    else NO_SLOT. A hint only, like peek_hash."""
    cdef Py_ssize_t ihl
    cdef uint8_t proto
    if n < IP_MIN_HLEN or (p[IP_VER_IHL] >> 4) != 4:
        return NO_SLOT
    ihl = (p[IP_VER_IHL] & 0x0f) * 4
    proto = p[IP_PROTO]
    if ihl < IP_MIN_HLEN or n < ihl + TCP_FLAGS + 1:
        return NO_SLOT
    if proto == PROTO_TCP:
        if (p[ihl + TCP_FLAGS] & (TH_SYN | TH_ACK)) != TH_SYN:
            return NO_SLOT
    elif proto != PROTO_UDP:
        return NO_SLOT
    return mix64(svc_key(ld32(p + IP_DST), ld16(p + ihl + L4_DPORT), proto)) & svc_mask


cdef class Tables:
    """One generation of compiled service tables (immutable once built)."""
    cdef svc_slot_t *svc_slots
    cdef uint64_t svc_mask
    cdef svc_t *svcs
    cdef uint32_t nsvcs
    cdef backend_t *backends
    cdef uint32_t nbackends
    cdef uint32_t *vip_slots
    cdef uint64_t vip_mask
    cdef cidr_t *ranges
    cdef uint32_t nranges
    cdef cidr_t *drop_cidrs
    cdef uint32_t ndrop
    cdef uint32_t *node_addrs
    cdef uint32_t nnode
    cdef uint16_t *mh               # Maglev rings, indexes into each service's backends
    cdef uint32_t nmh               # rings in mh
    cdef uint64_t max_id            # largest service id + 1
    cdef uint64_t max_bid           # largest backend id + 1
    cdef readonly object names      # service-port names, index = svc id (for stats)

    def __cinit__(self):
        self.svc_slots = NULL
        self.svcs = NULL
        self.backends = NULL
        self.vip_slots = NULL
        self.ranges = NULL
        self.drop_cidrs = NULL
        self.node_addrs = NULL
        self.mh = NULL

    def __dealloc__(self):
        free(self.svc_slots)
        free(self.svcs)
        free(self.backends)
        free(self.vip_slots)
        free(self.ranges)
        free(self.drop_cidrs)
        free(self.node_addrs)
        free(self.mh)

    def __init__(self, services, vips=(), drop_cidrs=(), node_addrs=()):
        """services: sequence of dicts with keys
             name, vip (int, host order; 0 for a node port), port, proto (6/17),
             backends [(addr int, port[, stable id])], source_ranges [(net int, prefixlen)],
             scheduler (int), nodeport (bool), id (stable service id; default: the index),
             affinity_timeout (seconds; 0 = no session affinity)
           vips: addresses (int) that are live service addresses
           drop_cidrs: [(net int, prefixlen)] where unallocated addresses are dropped
           node_addrs: addresses (int) on which node-port keys (vip 0) apply
        """
        cdef uint32_t i, j, b, r, nb = 0, nr = 0, nmh = 0, m = 0
        cdef uint64_t size, h, key
        services = list(services)
        for s in services:
            if s.get("scheduler", 0) == SCHED_MH and s["backends"]:
                nmh += 1
        self.mh = <uint16_t *>malloc(max(1, nmh) * MAGLEV_SIZE * sizeof(uint16_t))
        self.nmh = nmh
        if not self.mh:
            raise MemoryError()
        self.max_id = 0
        self.max_bid = 0
        self.names = [s["name"] for s in services]
        self.nsvcs = len(services)
        for s in services:
            nb += len(s["backends"])
            nr += len(s.get("source_ranges") or ())
        self.nbackends = nb
        self.nranges = nr
        self.svcs = <svc_t *>calloc(max(1, self.nsvcs), sizeof(svc_t))
        self.backends = <backend_t *>calloc(max(1, nb), sizeof(backend_t))
        self.ranges = <cidr_t *>calloc(max(1, nr), sizeof(cidr_t))
        size = 16
        while size < 2 * (<uint64_t>self.nsvcs) + 2:
            size <<= 1
        self.svc_mask = size - 1
        self.svc_slots = <svc_slot_t *>malloc(size * sizeof(svc_slot_t))
        if not self.svcs or not self.backends or not self.ranges or not self.svc_slots:
            raise MemoryError()
        for h in range(size):
            self.svc_slots[h].svc = EMPTY
        b = 0
        r = 0
        for i, s in enumerate(services):
            sv = &self.svcs[i]
            sv.vip = htonl(s["vip"])
            sv.port = htons(s["port"])
            sv.proto = s["proto"]
            sv.scheduler = s.get("scheduler", 0)
            sv.flags = SVC_F_NODEPORT if s.get("nodeport") else 0
            sv.id = s.get("id", i)
            if sv.id >= 0xffffffffU:
                raise ValueError(f"{s['name']}: service id out of range")
            self.max_id = max(self.max_id, <uint64_t>sv.id + 1)
            sv.affinity_timeout = s.get("affinity_timeout", 0)
            if sv.affinity_timeout:
                sv.flags |= SVC_F_AFFINITY
            sv.rr = 0
            sv.backend_start = b
            for be in s["backends"]:
                self.backends[b].addr = htonl(be[0])
                self.backends[b].port = htons(be[1])
                self.backends[b].id = be[2] if len(be) > 2 else b
                if self.backends[b].id >= 0xffffffffU:
                    raise ValueError(f"{s['name']}: backend id out of range")
                self.max_bid = max(self.max_bid, <uint64_t>self.backends[b].id + 1)
                b += 1
            sv.backend_count = b - sv.backend_start
            sv.mh_start = sv.mh_size = 0
            if sv.scheduler == SCHED_MH and sv.backend_count > 65534:
                raise ValueError(f"{s['name']}: Maglev takes at most 65534 backends")
            if sv.scheduler == SCHED_MH and sv.backend_count:
                sv.mh_start = m * MAGLEV_SIZE
                sv.mh_size = MAGLEV_SIZE
                maglev_fill(self.mh + sv.mh_start, MAGLEV_SIZE, self.backends + sv.backend_start,
                            sv.backend_count)
                m += 1
            sv.range_start = r
            for net, plen in s.get("source_ranges") or ():
                self.ranges[r].mask = prefix_mask(plen)
                self.ranges[r].net = net & self.ranges[r].mask
                r += 1
            sv.range_count = r - sv.range_start
            if sv.range_count:
                sv.flags |= SVC_F_SOURCE_RANGES
            key = svc_key(sv.vip, sv.port, sv.proto)
            h = mix64(key) & self.svc_mask
            while self.svc_slots[h].svc != EMPTY:
                if self.svc_slots[h].key == key:
                    raise ValueError(f"duplicate service key {s['name']}")
                h = (h + 1) & self.svc_mask
            self.svc_slots[h].key = key
            self.svc_slots[h].svc = i
        self.vip_slots = _addr_set([htonl(a) for a in vips], &self.vip_mask)
        self.ndrop = len(drop_cidrs)
        self.drop_cidrs = <cidr_t *>calloc(max(1, self.ndrop), sizeof(cidr_t))
        for j, (net, plen) in enumerate(drop_cidrs):
            self.drop_cidrs[j].mask = prefix_mask(plen)
            self.drop_cidrs[j].net = net & self.drop_cidrs[j].mask
        self.nnode = len(node_addrs)
        self.node_addrs = <uint32_t *>calloc(max(1, self.nnode), sizeof(uint32_t))
        for j, a in enumerate(node_addrs):
            self.node_addrs[j] = htonl(a)

    @property
    def size(self):
        return self.nsvcs

    def with_backends(self, dict changes):
        """A new generation equal to this one but for the backends of the rows
        in changes ({row index: [(addr, port, id)]}): an endpoint change costs
        a copy of flat arrays, not a compile of every service."""
        cdef Tables t = Tables.__new__(Tables)
        cdef uint32_t i, b = 0, nb = 0, m = 0, nmh = 0
        cdef uint64_t slots = self.svc_mask + 1, vslots = self.vip_mask + 1
        cdef svc_t *sv
        for i in range(self.nsvcs):
            rows = changes.get(i)
            nb += len(rows) if rows is not None else self.svcs[i].backend_count
            if self.svcs[i].scheduler == SCHED_MH and (rows if rows is not None else self.svcs[i].backend_count):
                nmh += 1
        for i, rows in changes.items():
            if not 0 <= i < self.nsvcs:
                raise ValueError(f"no row {i}")
            if self.svcs[i].scheduler == SCHED_MH and len(rows) > 65534:
                raise ValueError(f"{self.names[i]}: Maglev takes at most 65534 backends")
        t.names = self.names
        t.nsvcs, t.svc_mask, t.vip_mask = self.nsvcs, self.svc_mask, self.vip_mask
        t.nranges, t.ndrop, t.nnode = self.nranges, self.ndrop, self.nnode
        t.max_id, t.max_bid = self.max_id, self.max_bid
        t.svc_slots = <svc_slot_t *>malloc(slots * sizeof(svc_slot_t))
        t.svcs = <svc_t *>malloc(max(1, self.nsvcs) * sizeof(svc_t))
        t.backends = <backend_t *>calloc(max(1, nb), sizeof(backend_t))
        t.vip_slots = <uint32_t *>malloc(vslots * sizeof(uint32_t))
        t.ranges = <cidr_t *>malloc(max(1, self.nranges) * sizeof(cidr_t))
        t.drop_cidrs = <cidr_t *>malloc(max(1, self.ndrop) * sizeof(cidr_t))
        t.node_addrs = <uint32_t *>malloc(max(1, self.nnode) * sizeof(uint32_t))
        t.mh = <uint16_t *>malloc(max(1, nmh) * MAGLEV_SIZE * sizeof(uint16_t))
        t.nmh = nmh
        if not (t.svc_slots and t.svcs and t.backends and t.vip_slots and t.ranges
                and t.drop_cidrs and t.node_addrs and t.mh):
            raise MemoryError()
        memcpy(t.svc_slots, self.svc_slots, slots * sizeof(svc_slot_t))
        memcpy(t.svcs, self.svcs, max(1, self.nsvcs) * sizeof(svc_t))
        memcpy(t.vip_slots, self.vip_slots, vslots * sizeof(uint32_t))
        memcpy(t.ranges, self.ranges, max(1, self.nranges) * sizeof(cidr_t))
        memcpy(t.drop_cidrs, self.drop_cidrs, max(1, self.ndrop) * sizeof(cidr_t))
        memcpy(t.node_addrs, self.node_addrs, max(1, self.nnode) * sizeof(uint32_t))
        for i in range(self.nsvcs):
            sv = &t.svcs[i]
            rows = changes.get(i)
            if rows is None:
                memcpy(t.backends + b, self.backends + self.svcs[i].backend_start,
                       self.svcs[i].backend_count * sizeof(backend_t))
                sv.backend_start = b
                b += sv.backend_count
            else:
                sv.backend_start = b
                for be in rows:
                    t.backends[b].addr = htonl(be[0])
                    t.backends[b].port = htons(be[1])
                    t.backends[b].id = be[2] if len(be) > 2 else b
                    if t.backends[b].id >= 0xffffffffU:
                        raise ValueError(f"{self.names[i]}: backend id out of range")
                    t.max_bid = max(t.max_bid, <uint64_t>t.backends[b].id + 1)
                    b += 1
                sv.backend_count = b - sv.backend_start
                sv.rr = 0
            sv.mh_start = sv.mh_size = 0
            if sv.scheduler == SCHED_MH and sv.backend_count:
                sv.mh_start = m * MAGLEV_SIZE
                sv.mh_size = MAGLEV_SIZE
                if rows is None:
                    memcpy(t.mh + sv.mh_start, self.mh + self.svcs[i].mh_start, MAGLEV_SIZE * sizeof(uint16_t))
                else:
                    maglev_fill(t.mh + sv.mh_start, MAGLEV_SIZE, t.backends + sv.backend_start, sv.backend_count)
                m += 1
        t.nbackends = b
        return t

    cdef inline svc_t *lookup(self, uint32_t addr, uint16_t port, uint8_t proto) noexcept nogil:
        cdef uint64_t key = svc_key(addr, port, proto)
        cdef uint64_t h = mix64(key) & self.svc_mask
        while self.svc_slots[h].svc != EMPTY:
            if self.svc_slots[h].key == key:
                return &self.svcs[self.svc_slots[h].svc]
            h = (h + 1) & self.svc_mask
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

    cdef inline bint source_allowed(self, const svc_t *sv, uint32_t addr) noexcept nogil:
        cdef uint32_t i, a = ntohl(addr)
        for i in range(sv.range_start, sv.range_start + sv.range_count):
            if (a & self.ranges[i].mask) == self.ranges[i].net:
                return True
        return False


cdef int maglev_fill(uint16_t *ring, uint32_t M, backend_t *bs, uint32_t n) except -1:
    """Maglev lookup table (Eisenbud et al., NSDI'16, section 3.4): each
    backend walks its own permutation of the M slots and claims the next free
    one in turn, so each gets ~M/n slots and losing one backend moves only
    the slots it held."""
    cdef uint32_t *offset = <uint32_t *>malloc(n * sizeof(uint32_t))
    cdef uint32_t *skip = <uint32_t *>malloc(n * sizeof(uint32_t))
    cdef uint32_t *nxt = <uint32_t *>calloc(n, sizeof(uint32_t))
    cdef uint32_t i, filled = 0, c
    cdef uint64_t key
    if not offset or not skip or not nxt:
        free(offset); free(skip); free(nxt)
        raise MemoryError()
    for i in range(n):
        key = (<uint64_t>ntohl(bs[i].addr) << 16) | ntohs(bs[i].port)
        offset[i] = mix64(key ^ 0x6d61676c6576ULL) % M
        skip[i] = mix64(key ^ 0x736b6970ULL) % (M - 1) + 1
    for i in range(M):
        ring[i] = 0xffff
    while True:
        for i in range(n):
            c = (offset[i] + <uint64_t>nxt[i] * skip[i]) % M
            while ring[c] != 0xffff:
                nxt[i] += 1
                c = (offset[i] + <uint64_t>nxt[i] * skip[i]) % M
            ring[c] = <uint16_t>i
            nxt[i] += 1
            filled += 1
            if filled == M:
                free(offset); free(skip); free(nxt)
                return 0


def maglev_table(backends, uint32_t size=MAGLEV_SIZE):
    """The Maglev ring for [(addr int, port)] as a list of backend indexes
    (for tests and the reference path)."""
    cdef uint32_t n = len(backends), i
    if n == 0 or n > 65535:
        raise ValueError("1..65535 backends")
    if size < 2 or any(size % d == 0 for d in range(2, int(size ** 0.5) + 1)):
        raise ValueError("the Maglev table size must be a prime")
    cdef backend_t *bs = <backend_t *>calloc(n, sizeof(backend_t))
    cdef uint16_t *ring = <uint16_t *>malloc(size * sizeof(uint16_t))
    try:
        for i, (addr, port) in enumerate(backends):
            bs[i].addr = htonl(addr)
            bs[i].port = htons(port)
        maglev_fill(ring, size, bs, n)
        return [ring[i] for i in range(size)]
    finally:
        free(bs)
        free(ring)


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
