# cython: language_level=3
"""engine._fastpath: the packet path.

One batch, per call of Dataplane.run_io():
  1. poll the TUN fd, read up to `batch` packets into preallocated slots
  2. per packet, with the GIL released and no Python object touched:
     parse -> conntrack lookup -> hit: rewrite both ways
                                  miss: service table -> scheduler -> new flow
     or build an ICMP port unreachable (no endpoints / port not served),
     or count a drop by reason
  3. write every forwarded or generated packet back into the TUN
  4. sweep a few conntrack entries for expiry
Python sees only batch counts and counters; tables are swapped whole.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset
from posix.unistd cimport read, write
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock,
                               PyThread_free_lock, PyThread_acquire_lock,
                               PyThread_release_lock, WAIT_LOCK)
from cpython.bytes cimport PyBytes_FromStringAndSize

from pkt cimport *

cdef extern from "<arpa/inet.h>" nogil:
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN

cdef extern from *:
    """
    #define prefetch(p) __builtin_prefetch((p), 0, 3)
    #define prefetch_w(p) __builtin_prefetch((p), 1, 3)
    """
    void prefetch(const void *p) nogil
    void prefetch_w(const void *p) nogil

include "csum.pxi"
include "tables.pxi"
include "conntrack.pxi"
include "io.pxi"

# Verdicts
cdef enum:
    V_DROP = 0
    V_FORWARD = 1       # rewritten in place, write back
    V_REPLY = 2         # replaced by a packet of ours (ICMP), write back

# Drop reasons; a counter each. Keep in step with engine/refpath.py.
cdef enum:
    R_NONE = 0
    R_MALFORMED = 1
    R_UNSUPPORTED = 2
    R_FRAGMENT = 3
    R_NO_SERVICE = 4
    R_UNALLOCATED = 5
    R_NOT_SYN = 6
    R_TABLE_FULL = 7
    R_NAT_EXHAUSTED = 8
    R_SPOOFED = 9
    R_SOURCE_DENIED = 10
    R_MARTIAN = 11              # would answer a source no error may go to (RFC 1122 3.2.2)
    R_ICMP_RATE = 12            # port unreachables over icmp_rate per second (as the kernel's icmp_ratelimit)
    R_NREASONS = 13

DROP_REASONS = ("none", "malformed", "unsupported", "fragment", "no_service",
                "unallocated", "not_syn", "table_full", "nat_exhausted",
                "spoofed", "source_denied", "martian", "icmp_rate")

# Counters
cdef enum:
    C_RX_PACKETS = 0
    C_RX_BYTES
    C_TX_PACKETS
    C_TX_BYTES
    C_FLOWS_CREATED
    C_FLOWS_EXPIRED
    C_FLOWS_EVICTED
    C_REJECTS
    C_WRITE_ERRORS
    C_DROPS
    C_DROP_BASE
    C_NCOUNTERS = C_DROP_BASE + R_NREASONS

COUNTERS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "flows_created",
            "flows_expired", "flows_evicted", "rejects", "write_errors", "drops")

# Per-service counters, NSVC_STATS per stable service id
cdef enum:
    S_PACKETS = 0
    S_BYTES = 1
    S_FLOWS = 2
    S_REJECTS = 3
    S_DENIED = 4
    NSVC_STATS = 5

SERVICE_COUNTERS = ("packets", "bytes", "flows", "rejects", "denied")

# sessionAffinity: ClientIP, the last backend of (service, client), as
# iptables' `recent` list or IPVS persistence keeps it. Open addressing with
# a bounded probe; when all probed slots are live the oldest is replaced.
ctypedef struct aff_t:
    uint32_t svc                # stable service id + 1; 0 = empty
    uint32_t client             # raw
    uint32_t addr               # backend, raw
    uint16_t port
    uint16_t pad
    uint32_t expires

cdef enum:
    AFF_PROBE = 8

STATE_NAMES = ("FREE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT",
               "CLOSE_WAIT", "TIME_WAIT", "CLOSE", "UNREPLIED", "ASSURED")

# Default timeouts per state, seconds (kube-proxy's sysctls where it sets them)
DEFAULT_TIMEOUTS = {
    "SYN_SENT": 120, "SYN_RECV": 60, "ESTABLISHED": 86400, "FIN_WAIT": 120,
    "CLOSE_WAIT": 3600, "TIME_WAIT": 120, "CLOSE": 10, "UNREPLIED": 30,
    "ASSURED": 120,
}

cdef enum:
    SLOT_SIZE = 65536           # one IPv4 datagram at most
    EXPORT_CHUNK = 4096         # flows examined per lock hold by export_flows (~0.2 ms)
    IO_SLOT = 65536 + 16        # ... plus a virtio-net header
    ICMP_QUOTE_MAX = 548        # RFC 1812: error messages stay within 576 bytes
    PORT_TRIES = 512            # bounded search for a free SNAT port


cdef inline uint32_t xorshift32(uint32_t *s) noexcept nogil:
    cdef uint32_t x = s[0]
    x ^= x << 13
    x ^= x >> 17
    x ^= x << 5
    s[0] = x
    return x


cdef inline void nat_rewrite(uint8_t *p, uint8_t *l4, uint8_t proto,
                             uint32_t nsrc, uint16_t nsport,
                             uint32_t ndst, uint16_t ndport, bint partial) noexcept nogil:
    # partial: the packet came with VIRTIO_NET_HDR_F_NEEDS_CSUM, so the L4
    # checksum field holds the folded pseudo-header sum, not complemented:
    # adjust it for the addresses only (ports are summed later by whoever
    # completes the checksum). The IPv4 header checksum is always updated.
    cdef uint32_t osrc = ld32(p + IP_SRC), odst = ld32(p + IP_DST)
    cdef uint16_t osport = ld16(l4 + L4_SPORT), odport = ld16(l4 + L4_DPORT)
    cdef uint16_t c = ld16(p + IP_CSUM)
    cdef int off = TCP_CSUM if proto == PROTO_TCP else UDP_CSUM
    c = csum_replace4(c, osrc, nsrc)
    c = csum_replace4(c, odst, ndst)
    st16(p + IP_CSUM, c)
    st32(p + IP_SRC, nsrc)
    st32(p + IP_DST, ndst)
    c = ld16(l4 + off)
    if partial:
        c = <uint16_t>~csum_replace4(<uint16_t>~c, osrc, nsrc)
        c = <uint16_t>~csum_replace4(<uint16_t>~c, odst, ndst)
        st16(l4 + off, c)
    elif not (proto == PROTO_UDP and c == 0):   # UDP checksum 0: none, keep it so
        c = csum_replace4(c, osrc, nsrc)
        c = csum_replace4(c, odst, ndst)
        c = csum_replace2(c, osport, nsport)
        c = csum_replace2(c, odport, ndport)
        if proto == PROTO_UDP and c == 0:
            c = 0xffff
        st16(l4 + off, c)
    st16(l4 + L4_SPORT, nsport)
    st16(l4 + L4_DPORT, ndport)


# Replaces the datagram at p (tot bytes) with an ICMP port unreachable from
# its destination to its source, quoting it; returns the new length.
cdef inline Py_ssize_t build_port_unreachable(uint8_t *p, Py_ssize_t tot) noexcept nogil:
    cdef uint8_t quote[ICMP_QUOTE_MAX]
    cdef Py_ssize_t q = tot if tot < ICMP_QUOTE_MAX else ICMP_QUOTE_MAX
    cdef Py_ssize_t n = IP_MIN_HLEN + ICMP_HLEN + q
    cdef uint32_t src = ld32(p + IP_DST), dst = ld32(p + IP_SRC)
    memcpy(quote, p, q)
    p[0] = 0x45
    p[1] = 0xc0
    p[2] = <uint8_t>(n >> 8)
    p[3] = <uint8_t>(n & 0xff)
    p[4] = 0; p[5] = 0; p[6] = 0; p[7] = 0
    p[IP_TTL] = 64
    p[IP_PROTO] = PROTO_ICMP
    st16(p + IP_CSUM, 0)
    st32(p + IP_SRC, src)
    st32(p + IP_DST, dst)
    cdef uint8_t *ic = p + IP_MIN_HLEN
    ic[ICMP_TYPE] = 3               # destination unreachable
    ic[ICMP_CODE] = 3               # port unreachable
    st16(ic + ICMP_CSUM, 0)
    st32(ic + 4, 0)
    memcpy(ic + ICMP_HLEN, quote, q)
    st16(ic + ICMP_CSUM, csum_full(ic, ICMP_HLEN + q))
    st16(p + IP_CSUM, csum_full(p, IP_MIN_HLEN))
    return n


cdef inline uint8_t tcp_next_state(uint8_t st, uint8_t *fl, int dir, uint8_t th) noexcept nogil:
    if th & TH_RST:
        return CT_CLOSE
    if th & TH_FIN:
        fl[0] |= CTF_FIN_ORIG if dir == DIR_ORIG else CTF_FIN_REPLY
    if st == CT_SYN_SENT:
        if dir == DIR_REPLY and (th & (TH_SYN | TH_ACK)) == (TH_SYN | TH_ACK):
            return CT_SYN_RECV
        return st
    if st == CT_SYN_RECV:
        if dir == DIR_ORIG and (th & TH_ACK) and not (th & TH_SYN):
            st = CT_ESTABLISHED
        else:
            return st
    if st == CT_CLOSE:
        return st
    if (fl[0] & (CTF_FIN_ORIG | CTF_FIN_REPLY)) == (CTF_FIN_ORIG | CTF_FIN_REPLY):
        return CT_TIME_WAIT
    if fl[0] & CTF_FIN_ORIG:
        return CT_FIN_WAIT
    if fl[0] & CTF_FIN_REPLY:
        return CT_CLOSE_WAIT
    return st


cdef class Dataplane:
    """Conntrack + NAT over compiled Tables; owns the batch buffers."""
    cdef conntrack_t ct
    cdef Tables tables
    cdef uint32_t masq              # raw
    cdef uint32_t port_lo, port_range
    cdef uint32_t timeouts[CT_NSTATES]
    cdef uint32_t rng
    cdef uint64_t cnt[C_NCOUNTERS]
    cdef PyThread_type_lock lock    # conntrack: batch vs. control-plane calls
    cdef uint32_t icmp_rate, icmp_tokens, icmp_second
    cdef uint64_t *svc_stats        # NSVC_STATS per stable service id
    cdef uint32_t max_services
    cdef aff_t *aff
    cdef uint64_t aff_mask
    cdef uint8_t *bufs
    cdef Py_ssize_t *lens
    cdef uint8_t *verdicts
    cdef int batch
    cdef object _io0
    cdef list _workers             # IOWorkers, for their tx counters
    cdef public bint batch_prefetch    # stage lookups per batch (off only to measure it)
    # TUN queues a steering program spreads flows over by port (engine/steering.py):
    # a new flow's masquerade port is congruent to the client's source port
    # modulo this, so both directions of the flow reach the same queue
    cdef public uint32_t steer_queues

    def __cinit__(self):
        self.bufs = NULL
        self.lens = NULL
        self.verdicts = NULL
        self.lock = NULL
        self.svc_stats = NULL
        self.aff = NULL
        self.ct.active = NULL
        self.ct.entries = NULL
        self.ct.free_ids = NULL
        self.ct.slots = NULL

    def __init__(self, masquerade_ip, max_flows=262144, batch=64, seed=0x9E3779B9,
                 port_range=(1024, 65535), timeouts=None, Tables tables=None,
                 max_services=65536, max_backends=1 << 20, affinity_size=65536, icmp_rate=1000):
        cdef uint64_t asize = 16
        if max_flows < 1:
            raise ValueError("max_flows must be positive")
        if not (1 <= port_range[0] <= port_range[1] <= 65535):
            raise ValueError("bad SNAT port range")
        if not 1 <= max_services <= (1 << 24) or not 1 <= max_backends <= (1 << 26):
            raise ValueError("max_services must be 1..2^24, max_backends 1..2^26")
        ct_init(&self.ct, max_flows, max_backends)
        self.max_services = max_services
        self.icmp_rate = icmp_rate
        self.icmp_tokens = icmp_rate
        self.icmp_second = 0xffffffffU
        # per-service counters and active counts are touched once per new
        # flow at random: on huge pages where given, like the flow table
        self.svc_stats = <uint64_t *>big_alloc(<size_t>max_services * NSVC_STATS * sizeof(uint64_t))
        while asize < affinity_size:
            asize <<= 1
        self.aff = <aff_t *>calloc(asize, sizeof(aff_t))
        self.aff_mask = asize - 1
        if not self.svc_stats or not self.aff:
            raise MemoryError()
        self.masq = htonl(int(masquerade_ip))
        self.port_lo = port_range[0]
        self.port_range = port_range[1] - port_range[0] + 1
        self.rng = seed or 1
        self.batch = batch
        self.bufs = <uint8_t *>malloc(<size_t>batch * SLOT_SIZE)
        self.lens = <Py_ssize_t *>calloc(batch, sizeof(Py_ssize_t))
        self.verdicts = <uint8_t *>calloc(batch, 1)
        self.lock = PyThread_allocate_lock()
        if not self.bufs or not self.lens or not self.verdicts or not self.lock:
            raise MemoryError()
        self.set_timeouts(timeouts or {})
        self._workers = []
        self.batch_prefetch = True
        self.steer_queues = 1
        self._io0 = None
        self.tables = Tables([])
        if tables is not None:
            self.swap(tables)

    def __dealloc__(self):
        ct_free(&self.ct)
        if self.svc_stats != NULL:
            munmap(self.svc_stats, <size_t>self.max_services * NSVC_STATS * sizeof(uint64_t))
        free(self.aff)
        free(self.bufs)
        free(self.lens)
        free(self.verdicts)
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
        if tables.max_id > self.max_services:
            raise ValueError(f"service id {tables.max_id - 1} beyond max_services {self.max_services}")
        if tables.max_bid > self.ct.nactive:
            raise ValueError(f"backend id {tables.max_bid - 1} beyond max_backends {self.ct.nactive}")
        self.tables = tables

    @property
    def current_tables(self):
        return self.tables

    # -- the packet path ---------------------------------------------------

    # -- batch stages: prefetches ahead of process_one (hints, never answers) --

    cdef inline void stage_flows(self, Tables t, uint8_t *bufs, size_t stride, Py_ssize_t *lens,
                                 int n, int hdr, uint64_t *hashes, uint64_t *svs) noexcept nogil:
        """Stage 1, no lock needed: each packet's flow hash and home index
        slot, and for a packet that may open a flow, its service's slot."""
        cdef int i
        ct_prefetch_slots(&self.ct, bufs, stride, lens, n, hdr, hashes)
        for i in range(n):
            svs[i] = svc_peek_slot(bufs + <size_t>i * stride + hdr, lens[i] - hdr, t.svc_mask)
            if svs[i] != NO_SLOT:
                prefetch(&t.svc_slots[svs[i]])

    cdef inline void stage_entries(self, Tables t, uint64_t *hashes, uint64_t *svs, int n) noexcept nogil:
        """Stage 2, under the lock: the entries of tracked flows; for a packet
        whose flow is not in the table (its home slot is empty), its service,
        then that service's backends and counters: a new flow's chain of
        misses, spread over the batch."""
        cdef int i
        cdef size_t j
        cdef uint32_t si
        cdef svc_t *sv
        ct_prefetch_entries(&self.ct, hashes, n)
        for i in range(n):
            if svs[i] == NO_SLOT:
                continue
            si = t.svc_slots[svs[i]].svc
            if si == EMPTY or self.ct.slots[hashes[i] & self.ct.mask] != 0:
                svs[i] = NO_SLOT
                continue
            svs[i] = si
            prefetch(&t.svcs[si])
        cdef backend_t *b
        for i in range(n):
            if svs[i] == NO_SLOT:
                continue
            sv = &t.svcs[svs[i]]
            if sv.backend_count:
                b = &t.backends[sv.backend_start]
                for j in range(0, min(sv.backend_count, 16) * sizeof(backend_t), 64):
                    prefetch(<uint8_t *>b + j)
            else:
                svs[i] = NO_SLOT
            if sv.id < self.max_services:
                prefetch_w(&self.svc_stats[sv.id * NSVC_STATS])
        for i in range(n):          # active-flow counts: a service's backend ids are near each other
            if svs[i] != NO_SLOT:
                b = &t.backends[t.svcs[svs[i]].backend_start]
                if b.id < self.ct.nactive:
                    prefetch_w(&self.ct.active[b.id])

    cdef int process_one(self, Tables t, uint8_t *p, Py_ssize_t n, uint32_t now,
                         Py_ssize_t *outlen, bint partial, uint64_t h=0) noexcept nogil:
        """Returns verdict | reason << 8; on V_FORWARD/V_REPLY, *outlen is set.
        h: peek_hash of p when the caller has it (0: compute here)."""
        cdef Py_ssize_t ihl, tot, l4len, doff
        cdef uint8_t *l4
        cdef uint8_t proto, th = 0
        cdef flow_key_t k, rk
        cdef int64_t ref, id
        cdef int dir
        cdef ct_entry_t *e
        cdef flow_key_t *other
        cdef svc_t *sv
        cdef backend_t *b
        cdef uint32_t i, start, port, q, first, count

        self.cnt[C_RX_PACKETS] += 1
        self.cnt[C_RX_BYTES] += n
        # 1. parse: check every length once, then read freely
        if n < IP_MIN_HLEN:
            return self.drop(R_MALFORMED)
        if (p[IP_VER_IHL] >> 4) != 4:
            return self.drop(R_UNSUPPORTED)
        ihl = (p[IP_VER_IHL] & 0x0f) * 4
        tot = be16(p + IP_TOTLEN)
        if ihl < IP_MIN_HLEN or tot < ihl or tot > n:
            return self.drop(R_MALFORMED)
        if be16(p + IP_FRAG) & 0x3fff:          # MF set or offset != 0
            return self.drop(R_FRAGMENT)
        proto = p[IP_PROTO]
        l4 = p + ihl
        l4len = tot - ihl
        if proto == PROTO_TCP:
            if l4len < TCP_MIN_HLEN:
                return self.drop(R_MALFORMED)
            doff = (l4[TCP_DOFF] >> 4) * 4
            if doff < TCP_MIN_HLEN or doff > l4len:
                return self.drop(R_MALFORMED)
            th = l4[TCP_FLAGS]
        elif proto == PROTO_UDP:
            if l4len < UDP_HLEN or be16(l4 + UDP_LEN) < UDP_HLEN or be16(l4 + UDP_LEN) > l4len:
                return self.drop(R_MALFORMED)
        elif proto == PROTO_ICMP:
            return self.icmp(t, p, l4, tot, l4len, now, outlen)
        else:
            return self.drop(R_UNSUPPORTED)
        k.saddr = ld32(p + IP_SRC)
        k.daddr = ld32(p + IP_DST)
        k.sport = ld16(l4 + L4_SPORT)
        k.dport = ld16(l4 + L4_DPORT)
        k.proto = proto
        k.family = 4
        k.pad = 0

        # 2. a tracked flow, either direction
        ref = ct_find_h(&self.ct, &k, h if h else flow_hash(&k))
        if ref >= 0:
            e = &self.ct.entries[ref >> 1]
            if e.expires <= now:
                ct_remove(&self.ct, <uint32_t>(ref >> 1))
                self.cnt[C_FLOWS_EXPIRED] += 1
                ref = -1
            elif (proto == PROTO_TCP and (ref & 1) == DIR_ORIG
                  and (th & (TH_SYN | TH_ACK | TH_RST)) == TH_SYN
                  and (e.state == CT_TIME_WAIT or e.state == CT_CLOSE)):
                ct_remove(&self.ct, <uint32_t>(ref >> 1))     # port reuse: a new connection
                ref = -1
        if ref >= 0:
            dir = ref & 1
            other = &e.key[1 - dir]
            nat_rewrite(p, l4, proto, other.daddr, other.dport, other.saddr, other.sport, partial)
            if proto == PROTO_TCP:
                e.state = tcp_next_state(e.state, &e.flags, dir, th)
                if e.state == CT_TIME_WAIT or e.state == CT_CLOSE:
                    ct_deactivate(&self.ct, e)
            elif dir == DIR_REPLY:
                e.state = CT_UDP_ASSURED
            e.expires = now + self.timeouts[e.state]
            self.svc_stats[e.svc * NSVC_STATS + S_PACKETS] += 1
            self.svc_stats[e.svc * NSVC_STATS + S_BYTES] += tot
            outlen[0] = tot
            return V_FORWARD

        # 3. a new flow: which service? (address 0 is the node-port key: it
        # must be reached through a node address, never as a destination)
        sv = t.lookup(k.daddr, k.dport, proto) if k.daddr != 0 else NULL
        if sv == NULL and t.nnode and t.is_node_addr(k.daddr):
            sv = t.lookup(0, k.dport, proto)
        if sv == NULL:
            if t.is_vip(k.daddr) or (t.nnode and t.is_node_addr(k.daddr)):
                # a live VIP on a port it does not serve, or a node address
                # on a node port nobody has: refused, as the kernel would
                return self.reject(p, tot, now, outlen)
            if k.daddr == self.masq:
                return self.drop(R_SPOOFED)
            if t.in_drop_cidrs(k.daddr):
                return self.drop(R_UNALLOCATED)
            return self.drop(R_NO_SERVICE)
        if (sv.flags & SVC_F_SOURCE_RANGES) and not t.source_allowed(sv, k.saddr):
            self.svc_stats[sv.id * NSVC_STATS + S_DENIED] += 1
            return self.drop(R_SOURCE_DENIED)
        if sv.backend_count == 0:
            self.svc_stats[sv.id * NSVC_STATS + S_REJECTS] += 1
            return self.reject(p, tot, now, outlen)
        if proto == PROTO_TCP and (th & (TH_SYN | TH_ACK | TH_RST | TH_FIN)) != TH_SYN:
            return self.drop(R_NOT_SYN)

        # 4. scheduler, then a free SNAT port for the reply tuple
        b = self.schedule(t, sv, &k, now)
        rk.saddr = b.addr
        rk.daddr = self.masq
        rk.sport = b.port
        rk.proto = proto
        rk.family = 4
        rk.pad = 0
        # the ports of the range congruent to the client's port (all of them
        # when there is no steering): first, first + q, ... count of them
        q = self.steer_queues if self.steer_queues else 1
        first = self.port_lo + (ntohs(k.sport) % q + q - self.port_lo % q) % q
        count = (self.port_lo + self.port_range - 1 - first) // q + 1 if first < self.port_lo + self.port_range else 0
        if count == 0:
            return self.drop(R_NAT_EXHAUSTED)
        start = xorshift32(&self.rng) % count
        for i in range(PORT_TRIES if PORT_TRIES < count else count):
            port = first + ((start + i) % count) * q
            rk.dport = htons(<uint16_t>port)
            if ct_find(&self.ct, &rk) < 0:
                break
        else:
            return self.drop(R_NAT_EXHAUSTED)
        id = ct_alloc(&self.ct, now, &self.cnt[C_FLOWS_EVICTED])
        if id < 0:
            return self.drop(R_TABLE_FULL)
        e = &self.ct.entries[id]
        e.key[DIR_ORIG] = k
        e.key[DIR_REPLY] = rk
        e.svc = sv.id
        e.backend = b.id
        e.flags = 0
        if b.id < self.ct.nactive:
            self.ct.active[b.id] += 1
            e.flags = CTF_ACTIVE
        self.svc_stats[sv.id * NSVC_STATS + S_FLOWS] += 1
        self.svc_stats[sv.id * NSVC_STATS + S_PACKETS] += 1
        self.svc_stats[sv.id * NSVC_STATS + S_BYTES] += tot
        e.state = CT_SYN_SENT if proto == PROTO_TCP else CT_UDP_UNREPLIED
        e.expires = now + self.timeouts[e.state]
        ct_index_add(&self.ct, <uint32_t>(id * 2))
        ct_index_add(&self.ct, <uint32_t>(id * 2 + 1))
        self.cnt[C_FLOWS_CREATED] += 1
        nat_rewrite(p, l4, proto, rk.daddr, rk.dport, rk.saddr, rk.sport, partial)
        outlen[0] = tot
        return V_FORWARD

    cdef int icmp(self, Tables t, uint8_t *p, uint8_t *l4, Py_ssize_t tot, Py_ssize_t l4len,
                  uint32_t now, Py_ssize_t *outlen) noexcept nogil:
        """ICMP: echo to a live service address is answered (as IPVS mode's
        bound VIPs are); an error about a tracked flow (unreachable, frag
        needed, time exceeded, parameter problem) is translated, inner header
        included, and sent on to the flow's other end."""
        cdef uint8_t typ, *inner, *il4
        cdef Py_ssize_t ilen, iihl
        cdef flow_key_t rk
        cdef flow_key_t *K
        cdef int64_t ref
        cdef ct_entry_t *e
        cdef uint32_t osrc, odst, isrc, idst
        cdef uint16_t ic, c, ipc
        cdef int csoff
        if l4len < ICMP_HLEN:
            return self.drop(R_MALFORMED)
        typ = l4[ICMP_TYPE]
        odst = ld32(p + IP_DST)
        osrc = ld32(p + IP_SRC)
        if typ == 8:                            # echo request
            if l4[ICMP_CODE] != 0 or not t.is_vip(odst):
                return self.drop(self.unmatched(t, odst))
            st32(p + IP_SRC, odst)              # swapping words keeps the header sum
            st32(p + IP_DST, osrc)
            ic = ld16(l4 + ICMP_TYPE)
            l4[ICMP_TYPE] = 0
            st16(l4 + ICMP_CSUM, csum_replace2(ld16(l4 + ICMP_CSUM), ic, ld16(l4 + ICMP_TYPE)))
            ic = ld16(p + IP_TTL)
            p[IP_TTL] = 64
            st16(p + IP_CSUM, csum_replace2(ld16(p + IP_CSUM), ic, ld16(p + IP_TTL)))
            outlen[0] = tot
            return V_REPLY
        if typ != 3 and typ != 11 and typ != 12:
            return self.drop(R_UNSUPPORTED)
        # the quoted datagram: one we sent, so it is already translated
        inner = l4 + ICMP_HLEN
        ilen = l4len - ICMP_HLEN
        if ilen < IP_MIN_HLEN or (inner[IP_VER_IHL] >> 4) != 4:
            return self.drop(R_MALFORMED)
        iihl = (inner[IP_VER_IHL] & 0x0f) * 4
        if iihl < IP_MIN_HLEN or ilen < iihl + 8:
            return self.drop(R_MALFORMED)
        if inner[IP_PROTO] != PROTO_TCP and inner[IP_PROTO] != PROTO_UDP:
            return self.drop(R_UNSUPPORTED)
        il4 = inner + iihl
        isrc = ld32(inner + IP_SRC)
        idst = ld32(inner + IP_DST)
        rk.saddr = idst                         # the reverse of what we sent
        rk.daddr = isrc
        rk.sport = ld16(il4 + L4_DPORT)
        rk.dport = ld16(il4 + L4_SPORT)
        rk.proto = inner[IP_PROTO]
        rk.family = 4
        rk.pad = 0
        ref = ct_find(&self.ct, &rk)
        # the error must be about a live flow and addressed to the quoted sender
        if ref < 0 or self.ct.entries[ref >> 1].expires <= now or odst != isrc:
            return self.drop(self.unmatched(t, odst))
        e = &self.ct.entries[ref >> 1]
        K = &e.key[1 - (ref & 1)]               # the packet as its sender sent it
        # inner header back to what the sender sent; each change also goes
        # into the ICMP checksum, which covers the quote
        ic = ld16(l4 + ICMP_CSUM)
        ipc = ld16(inner + IP_CSUM)
        c = csum_replace4(csum_replace4(ipc, isrc, K.saddr), idst, K.daddr)
        ic = csum_replace2(ic, ipc, c)
        st16(inner + IP_CSUM, c)
        ic = csum_replace4(csum_replace4(ic, isrc, K.saddr), idst, K.daddr)
        st32(inner + IP_SRC, K.saddr)
        st32(inner + IP_DST, K.daddr)
        csoff = TCP_CSUM if rk.proto == PROTO_TCP else UDP_CSUM
        if ilen >= iihl + csoff + 2:            # the L4 checksum is quoted
            c = ld16(il4 + csoff)
            if not (rk.proto == PROTO_UDP and c == 0):
                c = csum_replace4(csum_replace4(c, isrc, K.saddr), idst, K.daddr)
                c = csum_replace2(csum_replace2(c, ld16(il4 + L4_SPORT), K.sport), ld16(il4 + L4_DPORT), K.dport)
                if rk.proto == PROTO_UDP and c == 0:
                    c = 0xffff
                ic = csum_replace2(ic, ld16(il4 + csoff), c)
                st16(il4 + csoff, c)
        ic = csum_replace2(csum_replace2(ic, ld16(il4 + L4_SPORT), K.sport), ld16(il4 + L4_DPORT), K.dport)
        st16(il4 + L4_SPORT, K.sport)
        st16(il4 + L4_DPORT, K.dport)
        st16(l4 + ICMP_CSUM, ic)
        # outer: to the sender; from the far end's public face if it was the far end
        c = ld16(p + IP_CSUM)
        if osrc == idst:
            c = csum_replace4(c, osrc, K.daddr)
            st32(p + IP_SRC, K.daddr)
        c = csum_replace4(c, odst, K.saddr)
        st32(p + IP_DST, K.saddr)
        st16(p + IP_CSUM, c)
        self.svc_stats[e.svc * NSVC_STATS + S_PACKETS] += 1
        self.svc_stats[e.svc * NSVC_STATS + S_BYTES] += tot
        outlen[0] = tot
        return V_FORWARD

    cdef inline int unmatched(self, Tables t, uint32_t daddr) noexcept nogil:
        """Drop reason for a packet that opens nothing and matches no flow."""
        if daddr == self.masq:
            return R_SPOOFED
        if t.in_drop_cidrs(daddr):
            return R_UNALLOCATED
        return R_NO_SERVICE

    cdef inline backend_t *schedule(self, Tables t, svc_t *sv, flow_key_t *k, uint32_t now) noexcept nogil:
        """The backend for a new flow of sv (backend_count > 0)."""
        cdef uint32_t n = sv.backend_count, i, j, start, idx = 0xffffffffU
        cdef backend_t *bs = t.backends + sv.backend_start
        cdef aff_t *a = NULL
        cdef uint32_t *act = self.ct.active
        if sv.flags & SVC_F_AFFINITY:
            a = self.aff_slot(sv.id, k.saddr, now)
            if a.svc == sv.id + 1 and a.client == k.saddr:
                for i in range(n):
                    if bs[i].addr == a.addr and bs[i].port == a.port:
                        idx = i
                        break
        if idx == 0xffffffffU:
            if sv.scheduler == SCHED_RR:
                idx = sv.rr % n
                sv.rr += 1
            elif sv.scheduler == SCHED_LC:
                # fewest flows, ties broken from a random start
                start = xorshift32(&self.rng) % n
                idx = start
                for j in range(1, n):
                    i = (start + j) % n
                    if act[bs[i].id] < act[bs[idx].id]:
                        idx = i
            elif sv.scheduler == SCHED_SH:
                idx = mix64(k.saddr) % n
            elif sv.scheduler == SCHED_MH:
                idx = t.mh[sv.mh_start + mix64((<uint64_t>k.saddr << 16) | k.sport) % sv.mh_size]
            else:
                idx = xorshift32(&self.rng) % n
        if a != NULL:
            a.svc = sv.id + 1
            a.client = k.saddr
            a.addr = bs[idx].addr
            a.port = bs[idx].port
            a.expires = now + sv.affinity_timeout
        return &bs[idx]

    cdef inline aff_t *aff_slot(self, uint32_t svc, uint32_t client, uint32_t now) noexcept nogil:
        """The live slot of (svc, client), else the slot to take for it."""
        cdef uint64_t h = mix64((<uint64_t>svc << 32) | client) & self.aff_mask
        cdef aff_t *a
        cdef aff_t *victim = NULL
        cdef uint32_t i
        for i in range(AFF_PROBE):
            a = &self.aff[(h + i) & self.aff_mask]
            if a.svc == svc + 1 and a.client == client:
                if a.expires > now:
                    return a
                a.svc = 0               # expired: as good as empty
            if a.svc == 0 or a.expires <= now:
                if victim == NULL or victim.svc != 0:
                    victim = a
            elif victim == NULL or (victim.svc != 0 and a.expires < victim.expires):
                victim = a
        victim.svc = 0
        return victim

    cdef inline int drop(self, int reason) noexcept nogil:
        self.cnt[C_DROPS] += 1
        self.cnt[C_DROP_BASE + reason] += 1
        return V_DROP | (reason << 8)

    cdef inline int reject(self, uint8_t *p, Py_ssize_t tot, uint32_t now, Py_ssize_t *outlen) noexcept nogil:
        # no ICMP error to 0/8, loopback, multicast or broadcast sources
        if p[IP_SRC] == 0 or p[IP_SRC] == 127 or p[IP_SRC] >= 224:
            return self.drop(R_MARTIAN)
        # at most icmp_rate errors a second: refused clients still see
        # "connection refused" at once, but the engine is no reflector
        if now != self.icmp_second:
            self.icmp_second = now
            self.icmp_tokens = self.icmp_rate
        if self.icmp_tokens == 0:
            return self.drop(R_ICMP_RATE)
        self.icmp_tokens -= 1
        self.cnt[C_REJECTS] += 1
        outlen[0] = build_port_unreachable(p, tot)
        return V_REPLY

    # -- I/O ---------------------------------------------------------------

    def run_io(self, int fd, int timeout_ms=100):
        """One batch on fd with the first worker's buffers (single queue)."""
        if self._io0 is None:
            self._io0 = IOWorker(self, vnet=False)
        return self._io0.run(fd, timeout_ms)

    def process(self, const uint8_t[:] pkt, double now, bint partial=False):
        """In-memory path for tests: returns (verdict, reason, out bytes|None).
        partial: treat the L4 checksum as CHECKSUM_PARTIAL (vnet NEEDS_CSUM)."""
        cdef Py_ssize_t n = pkt.shape[0], outlen = 0
        cdef int r
        if n > SLOT_SIZE:
            raise ValueError("packet larger than a slot")
        if n:
            memcpy(self.bufs, &pkt[0], n)
        with nogil:
            PyThread_acquire_lock(self.lock, WAIT_LOCK)
            r = self.process_one(self.tables, self.bufs, n, <uint32_t>now, &outlen, partial)
            PyThread_release_lock(self.lock)
        verdict = r & 0xff
        out = PyBytes_FromStringAndSize(<char *>self.bufs, outlen) if verdict != V_DROP else None
        return (("drop", "forward", "reply")[verdict], DROP_REASONS[r >> 8], out)

    def process_batch(self, list pkts, double now, int repeat=1):
        """For benchmarks: copy each packet into a slot and process it, `repeat`
        times over; returns the number forwarded."""
        cdef Tables t = self.tables
        cdef int npk = len(pkts), rep, i, fwd = 0
        cdef Py_ssize_t outlen
        cdef uint32_t tnow = <uint32_t>now
        if npk > self.batch:
            raise ValueError("more packets than batch slots")
        cdef uint8_t *src = <uint8_t *>malloc(<size_t>npk * SLOT_SIZE)
        cdef Py_ssize_t *srclen = <Py_ssize_t *>malloc(npk * sizeof(Py_ssize_t))
        cdef uint64_t *hashes = <uint64_t *>malloc(max(1, npk) * 2 * sizeof(uint64_t))
        cdef uint64_t *svs = hashes + max(1, npk)
        for i, pk in enumerate(pkts):
            srclen[i] = len(pk)
            memcpy(src + <size_t>i * SLOT_SIZE, <char *>pk, srclen[i])
        with nogil:
            PyThread_acquire_lock(self.lock, WAIT_LOCK)
            for rep in range(repeat):
                for i in range(npk):
                    memcpy(self.bufs + <size_t>i * SLOT_SIZE, src + <size_t>i * SLOT_SIZE, srclen[i])
                # the same two stages as IOWorker.run
                if self.batch_prefetch:
                    self.stage_flows(t, self.bufs, SLOT_SIZE, srclen, npk, 0, hashes, svs)
                    self.stage_entries(t, hashes, svs, npk)
                else:
                    memset(hashes, 0, npk * sizeof(uint64_t))
                for i in range(npk):
                    if self.process_one(t, self.bufs + <size_t>i * SLOT_SIZE, srclen[i], tnow, &outlen, False, hashes[i]) & 0xff:
                        fwd += 1
            PyThread_release_lock(self.lock)
        free(src)
        free(srclen)
        free(hashes)
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
            if not 0 <= i < self.max_services:
                raise ValueError(f"service id {i} out of range")
            out[i] = {name: self.svc_stats[<size_t>i * NSVC_STATS + j]
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
                    "svc": e.svc,
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
        unknown service counts into the last id, an unknown backend into
        none). Records that are malformed, expired or clash with a flow
        already here are skipped. Returns how many were taken."""
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
                if (rec.state == CT_FREE or rec.state >= CT_NSTATES or rec.expires <= elapsed
                        or rec.key[0].proto != rec.key[1].proto
                        or (rec.key[0].proto != PROTO_TCP and rec.key[0].proto != PROTO_UDP)):
                    continue
                rec.key[0].family = rec.key[1].family = 4
                rec.key[0].pad = rec.key[1].pad = 0
                if ct_find(&self.ct, &rec.key[0]) >= 0 or ct_find(&self.ct, &rec.key[1]) >= 0:
                    continue
                # map the ids before taking an entry: a bad map must not leave one half-made
                svc = svc_ids.get(rec.svc, self.max_services - 1)
                bid = backend_ids.get(rec.backend, 0xffffffff)
                if not (isinstance(svc, int) and 0 <= svc < self.max_services):
                    svc = self.max_services - 1
                if not (isinstance(bid, int) and 0 <= bid < self.ct.nactive):
                    bid = 0xffffffff
                if self.ct.nfree == 0:
                    break
                id = ct_alloc(&self.ct, tnow, &dummy)
                if id < 0:
                    break
                e = &self.ct.entries[id]
                e[0] = rec
                e.expires = tnow + rec.expires - elapsed
                e.svc = svc
                e.backend = bid
                e.flags &= ~CTF_ACTIVE
                if e.backend < self.ct.nactive and e.state != CT_TIME_WAIT and e.state != CT_CLOSE:
                    self.ct.active[e.backend] += 1
                    e.flags |= CTF_ACTIVE
                ct_index_add(&self.ct, <uint32_t>(id * 2))
                ct_index_add(&self.ct, <uint32_t>(id * 2 + 1))
                taken += 1
        finally:
            PyThread_release_lock(self.lock)
        return taken

    def expire(self, double now, uint32_t budget=0xffffffff):
        """Sweep expired flows (tests pass their own clock)."""
        PyThread_acquire_lock(self.lock, WAIT_LOCK)
        r = ct_sweep(&self.ct, <uint32_t>now, budget)
        PyThread_release_lock(self.lock)
        self.cnt[C_FLOWS_EXPIRED] += r
        return r


cdef tuple _key_tuple(flow_key_t *k):
    return (ntohl(k.saddr), ntohs(k.sport), ntohl(k.daddr), ntohs(k.dport))


def _monotonic():
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec / 1e9


def monotonic():
    """The dataplane clock (CLOCK_MONOTONIC seconds)."""
    return _monotonic()


ENTRY_BYTES = sizeof(ct_entry_t)
EXPORT_CHUNK_FLOWS = EXPORT_CHUNK      # flows per lock hold of export_flows (tests span several)
