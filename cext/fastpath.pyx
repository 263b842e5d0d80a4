# cython: language_level=3
"""engine._fastpath: the packet path.

Per batch of packets read from a TUN queue (IOWorker.run, io.pxi), with the
GIL released and no Python object touched:
  1. parse every packet once into a checked view (parse.pxi), and prefetch
     what the next stages will look up: its flow's index slot and, for a
     packet that may open a flow, its service port's slot
  2. under the conntrack lock, prefetch the flow entries and the service
     ports, backends and counters a new flow will touch
  3. per packet (process_one): a tracked flow is rewritten either way
     (conntrack.pxi, nat.pxi); a new one finds its service port (tables.pxi),
     a backend (sched.pxi) and a masquerade port; ICMP is answered or
     translated, or a port unreachable sent (icmp.pxi); else a drop is
     counted by reason
  4. sweep a few conntrack entries for expiry, then write back what goes on
Python sees only counters; tables are compiled whole and swapped in at once.
Declarations: cext/engine/_fastpath.pxd; externs: cext/includes/system.pxd.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset
from posix.unistd cimport read, write
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from cpython.pythread cimport (PyThread_allocate_lock, PyThread_free_lock, PyThread_acquire_lock,
                               PyThread_release_lock, WAIT_LOCK)
from cpython.bytes cimport PyBytes_FromStringAndSize

from includes.system cimport *
from pkt cimport *

include "csum.pxi"
include "hash.pxi"
include "parse.pxi"
include "tables.pxi"
include "conntrack.pxi"
include "sched.pxi"
include "nat.pxi"
include "icmp.pxi"
include "io.pxi"


# -- names of the enums of _fastpath.pxd, for Python ------------------------------------

DROP_REASONS = ("none", "malformed", "unsupported", "fragment", "no_service",
                "unallocated", "not_syn", "table_full", "nat_exhausted",
                "spoofed", "source_denied", "martian", "icmp_rate", "overload")

COUNTERS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "flows_created",
            "flows_expired", "flows_evicted", "rejects", "write_errors", "drops",
            "flows_refused")

SERVICE_COUNTERS = ("packets", "bytes", "flows", "rejects", "denied")

# scheduler name -> id, in the order engine/model.py lists the names
SCHEDULER_IDS = {"random": SCHED_RANDOM, "rr": SCHED_RR, "lc": SCHED_LC, "sh": SCHED_SH,
                 "mh": SCHED_MH}

PROTOCOLS = {"TCP": PROTO_TCP, "UDP": PROTO_UDP}     # those a service port may have
PROTO_NAMES = {PROTO_ICMP: "icmp", PROTO_TCP: "tcp", PROTO_UDP: "udp"}    # those the fast path parses

STATE_NAMES = ("FREE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT",
               "CLOSE_WAIT", "TIME_WAIT", "CLOSE", "UNREPLIED", "ASSURED")

# Default timeouts per state, seconds (kube-proxy's sysctls where it sets them)
DEFAULT_TIMEOUTS = {
    "SYN_SENT": 120, "SYN_RECV": 60, "ESTABLISHED": 86400, "FIN_WAIT": 120,
    "CLOSE_WAIT": 3600, "TIME_WAIT": 120, "CLOSE": 10, "UNREPLIED": 30,
    "ASSURED": 120,
}

ENTRY_BYTES = sizeof(ct_entry_t)
EXPORT_CHUNK_FLOWS = EXPORT_CHUNK      # flows per lock hold of export_flows (tests span several)


# -- the packet path: process_one and its steps -------------------------------------------

cdef inline int drop(Dataplane dp, int reason) noexcept nogil:
    dp.cnt[C_DROPS] += 1
    dp.cnt[C_DROP_BASE + reason] += 1
    return V_DROP | (reason << 8)


cdef inline void svcport_count(Dataplane dp, uint32_t id, Py_ssize_t nbytes) noexcept nogil:
    dp.svcport_stats[<size_t>id * NSVCPORT_STATS + S_PACKETS] += 1
    dp.svcport_stats[<size_t>id * NSVCPORT_STATS + S_BYTES] += nbytes


cdef int process_one(Dataplane dp, Tables t, pkt_t *v, uint32_t now, Py_ssize_t *outlen,
                     bint partial) noexcept nogil:
    """One parsed packet. Returns verdict | reason << 8; on V_FORWARD and
    V_REPLY, *outlen is set. partial: the L4 checksum is CHECKSUM_PARTIAL."""
    cdef int64_t ref
    cdef uint16_t reopened = 0
    dp.cnt[C_RX_PACKETS] += 1
    dp.cnt[C_RX_BYTES] += v.n
    if v.reason != R_NONE:
        return drop(dp, v.reason)
    if v.proto == PROTO_ICMP:
        return icmp_in(dp, t, v, now, outlen)
    ref = flow_lookup(dp, v, now, &reopened)
    if ref >= 0:
        return flow_forward(dp, v, ref, now, outlen, partial)
    return flow_open(dp, t, v, now, outlen, partial, reopened)


cdef inline int64_t flow_lookup(Dataplane dp, const pkt_t *v, uint32_t now,
                                 uint16_t *reopened) noexcept nogil:
    """The tracked flow of a TCP/UDP packet, either direction (entry id * 2 +
    direction), else -1. An expired flow is removed on the way, and so is a
    closing TCP connection whose client port a new SYN reuses; when the
    packet's own client tuple is removed so, *reopened gets that flow's
    masquerade port (the new flow keeps it: the backend may still hold the
    old connection's TIME_WAIT, and accepts its successor there)."""
    cdef int64_t ref = ct_find_h(&dp.ct, &v.key, v.hash)
    cdef ct_entry_t *e
    if ref < 0:
        return ref
    e = &dp.ct.entries[ref >> 1]
    if e.expires <= now:
        if (ref & 1) == DIR_ORIG:
            reopened[0] = ntohs(e.key[DIR_REPLY].dport)
        ct_remove(&dp.ct, <uint32_t>(ref >> 1))
        dp.cnt[C_FLOWS_EXPIRED] += 1
        return -1
    if (v.proto == PROTO_TCP and (ref & 1) == DIR_ORIG
            and (v.th & (TH_SYN | TH_ACK | TH_RST)) == TH_SYN
            and (e.state == CT_TIME_WAIT or e.state == CT_CLOSE)):
        reopened[0] = ntohs(e.key[DIR_REPLY].dport)
        ct_remove(&dp.ct, <uint32_t>(ref >> 1))     # port reuse: a new connection
        return -1
    return ref


cdef inline int flow_forward(Dataplane dp, pkt_t *v, int64_t ref, uint32_t now, Py_ssize_t *outlen,
                             bint partial) noexcept nogil:
    """A packet of tracked flow ref: rewritten to the flow's other tuple, and
    the flow's state and timeout moved on."""
    cdef int dir = ref & 1
    cdef ct_entry_t *e = &dp.ct.entries[ref >> 1]
    cdef flow_key_t *other = &e.key[1 - dir]
    nat_rewrite(v.p, v.l4, v.proto, other.daddr, other.dport, other.saddr, other.sport, partial)
    if v.proto == PROTO_TCP:
        if e.state == CT_SYN_RECV and dir == DIR_ORIG:
            known_mark(dp, e.key[DIR_ORIG].saddr, now)      # the client got our SYN-ACK: its address is real
        e.state = tcp_next_state(e.state, &e.flags, dir, v.th)
        if e.state == CT_TIME_WAIT or e.state == CT_CLOSE:
            ct_deactivate(&dp.ct, e)
    elif dir == DIR_REPLY:
        e.state = CT_UDP_ASSURED
    e.expires = now + dp.timeouts[e.state]
    svcport_count(dp, e.svcport, v.tot)
    outlen[0] = v.tot
    return V_FORWARD


cdef inline svcport_t *svcport_match(Tables t, const flow_key_t *k) noexcept nogil:
    """The service port a new flow to k opens to: by (address, port,
    protocol), else the node port when k's address is a node's. (Address 0
    is the node-port key: it is never matched as a destination.)"""
    cdef svcport_t *sv = t.lookup(k.daddr, k.dport, k.proto) if k.daddr != 0 else NULL
    if sv == NULL and t.nnode and t.is_node_addr(k.daddr):
        sv = t.lookup(0, k.dport, k.proto)
    return sv


cdef inline int flow_open(Dataplane dp, Tables t, pkt_t *v, uint32_t now, Py_ssize_t *outlen,
                          bint partial, uint16_t reopened) noexcept nogil:
    """A packet of no tracked flow: a new flow to a backend of its service
    port, or refused, or dropped. reopened: the masquerade port of the flow
    of the same client tuple just closed, else 0."""
    cdef flow_key_t rk
    cdef backend_t *b
    cdef int64_t id
    cdef ct_entry_t *e
    cdef svcport_t *sv = svcport_match(t, &v.key)
    if sv == NULL:
        if t.is_vip(v.key.daddr) or (t.nnode and t.is_node_addr(v.key.daddr)):
            # a live VIP on a port it does not serve, or a node address
            # on a node port nobody has: refused, as the kernel would
            return reject(dp, v, now, outlen)
        return drop(dp, unmatched(dp, t, v.key.daddr))
    if (sv.flags & SVCPORT_F_SOURCE_RANGES) and not t.source_allowed(sv, v.key.saddr):
        dp.svcport_stats[<size_t>sv.id * NSVCPORT_STATS + S_DENIED] += 1
        return drop(dp, R_SOURCE_DENIED)
    if sv.backend_count == 0:
        dp.svcport_stats[<size_t>sv.id * NSVCPORT_STATS + S_REJECTS] += 1
        return reject(dp, v, now, outlen)
    if v.proto == PROTO_TCP and (v.th & (TH_SYN | TH_ACK | TH_RST | TH_FIN)) != TH_SYN:
        return drop(dp, R_NOT_SYN)
    if dp.overloaded and not admit(dp, v.key.saddr, now):
        return drop(dp, R_OVERLOAD)
    b = schedule(dp, t, sv, &v.key, now)
    rk.saddr = b.addr
    rk.daddr = dp.masq
    rk.sport = b.port
    rk.proto = v.proto
    rk.family = 4
    rk.pad = 0
    if not snat_port(dp, &rk, v.key.sport, reopened, now):
        return drop(dp, R_NAT_EXHAUSTED)
    id = ct_alloc(&dp.ct, now, &dp.cnt[C_FLOWS_EVICTED])
    if id < 0:
        return drop(dp, R_TABLE_FULL)
    e = &dp.ct.entries[id]
    e.key[DIR_ORIG] = v.key
    e.key[DIR_REPLY] = rk
    e.svcport = sv.id
    e.backend = b.id
    e.flags = 0
    if b.id < dp.ct.nactive:
        dp.ct.active[b.id] += 1
        e.flags = CTF_ACTIVE
    e.state = CT_SYN_SENT if v.proto == PROTO_TCP else CT_UDP_UNREPLIED
    e.expires = now + dp.timeouts[e.state]
    ct_index_flow(&dp.ct, <uint32_t>id)
    dp.svcport_stats[<size_t>sv.id * NSVCPORT_STATS + S_FLOWS] += 1
    svcport_count(dp, sv.id, v.tot)
    dp.cnt[C_FLOWS_CREATED] += 1
    nat_rewrite(v.p, v.l4, v.proto, rk.daddr, rk.dport, rk.saddr, rk.sport, partial)
    outlen[0] = v.tot
    return V_FORWARD


# -- admission under overload ---------------------------------------------------------------

cdef inline uint64_t known_bit(uint32_t raw_src) noexcept nogil:
    return ((raw_src * 2654435761U) & 0xffffffffU) >> (32 - KNOWN_BITS_LOG2)


cdef inline void known_rotate(Dataplane dp, uint32_t now) noexcept nogil:
    """A new generation every KNOWN_PERIOD seconds: the older one is forgotten."""
    cdef uint64_t *old
    if now - dp.known_epoch >= KNOWN_PERIOD:
        old = dp.known[1]
        dp.known[1] = dp.known[0]
        dp.known[0] = old
        memset(old, 0, (1 << KNOWN_BITS_LOG2) // 8)
        if now - dp.known_epoch >= 2 * KNOWN_PERIOD:
            memset(dp.known[1], 0, (1 << KNOWN_BITS_LOG2) // 8)
        dp.known_epoch = now


cdef inline void known_mark(Dataplane dp, uint32_t raw_src, uint32_t now) noexcept nogil:
    cdef uint64_t b = known_bit(raw_src)
    known_rotate(dp, now)
    dp.known[0][b >> 6] |= 1ULL << (b & 63)


cdef inline bint admit(Dataplane dp, uint32_t raw_src, uint32_t now) noexcept nogil:
    """Whether a new flow from raw_src goes on while the engine is behind: a
    known source always, another within admit_rate a second. A flood from
    random sources then costs a read and a drop, not two writes and the
    backends' work, and the TUN queue keeps room for known clients."""
    cdef uint64_t b = known_bit(raw_src)
    known_rotate(dp, now)
    if ((dp.known[0][b >> 6] | dp.known[1][b >> 6]) >> (b & 63)) & 1:
        return True
    if now != dp.admit_second:
        dp.admit_second = now
        dp.admit_tokens = dp.admit_rate
    if dp.admit_tokens == 0:
        return False
    dp.admit_tokens -= 1
    return True


# -- batch stages ahead of process_one (prefetches: hints, never answers) -------------------

cdef inline void stage_parse(Dataplane dp, Tables t, uint8_t *bufs, size_t stride, Py_ssize_t *lens,
                             int n, int hdr, pkt_t *pkts, uint64_t *rows) noexcept nogil:
    """Stage 1, no lock needed: parse each packet; with batch_prefetch, fetch
    its flow's home index slot and, for a packet that may open a flow, its
    service port's slot (rows[i], else NO_SLOT)."""
    cdef int i
    cdef pkt_t *v
    cdef bint ahead = dp.batch_prefetch
    for i in range(n):
        v = &pkts[i]
        pkt_parse(v, bufs + <size_t>i * stride + hdr, lens[i] - hdr)
        if ahead:
            if v.hash:
                ct_prefetch_slot(&dp.ct, v.hash)
            rows[i] = svcport_peek_slot(v, t.svcport_mask)
            if rows[i] != NO_SLOT:
                prefetch(&t.svcport_slots[rows[i]])


cdef inline void stage_entries(Dataplane dp, Tables t, const pkt_t *pkts, uint64_t *rows, int n) noexcept nogil:
    """Stage 2, under the lock: the entries of tracked flows; for a packet
    whose flow is not in the table (its home slot is empty), its service
    port, then that port's backends and counters: a new flow's chain of
    misses, spread over the batch."""
    cdef int i
    cdef size_t j
    cdef uint32_t row
    cdef svcport_t *sv
    cdef backend_t *b
    ct_prefetch_entries(&dp.ct, pkts, n)
    for i in range(n):
        if rows[i] == NO_SLOT:
            continue
        row = t.svcport_slots[rows[i]].row
        if row == EMPTY or dp.ct.slots[pkts[i].hash & dp.ct.mask] != 0:
            rows[i] = NO_SLOT
            continue
        rows[i] = row
        prefetch(&t.svcports[row])
    for i in range(n):
        if rows[i] == NO_SLOT:
            continue
        sv = &t.svcports[rows[i]]
        if sv.backend_count:
            b = &t.backends[sv.backend_start]
            for j in range(0, min(sv.backend_count, 16) * sizeof(backend_t), 64):
                prefetch(<uint8_t *>b + j)
        else:
            rows[i] = NO_SLOT
        if sv.id < dp.max_svcports:
            prefetch_w(&dp.svcport_stats[<size_t>sv.id * NSVCPORT_STATS])
    for i in range(n):          # active-flow counts: a service port's backend ids are near each other
        if rows[i] != NO_SLOT:
            b = &t.backends[t.svcports[rows[i]].backend_start]
            if b.id < dp.ct.nactive:
                prefetch_w(&dp.ct.active[b.id])


cdef class Dataplane:
    """Conntrack + NAT over compiled Tables."""

    def __cinit__(self):
        self.bufs = NULL
        self.lock = NULL
        self.svcport_stats = NULL
        self.aff = NULL
        self.ct.active = NULL
        self.ct.entries = NULL
        self.ct.free_ids = NULL
        self.ct.slots = NULL
        self.known[0] = self.known[1] = NULL

    def __init__(self, masquerade_ip, max_flows=262144, batch=64, seed=0x9E3779B9,
                 port_range=(1024, 65535), timeouts=None, Tables tables=None,
                 max_services=65536, max_backends=1 << 20, affinity_size=65536, icmp_rate=1000,
                 icmp_source_rate=100, admit_rate=1000):
        cdef uint64_t asize = 16
        if max_flows < 1:
            raise ValueError("max_flows must be positive")
        if not (1 <= port_range[0] <= port_range[1] <= 65535):
            raise ValueError("bad SNAT port range")
        if not 1 <= max_services <= (1 << 24) or not 1 <= max_backends <= (1 << 26):
            raise ValueError("max_services must be 1..2^24, max_backends 1..2^26")
        ct_init(&self.ct, max_flows, max_backends)
        self.max_svcports = max_services
        self.icmp_rate = icmp_rate
        self.icmp_tokens = icmp_rate
        self.icmp_second = 0xffffffffU
        self.icmp_source_rate = icmp_source_rate
        self.admit_rate = admit_rate
        self.admit_second = 0xffffffffU
        self.overloaded = False
        self.known_epoch = 0
        self.known[0] = <uint64_t *>calloc((1 << KNOWN_BITS_LOG2) // 64, sizeof(uint64_t))
        self.known[1] = <uint64_t *>calloc((1 << KNOWN_BITS_LOG2) // 64, sizeof(uint64_t))
        if not self.known[0] or not self.known[1]:
            raise MemoryError()
        memset(self.icmp_sources, 0xff, sizeof(self.icmp_sources))    # second ~0: no budget yet
        # per service-port counters and active counts are touched once per new
        # flow at random: on huge pages where given, like the flow table
        self.svcport_stats = <uint64_t *>big_alloc(<size_t>max_services * NSVCPORT_STATS * sizeof(uint64_t))
        while asize < affinity_size:
            asize <<= 1
        self.aff = <aff_t *>calloc(asize, sizeof(aff_t))
        self.aff_mask = asize - 1
        if not self.svcport_stats or not self.aff:
            raise MemoryError()
        self.masq = htonl(int(masquerade_ip))
        self.port_lo = port_range[0]
        self.port_range = port_range[1] - port_range[0] + 1
        self.rng = seed or 1
        self.batch = batch
        self.bufs = <uint8_t *>malloc(<size_t>batch * SLOT_SIZE)
        self.lock = PyThread_allocate_lock()
        if not self.bufs or not self.lock:
            raise MemoryError()
        self.set_timeouts(timeouts or {})
        self._workers = []
        self.batch_prefetch = True
        self.tun_queues = 1
        self.tables = Tables([])
        if tables is not None:
            self.swap(tables)

    def __dealloc__(self):
        ct_free(&self.ct)
        if self.svcport_stats != NULL:
            munmap(self.svcport_stats, <size_t>self.max_svcports * NSVCPORT_STATS * sizeof(uint64_t))
        free(self.aff)
        free(self.known[0])
        free(self.known[1])
        free(self.bufs)
        if self.lock:
            PyThread_free_lock(self.lock)

    def set_timeouts(self, dict timeouts):
        merged = dict(DEFAULT_TIMEOUTS)
        for k, v in timeouts.items():
            if k not in merged:
                raise ValueError(f"unknown conntrack state {k!r}")
            merged[k] = v
        for i, name in enumerate(STATE_NAMES):
            self.timeouts[i] = int(merged.get(name, 0))

    def swap(self, Tables tables not None):
        """Atomically replace the service tables. A batch in flight keeps the
        generation it started with (it holds a reference)."""
        if tables.max_id > self.max_svcports:
            raise ValueError(f"service id {tables.max_id - 1} beyond max_services {self.max_svcports}")
        if tables.max_bid > self.ct.nactive:
            raise ValueError(f"backend id {tables.max_bid - 1} beyond max_backends {self.ct.nactive}")
        self.tables = tables

    @property
    def current_tables(self):
        return self.tables

    # -- in memory (tests, benchmarks) ----------------------------------------

    def process(self, const uint8_t[:] pkt, double now, bint partial=False):
        """In-memory path for tests: returns (verdict, reason, out bytes|None).
        partial: treat the L4 checksum as CHECKSUM_PARTIAL (vnet NEEDS_CSUM)."""
        cdef Py_ssize_t n = pkt.shape[0], outlen = 0
        cdef pkt_t v
        cdef int r
        if n > SLOT_SIZE:
            raise ValueError("packet larger than a slot")
        if n:
            memcpy(self.bufs, &pkt[0], n)
        with nogil:
            pkt_parse(&v, self.bufs, n)
            PyThread_acquire_lock(self.lock, WAIT_LOCK)
            r = process_one(self, self.tables, &v, <uint32_t>now, &outlen, partial)
            PyThread_release_lock(self.lock)
        verdict = r & 0xff
        out = PyBytes_FromStringAndSize(<char *>self.bufs, outlen) if verdict != V_DROP else None
        return (("drop", "forward", "reply")[verdict], DROP_REASONS[r >> 8], out)

    def process_batch(self, list pkts, double now, int repeat=1):
        """For benchmarks: copy each packet into a slot and process it, `repeat`
        times over, in the stages IOWorker.run takes; returns the number
        forwarded or answered."""
        cdef Tables t = self.tables
        cdef int npk = len(pkts), rep, i, fwd = 0
        cdef Py_ssize_t outlen
        cdef uint32_t tnow = <uint32_t>now
        if npk > self.batch:
            raise ValueError("more packets than batch slots")
        cdef uint8_t *src = <uint8_t *>malloc(<size_t>max(1, npk) * SLOT_SIZE)
        cdef Py_ssize_t *srclen = <Py_ssize_t *>malloc(max(1, npk) * sizeof(Py_ssize_t))
        cdef pkt_t *views = <pkt_t *>malloc(max(1, npk) * sizeof(pkt_t))
        cdef uint64_t *rows = <uint64_t *>malloc(max(1, npk) * sizeof(uint64_t))
        if not src or not srclen or not views or not rows:
            free(src); free(srclen); free(views); free(rows)
            raise MemoryError()
        for i, pk in enumerate(pkts):
            srclen[i] = len(pk)
            if srclen[i] > SLOT_SIZE:
                free(src); free(srclen); free(views); free(rows)
                raise ValueError("packet larger than a slot")
            memcpy(src + <size_t>i * SLOT_SIZE, <char *>pk, srclen[i])
        with nogil:
            PyThread_acquire_lock(self.lock, WAIT_LOCK)
            for rep in range(repeat):
                for i in range(npk):
                    memcpy(self.bufs + <size_t>i * SLOT_SIZE, src + <size_t>i * SLOT_SIZE, srclen[i])
                stage_parse(self, t, self.bufs, SLOT_SIZE, srclen, npk, 0, views, rows)
                if self.batch_prefetch:
                    stage_entries(self, t, views, rows, npk)
                for i in range(npk):
                    if process_one(self, t, &views[i], tnow, &outlen, False) & 0xff:
                        fwd += 1
            PyThread_release_lock(self.lock)
        free(src)
        free(srclen)
        free(views)
        free(rows)
        return fwd

    # -- control plane views -------------------------------------------------

    def queue_packets(self):
        """Packets read per worker (one per TUN queue), in worker order."""
        return [(<IOWorker>w).rx_packets for w in self._workers]

    def counters(self):
        out = {name: self.cnt[i] for i, name in enumerate(COUNTERS)}
        for w in self._workers:
            tx = (<IOWorker>w).tx
            out["tx_packets"] += tx[0]
            out["tx_bytes"] += tx[1]
            out["write_errors"] += tx[2]
        out["drops_by_reason"] = {DROP_REASONS[r]: self.cnt[C_DROP_BASE + r]
                                  for r in range(1, R_NREASONS)}
        out["flows"] = self.ct.count
        out["max_flows"] = self.ct.max
        return out

    def service_counters(self, ids):
        """{id: {packets, bytes, flows, rejects, denied}} for stable service ids."""
        out = {}
        for i in ids:
            if not 0 <= i < self.max_svcports:
                raise ValueError(f"service id {i} out of range")
            out[i] = {name: self.svcport_stats[<size_t>i * NSVCPORT_STATS + j]
                      for j, name in enumerate(SERVICE_COUNTERS)}
        return out

    def active_flows(self, uint32_t backend_id):
        """Tracked flows to a backend (the lc scheduler's measure)."""
        if backend_id >= self.ct.nactive:
            raise ValueError("backend id out of range")
        return self.ct.active[backend_id]

    def flows(self, double now=-1):
        """Snapshot of the flow table: list of dicts (like conntrack -L)."""
        cdef uint32_t id
        cdef ct_entry_t *e
        cdef uint32_t tnow
        if now < 0:
            now = _monotonic()
        tnow = <uint32_t>now
        out = []
        PyThread_acquire_lock(self.lock, WAIT_LOCK)
        try:
            for id in range(self.ct.max):
                e = &self.ct.entries[id]
                if e.state == CT_FREE or e.expires <= tnow:
                    continue
                out.append({
                    "proto": e.key[0].proto,
                    "state": STATE_NAMES[e.state],
                    "timeout": e.expires - tnow,
                    "orig": _key_tuple(&e.key[0]),
                    "reply": _key_tuple(&e.key[1]),
                    "svc": e.svcport,
                    "backend": e.backend,
                })
        finally:
            PyThread_release_lock(self.lock)
        return out

    def delete_flows(self, int proto, backend_addr, int backend_port=-1):
        """Remove flows whose reply tuple comes from backend_addr(:port), e.g.
        UDP flows to a removed endpoint. Returns how many went."""
        cdef uint32_t id, removed = 0
        cdef uint32_t addr = htonl(int(backend_addr))
        cdef ct_entry_t *e
        PyThread_acquire_lock(self.lock, WAIT_LOCK)
        try:
            for id in range(self.ct.max):
                e = &self.ct.entries[id]
                if (e.state != CT_FREE and e.key[1].proto == proto and e.key[1].saddr == addr
                        and (backend_port < 0 or e.key[1].sport == htons(<uint16_t>backend_port))):
                    ct_remove(&self.ct, id)
                    removed += 1
        finally:
            PyThread_release_lock(self.lock)
        return removed

    def export_flows(self, double now=-1):
        """The live flow table as bytes (ENTRY_BYTES per flow, `expires`
        holding the seconds left), for a restart to pick up."""
        cdef uint32_t id, lo, hi, tnow, n
        cdef ct_entry_t *e
        cdef ct_entry_t *out
        if now < 0:
            now = _monotonic()
        tnow = <uint32_t>now
        # the table is walked in chunks, the lock taken for each, so that a
        # snapshot of a running engine pauses its packets for well under a
        # millisecond at a time (a flow opened meanwhile may be left out)
        parts = []
        buf = bytearray(<size_t>min(self.ct.max, EXPORT_CHUNK) * sizeof(ct_entry_t))
        out = <ct_entry_t *><char *>buf
        lo = 0
        while lo < self.ct.max:
            hi = min(self.ct.max, lo + EXPORT_CHUNK)
            n = 0
            with nogil:
                PyThread_acquire_lock(self.lock, WAIT_LOCK)
                for id in range(lo, hi):
                    e = &self.ct.entries[id]
                    if e.state == CT_FREE or e.expires <= tnow:
                        continue
                    out[n] = e[0]
                    out[n].expires = e.expires - tnow
                    n += 1
                PyThread_release_lock(self.lock)
            if n:
                parts.append(bytes(buf[:<size_t>n * sizeof(ct_entry_t)]))
            lo = hi
        return b"".join(parts)

    def import_flows(self, const uint8_t[:] data, double now=-1, dict svc_ids=None,
                     dict backend_ids=None, uint32_t elapsed=0):
        """Insert flows from export_flows(); ids are mapped old -> new (an
        unknown service port counts into the last id, an unknown backend into
        none). A record that is malformed, or whose id maps to one out of
        range (a service port >= max_services, a backend >= max_backends, or
        not an int >= 0), is refused and counted (counters()["flows_refused"]);
        one that expired or clashes with a flow already here is skipped.
        Returns how many were taken."""
        cdef Py_ssize_t n = data.shape[0] // sizeof(ct_entry_t), i
        cdef ct_entry_t rec
        cdef ct_entry_t *e
        cdef int64_t id
        cdef uint32_t tnow, taken = 0
        cdef uint64_t dummy = 0
        if data.shape[0] % sizeof(ct_entry_t):
            raise ValueError("flow snapshot length is not a whole number of entries")
        if now < 0:
            now = _monotonic()
        tnow = <uint32_t>now
        svc_ids = svc_ids or {}
        backend_ids = backend_ids or {}
        PyThread_acquire_lock(self.lock, WAIT_LOCK)
        try:
            for i in range(n):
                memcpy(&rec, &data[i * sizeof(ct_entry_t)], sizeof(ct_entry_t))
                if (rec.state == CT_FREE or rec.state >= CT_NSTATES
                        or rec.key[0].proto != rec.key[1].proto
                        or (rec.key[0].proto != PROTO_TCP and rec.key[0].proto != PROTO_UDP)):
                    self.cnt[C_FLOWS_REFUSED] += 1
                    continue
                if rec.expires <= elapsed:
                    continue
                rec.key[0].family = rec.key[1].family = 4
                rec.key[0].pad = rec.key[1].pad = 0
                if ct_find(&self.ct, &rec.key[0]) >= 0 or ct_find(&self.ct, &rec.key[1]) >= 0:
                    continue
                # map the ids before taking an entry: a bad map must not leave one half-made
                svc = svc_ids.get(rec.svcport, self.max_svcports - 1)
                bid = backend_ids.get(rec.backend)        # None: no backend
                if not _is_id(svc, self.max_svcports) or (bid is not None and not _is_id(bid, self.ct.nactive)):
                    self.cnt[C_FLOWS_REFUSED] += 1
                    continue
                if bid is None:
                    bid = 0xffffffff
                if self.ct.nfree == 0:
                    break
                id = ct_alloc(&self.ct, tnow, &dummy)
                if id < 0:
                    break
                e = &self.ct.entries[id]
                e[0] = rec
                e.expires = tnow + rec.expires - elapsed
                e.svcport = svc
                e.backend = bid
                e.flags &= ~CTF_ACTIVE
                if e.backend < self.ct.nactive and e.state != CT_TIME_WAIT and e.state != CT_CLOSE:
                    self.ct.active[e.backend] += 1
                    e.flags |= CTF_ACTIVE
                ct_index_flow(&self.ct, <uint32_t>id)
                taken += 1
        finally:
            PyThread_release_lock(self.lock)
        return taken

    def expire(self, double now, uint32_t budget=0xffffffff):
        """Sweep expired flows (tests pass their own clock)."""
        PyThread_acquire_lock(self.lock, WAIT_LOCK)
        r = ct_sweep(&self.ct, <uint32_t>now, budget)
        self.cnt[C_FLOWS_EXPIRED] += r
        PyThread_release_lock(self.lock)
        return r


cdef bint _is_id(v, uint64_t limit):
    return isinstance(v, int) and 0 <= v < limit


cdef tuple _key_tuple(flow_key_t *k):
    return (ntohl(k.saddr), ntohs(k.sport), ntohl(k.daddr), ntohs(k.dport))


def _monotonic():
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec / 1e9


def monotonic():
    """The dataplane clock (CLOCK_MONOTONIC seconds)."""
    return _monotonic()

