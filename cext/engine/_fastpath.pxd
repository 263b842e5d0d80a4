# Declarations of engine._fastpath: the structs, the enums the .pxi files
# share, and the classes, so that no file relies on another's being included
# first. (Cython finds a module's .pxd by its qualified name on the include
# path: engine._fastpath -> cext/engine/_fastpath.pxd.)
#
# "svcport" is one service port: the (address, port, protocol) a new flow is
# opened to, as a compiled table row. engine/refpath.py mirrors the numbers
# here; tests/unit/test_fixtures.py holds them to it and to engine/model.py.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from cpython.pythread cimport PyThread_type_lock
cimport cython


# -- verdicts, drop reasons, counters -------------------------------------------

cdef enum:
    V_DROP = 0
    V_FORWARD = 1               # rewritten in place, write back
    V_REPLY = 2                 # replaced by a packet of ours (ICMP), write back

# Drop reasons; a counter each (DROP_REASONS names them in this order).
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
    R_OVERLOAD = 13             # a new flow from an unknown source while the engine is behind, over admit_rate
    R_NREASONS = 14

# Dataplane counters (COUNTERS names them in this order), then one per reason.
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
    C_FLOWS_REFUSED             # snapshot records import_flows refused (malformed, ids out of range)
    C_DROP_BASE
    C_NCOUNTERS = C_DROP_BASE + R_NREASONS

# Per service-port counters, NSVCPORT_STATS per stable service-port id.
cdef enum:
    S_PACKETS = 0
    S_BYTES = 1
    S_FLOWS = 2
    S_REJECTS = 3
    S_DENIED = 4
    NSVCPORT_STATS = 5


# -- service-port tables (tables.pxi, sched.pxi) -------------------------------------

cdef enum:
    SVCPORT_F_SOURCE_RANGES = 1     # only sources within ranges[] may open flows
    SVCPORT_F_AFFINITY = 2          # sessionAffinity: ClientIP

# Schedulers (IPVS names; SCHEDULER_IDS maps the names engine/model.py lists).
cdef enum:
    SCHED_RANDOM = 0            # kube-proxy iptables/nftables mode
    SCHED_RR = 1                # round robin
    SCHED_LC = 2                # fewest active flows
    SCHED_SH = 3                # source (client address) hash
    SCHED_MH = 4                # Maglev hashing on client address and port

cdef enum:
    MAGLEV_SLOTS = 65537        # prime; > 100 x backends keeps the spread within 1%
    MAGLEV_MAX_BACKENDS = 65534 # 0xffff marks a free ring slot while filling
    NO_SLOT = 0xffffffff        # svcport_peek_slot: the packet opens no flow worth staging

ctypedef struct svcport_slot_t:
    uint64_t key                # vip << 32 | port << 8 | proto, all raw
    uint32_t row                # index into svcports, EMPTY when unused
    uint32_t pad

ctypedef struct svcport_t:
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

# sessionAffinity: ClientIP, the last backend of (service port, client), as
# iptables' `recent` list or IPVS persistence keeps it. Open addressing with
# a bounded probe; when all probed slots are live the oldest is replaced.
# A source's port-unreachable budget for the current second (icmp.pxi)
ctypedef struct icmp_budget_t:
    uint32_t addr               # raw; the slot is this source's while addr matches
    uint32_t second
    uint32_t tokens

ctypedef struct aff_t:
    uint32_t svcport            # stable service-port id + 1; 0 = empty
    uint32_t client             # raw
    uint32_t addr               # backend, raw
    uint16_t port
    uint16_t pad
    uint32_t expires

cdef enum:
    AFF_PROBE = 8


# -- connection tracking (conntrack.pxi) --------------------------------------------

ctypedef struct flow_key_t:
    # IPv4 now; IPv6 gets a wider key of its own with the same layout rules.
    uint32_t saddr              # raw
    uint32_t daddr
    uint16_t sport
    uint16_t dport
    uint8_t proto
    uint8_t family              # 4
    uint16_t pad

ctypedef struct ct_entry_t:     # 48 bytes; export_flows' record, byte for byte
    flow_key_t key[2]           # [DIR_ORIG], [DIR_REPLY]
    uint32_t expires            # seconds on the dataplane clock
    uint32_t svcport            # stable service-port id (control plane's), for stats
    uint32_t backend            # stable backend id: active-flow counts (lc)
    uint8_t state
    uint8_t flags
    uint16_t pad

cdef enum:
    DIR_ORIG = 0
    DIR_REPLY = 1

# Connection states; the timeouts array is indexed by these (STATE_NAMES).
cdef enum:
    CT_FREE = 0
    CT_SYN_SENT = 1
    CT_SYN_RECV = 2
    CT_ESTABLISHED = 3
    CT_FIN_WAIT = 4
    CT_CLOSE_WAIT = 5
    CT_TIME_WAIT = 6
    CT_CLOSE = 7
    CT_UDP_UNREPLIED = 8
    CT_UDP_ASSURED = 9
    CT_NSTATES = 10

cdef enum:
    CTF_FIN_ORIG = 1
    CTF_FIN_REPLY = 2
    CTF_ACTIVE = 4              # counted in active[backend]: open, not yet closing (IPVS ActiveConn)

cdef struct conntrack_t:
    ct_entry_t *entries
    uint32_t max
    uint32_t count
    uint32_t *free_ids          # stack of free entry ids
    uint32_t nfree
    uint64_t *slots             # hash32 << 32 | (id*2 + dir + 1); 0 = empty
    uint64_t mask
    uint32_t hand               # clock hand for sweeping and eviction
    uint32_t *active            # flows per backend id, kept by alloc/remove
    uint32_t nactive


# -- a parsed packet (parse.pxi) ---------------------------------------------------

# Every length a later step reads within is checked once, by pkt_parse; the
# batch stages and then the packet path read the same view.
ctypedef struct pkt_t:
    uint8_t *p                  # the IPv4 header
    uint8_t *l4                 # its payload: the TCP, UDP or ICMP header
    Py_ssize_t n                # bytes read
    Py_ssize_t tot              # IPv4 total length, <= n
    Py_ssize_t l4len            # tot - header length
    uint64_t hash               # flow_hash(key) of TCP/UDP, else 0
    flow_key_t key              # TCP/UDP: (saddr, daddr, sport, dport, proto), raw
    uint8_t proto
    uint8_t th                  # TCP flags; 0 for anything else
    uint8_t reason              # R_NONE: a checked TCP, UDP or ICMP datagram; else why it drops


cdef enum:
    SLOT_SIZE = 65536           # one IPv4 datagram at most
    EXPORT_CHUNK = 4096         # flows examined per lock hold by export_flows (~0.2 ms)
    IO_SLOT = 65536 + 16        # ... plus a virtio-net header
    ICMP_QUOTE_MAX = 548        # RFC 1812: error messages stay within 576 bytes
    PORT_TRIES = 512            # bounded search for a free SNAT port
    RECLAIM_AFTER = 8           # search tries after which a half-open flow's port is taken
    ICMP_SOURCE_SLOTS = 1024    # per-source port-unreachable budgets (direct-mapped)
    KNOWN_BITS_LOG2 = 19        # sources that completed a TCP handshake: bits per generation
    KNOWN_PERIOD = 120          # seconds per generation (a source stays known 120-240 s)


@cython.final
cdef class Tables:
    cdef svcport_slot_t *svcport_slots  # (vip, port, proto) -> row, open addressing
    cdef uint64_t svcport_mask
    cdef svcport_t *svcports            # one row per service port
    cdef uint32_t nsvcports
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
    cdef uint16_t *mh               # Maglev rings, indexes into each service port's backends
    cdef uint32_t nmh               # rings in mh
    cdef uint64_t max_id            # largest service-port id + 1
    cdef uint64_t max_bid           # largest backend id + 1
    cdef readonly object names      # service-port names, index = row

    cdef int alloc_backends(self, uint32_t nb, uint32_t nmh) except -1
    cdef int put_backends(self, uint32_t row, rows, uint32_t *b, uint32_t *m, Tables old) except -1
    cdef svcport_t *lookup(self, uint32_t addr, uint16_t port, uint8_t proto) noexcept nogil
    cdef bint is_vip(self, uint32_t addr) noexcept nogil
    cdef bint is_node_addr(self, uint32_t addr) noexcept nogil
    cdef bint in_drop_cidrs(self, uint32_t addr) noexcept nogil
    cdef bint source_allowed(self, const svcport_t *sv, uint32_t addr) noexcept nogil


@cython.final
cdef class Dataplane:
    cdef conntrack_t ct
    cdef Tables tables
    cdef uint32_t masq              # raw
    cdef uint32_t port_lo, port_range
    cdef uint32_t timeouts[CT_NSTATES]
    cdef uint32_t rng
    cdef uint64_t cnt[C_NCOUNTERS]
    cdef PyThread_type_lock lock    # conntrack: batch vs. control-plane calls
    cdef uint32_t icmp_rate, icmp_tokens, icmp_second
    cdef uint32_t icmp_source_rate  # ... and at most this many to one source a second
    cdef icmp_budget_t icmp_sources[ICMP_SOURCE_SLOTS]
    # Admission under overload (a SYN flood from random sources): sources
    # that completed a TCP handshake lately are known (two generations of a
    # bitmap by address hash); while the I/O loop is behind (its last read
    # filled a batch), new flows from other sources get admit_rate a second
    cdef uint64_t *known[2]
    cdef uint32_t known_epoch
    cdef public bint overloaded
    cdef uint32_t admit_rate, admit_tokens, admit_second
    cdef uint64_t *svcport_stats    # NSVCPORT_STATS per stable service-port id
    cdef uint32_t max_svcports
    cdef aff_t *aff
    cdef uint64_t aff_mask
    cdef uint8_t *bufs              # process() and process_batch(): batch slots
    cdef int batch
    cdef list _workers              # IOWorkers, for their tx counters
    cdef public bint batch_prefetch # stage lookups per batch (off only to measure it)
    # TUN queues a steering program spreads flows over by port (engine/steering.py):
    # a new flow's masquerade port is congruent to the client's source port
    # modulo this, so both directions of the flow reach the same queue
    cdef public uint32_t tun_queues


@cython.final
cdef class IOWorker:
    cdef Dataplane dp
    cdef uint8_t *bufs
    cdef Py_ssize_t *lens
    cdef uint8_t *verdicts
    cdef pkt_t *pkts            # the batch parsed (stage 1)
    cdef uint64_t *rows         # per packet: service-port slot, then row (prefetch stages)
    cdef int batch
    cdef int hdr                # VNET_HDR_LEN when the TUN has IFF_VNET_HDR, else 0
    cdef uint64_t tx[3]         # packets, bytes, write errors (per worker: no lock)
    cdef readonly uint64_t rx_packets   # read from this worker's queue
