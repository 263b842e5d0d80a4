"""engine.refpath: the packet semantics of engine._fastpath, in plain Python.

This is the specification the Cython fast path (cext/fastpath.pyx) is held to:
the same public API (Tables, Dataplane and the exported name tuples), the same
parse checks and drop reasons in the same order, the same connection tracking,
the same RNG draws and the same bytes out. The packet fixtures in tests/unit
run against both modules and compare their outputs byte for byte.

Where the C code makes a choice for speed that is observable (which free entry
id is taken next, where the clock hand stands, how many entries an eviction
looks at) this module makes the same choice, so that even eviction matches.
Some hashes are observable too and are computed exactly as in C, on the raw
(network bytes loaded little-endian) values: the sh and mh schedulers, the
Maglev ring, the session-affinity table with its probe, victim and expiry
rules. What is not observable (the flow index and the service lookup) is
replaced by the obvious Python thing: dicts of tuples.

Where the C code would crash or hang on an argument it does not check
(maglev_table with a size < 2 or one that is not prime) this module raises
instead.

Addresses and ports are host-order ints throughout; checksums are computed on
big-endian 16-bit words, which gives the same bytes as the C code's
native-order arithmetic (the one's-complement sum is byte-order independent).

Stands alone: imports nothing from engine._fastpath and nothing outside the
standard library.
"""
import copy
import struct
import time

__all__ = ["Tables", "Dataplane", "DROP_REASONS", "COUNTERS", "SERVICE_COUNTERS",
           "STATE_NAMES", "DEFAULT_TIMEOUTS", "MAGLEV_SIZE", "ENTRY_BYTES", "SCHEDULER_IDS",
           "PROTOCOLS", "PROTO_NAMES", "maglev_table", "mix64", "monotonic"]

# --- header offsets (RFC 791, 793, 768, 792) ---------------------------------

# IPv4 header
IP_VER_IHL = 0
IP_TOS = 1
IP_TOTLEN = 2
IP_ID = 4
IP_FRAG = 6
IP_TTL = 8
IP_PROTO = 9
IP_CSUM = 10
IP_SRC = 12
IP_DST = 16
IP_MIN_HLEN = 20

# TCP / UDP / ICMP, offsets from the start of the L4 header
L4_SPORT = 0
L4_DPORT = 2
TCP_DOFF = 12
TCP_FLAGS = 13
TCP_CSUM = 16
TCP_MIN_HLEN = 20
UDP_LEN = 4
UDP_CSUM = 6
UDP_HLEN = 8
ICMP_TYPE = 0
ICMP_CODE = 1
ICMP_CSUM = 2
ICMP_ID = 4
ICMP_HLEN = 8

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTOCOLS = {"TCP": PROTO_TCP, "UDP": PROTO_UDP}     # those a service port may have
PROTO_NAMES = {PROTO_ICMP: "icmp", PROTO_TCP: "tcp", PROTO_UDP: "udp"}    # those the fast path parses

TH_FIN = 0x01
TH_SYN = 0x02
TH_RST = 0x04
TH_ACK = 0x10

SLOT_SIZE = 65536           # one IPv4 datagram at most
ICMP_QUOTE_MAX = 548        # RFC 1812: error messages stay within 576 bytes
PORT_TRIES = 512            # bounded search for a free SNAT port
RECLAIM_AFTER = 8           # search tries after which a half-open flow's port is taken
ICMP_SOURCE_SLOTS = 1024    # per-source port-unreachable budgets (direct-mapped)
KNOWN_BITS_LOG2 = 19        # sources that completed a TCP handshake: bits per generation
KNOWN_PERIOD = 120          # seconds per generation (a source stays known 120-240 s)
EVICT_SCAN = 256            # entries an eviction looks at, at most

# --- verdicts, drop reasons, counters, states ----------------------------------

VERDICTS = ("drop", "forward", "reply")

DROP_REASONS = ("none", "malformed", "unsupported", "fragment", "no_service",
                "unallocated", "not_syn", "table_full", "nat_exhausted",
                "spoofed", "source_denied", "martian", "icmp_rate", "overload")

COUNTERS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "flows_created",
            "flows_expired", "flows_evicted", "rejects", "write_errors", "drops",
            "flows_refused")

# Per-service counters, one row per stable service id
SERVICE_COUNTERS = ("packets", "bytes", "flows", "rejects", "denied")
S_PACKETS, S_BYTES, S_FLOWS, S_REJECTS, S_DENIED = range(5)

# Schedulers (IPVS names), in the order engine/model.py lists the names
SCHED_RANDOM = 0            # kube-proxy iptables/nftables mode
SCHED_RR = 1                # round robin
SCHED_LC = 2                # fewest active flows
SCHED_SH = 3                # source (client address) hash
SCHED_MH = 4                # Maglev hashing on client address and port
SCHEDULER_IDS = {"random": SCHED_RANDOM, "rr": SCHED_RR, "lc": SCHED_LC, "sh": SCHED_SH,
                 "mh": SCHED_MH}

MAGLEV_SIZE = 65537         # prime; > 100 x backends keeps the spread within 1%
MAGLEV_MAX_BACKENDS = 65534 # 0xffff marks a free ring slot while filling

# sessionAffinity: ClientIP table: bounded probe from the hashed slot
AFF_PROBE = 8

STATE_NAMES = ("FREE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT",
               "CLOSE_WAIT", "TIME_WAIT", "CLOSE", "UNREPLIED", "ASSURED")

# Default timeouts per state, seconds (kube-proxy's sysctls where it sets them)
DEFAULT_TIMEOUTS = {
    "SYN_SENT": 120, "SYN_RECV": 60, "ESTABLISHED": 86400, "FIN_WAIT": 120,
    "CLOSE_WAIT": 3600, "TIME_WAIT": 120, "CLOSE": 10, "UNREPLIED": 30,
    "ASSURED": 120,
}

(CT_FREE, CT_SYN_SENT, CT_SYN_RECV, CT_ESTABLISHED, CT_FIN_WAIT, CT_CLOSE_WAIT,
 CT_TIME_WAIT, CT_CLOSE, CT_UDP_UNREPLIED, CT_UDP_ASSURED) = range(10)

# Eviction takes these before anything established.
UNESTABLISHED = frozenset((CT_SYN_SENT, CT_SYN_RECV, CT_UDP_UNREPLIED, CT_CLOSE))

# Entry flags: FIN seen, per direction; counted in the backend's active flows
# (open, not yet closing: IPVS ActiveConn)
CTF_FIN_ORIG = 1
CTF_FIN_REPLY = 2
CTF_ACTIVE = 4

# export_flows() / import_flows() records: the C module's ct_entry_t, byte for
# byte (x86-64): two flow keys (saddr, daddr, sport, dport in network order,
# proto, family, pad), then expires, svc, backend, state, flags, pad.
_KEY = struct.Struct("!IIHH")
_KEY_TAIL = struct.Struct("<BBH")
_ENTRY_TAIL = struct.Struct("<IIIBBH")
ENTRY_BYTES = 2 * (_KEY.size + _KEY_TAIL.size) + _ENTRY_TAIL.size      # 48

DIR_ORIG = 0
DIR_REPLY = 1

U32 = 0xffffffff
U64 = 0xffffffffffffffff


def monotonic():
    """The dataplane clock (CLOCK_MONOTONIC seconds)."""
    return time.monotonic()


# --- checksums (RFC 1071, RFC 1624) -------------------------------------------

def _fold(s):
    s = (s & 0xffff) + (s >> 16)
    s = (s & 0xffff) + (s >> 16)
    return s


def csum_replace2(check, old, new):
    """HC' = ~(~HC + ~m + m') for one 16-bit word."""
    return ~_fold((~check & 0xffff) + (~old & 0xffff) + new) & 0xffff


def csum_replace4(check, old, new):
    """The same for a 32-bit field, as two 16-bit words."""
    s = (~check & 0xffff)
    s += (~old & 0xffff) + (~(old >> 16) & 0xffff)
    s += (new & 0xffff) + (new >> 16)
    return ~_fold(s) & 0xffff


def csum_full(data):
    """Internet checksum of a buffer (odd length: padded with a zero byte)."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff


# --- hashing -------------------------------------------------------------------
#
# The C code hashes "raw" values: network-order header bytes loaded as native
# (little-endian) integers. Hashes are observable (which backend sh and mh
# pick, which affinity slot a client gets), so those values are rebuilt here.

def raw32(addr):
    """A host-order IPv4 address as the C code holds it (ld32 of its bytes)."""
    return int.from_bytes(addr.to_bytes(4, "big"), "little")


def raw16(port):
    """A host-order port as the C code holds it (ld16 of its bytes)."""
    return ((port & 0xff) << 8) | (port >> 8)


def mix64(x):
    """splitmix64 finalizer, on 64-bit unsigned arithmetic."""
    x &= U64
    x ^= x >> 30
    x = (x * 0xbf58476d1ce4e5b9) & U64
    x ^= x >> 27
    x = (x * 0x94d049bb133111eb) & U64
    x ^= x >> 31
    return x


def _maglev_fill(backends, M):
    """Maglev lookup table (Eisenbud et al., NSDI'16, section 3.4): each
    backend walks its own permutation of the M slots and claims the next free
    one in turn. Keys are host-order (addr << 16 | port), as in the C code.

    Where the C code cannot finish (M < 2 divides by zero; a non-prime M can
    leave a backend's walk without a free slot forever) this raises
    ValueError instead."""
    n = len(backends)
    if M < 2:
        raise ValueError("Maglev table size must be at least 2")
    offset = []
    skip = []
    for addr, port in backends:
        key = (addr << 16) | port
        offset.append(mix64(key ^ 0x6d61676c6576) % M)
        skip.append(mix64(key ^ 0x736b6970) % (M - 1) + 1)
    ring = [0xffff] * M
    nxt = [0] * n
    filled = 0
    while True:
        for i in range(n):
            o, k, j = offset[i], skip[i], nxt[i]
            c = (o + j * k) % M
            while ring[c] != 0xffff:
                j += 1
                if j >= M:
                    raise ValueError(f"Maglev table size {M} is not prime: backend {i} finds no free slot")
                c = (o + j * k) % M
            ring[c] = i
            nxt[i] = j + 1
            filled += 1
            if filled == M:
                return ring


_maglev_cache = {}          # (backends, size) -> ring; rings are never mutated


def _maglev_ring(backends, size=MAGLEV_SIZE):
    key = (tuple(backends), size)
    ring = _maglev_cache.get(key)
    if ring is None:
        ring = _maglev_fill(key[0], size)
        if len(_maglev_cache) >= 64:
            _maglev_cache.pop(next(iter(_maglev_cache)))
        _maglev_cache[key] = ring
    return ring


def _uint(v, bits, what):
    """Cython's conversion of a Python int to an unsigned C integer."""
    v = int(v)
    if v < 0:
        raise OverflowError(f"can't convert negative value to unsigned int ({what})")
    if v >> bits:
        raise OverflowError(f"value too large to convert to unsigned int ({what})")
    return v


def maglev_table(backends, size=MAGLEV_SIZE):
    """The Maglev ring for [(addr int, port)] as a list of backend indexes
    (for tests and the reference path)."""
    size = _uint(size, 32, "size")
    n = len(backends)
    if n == 0 or n > 65535:
        raise ValueError("1..65535 backends")
    bs = [(_uint(a, 32, "addr"), _uint(p, 16, "port")) for a, p in backends]
    return list(_maglev_ring(bs, size))


# --- service tables ------------------------------------------------------------

def prefix_mask(plen):
    if plen <= 0:
        return 0
    if plen >= 32:
        return U32
    return (U32 << (32 - plen)) & U32


def _cidr(net, plen):
    mask = prefix_mask(plen)
    return (int(net) & mask, mask)


def _in_cidrs(addr, cidrs):
    return any(addr & mask == net for net, mask in cidrs)


class _SvcPort:
    """One service port: what a new flow to (vip, port, proto) may go to."""
    __slots__ = ("index", "name", "vip", "port", "proto", "backends",
                 "source_ranges", "scheduler", "id", "affinity_timeout",
                 "rr", "ring")

    def __init__(self, index, s, first_backend):
        """first_backend: index of this service's first backend in the whole
        table (the default backend id)."""
        self.index = index
        self.name = s["name"]
        self.vip = _uint(s["vip"], 32, "vip")               # 0: a node port
        self.port = _uint(s["port"], 16, "port")
        self.proto = _uint(s["proto"], 8, "proto")
        self.scheduler = _uint(s.get("scheduler", 0), 32, "scheduler")
        self.id = _uint(s.get("id", index), 32, "id")       # stable service id
        self.affinity_timeout = _uint(s.get("affinity_timeout", 0), 32, "affinity_timeout")
        self.rr = 0                                         # round-robin cursor
        # (addr, port, stable id); the default id is the index in the whole table
        self.backends = [(_uint(be[0], 32, "addr"), _uint(be[1], 16, "port"),
                          _uint(be[2], 32, "id") if len(be) > 2 else first_backend + j)
                         for j, be in enumerate(s["backends"])]
        self.ring = None
        if self.scheduler == SCHED_MH and len(self.backends) > MAGLEV_MAX_BACKENDS:
            raise ValueError(f"{self.name}: Maglev takes at most 65534 backends")
        if self.scheduler == SCHED_MH and self.backends:
            self.ring = _maglev_ring([(a, p) for a, p, _ in self.backends])
        self.source_ranges = [_cidr(n, l) for n, l in (s.get("source_ranges") or ())]


class Tables:
    """One generation of compiled service tables (immutable once built)."""

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
        services = list(services)
        self._names = [s["name"] for s in services]
        self.svcports = []
        nb = 0
        for i, s in enumerate(services):
            sv = _SvcPort(i, s, nb)
            nb += len(sv.backends)
            self.svcports.append(sv)
        # largest service / backend id + 1: Dataplane.swap holds these
        # against max_services / max_backends
        self.max_id = max([0] + [sv.id + 1 for sv in self.svcports])
        self.max_bid = max([0] + [b[2] + 1 for sv in self.svcports for b in sv.backends])
        # (vip, port, proto) -> service port
        self.by_key = {}
        for sv in self.svcports:
            key = (sv.vip, sv.port, sv.proto)
            if key in self.by_key:
                raise ValueError(f"duplicate service key {sv.name}")
            self.by_key[key] = sv
        # every live service address: an unserved port on one is rejected
        self.vips = frozenset(int(a) for a in vips if int(a) != 0)
        # serviceCIDR & co: an address in here that is not a VIP is dropped
        self.drop_cidrs = [_cidr(n, l) for n, l in drop_cidrs]
        self.node_addrs = frozenset(int(a) for a in node_addrs)

    @property
    def names(self):
        return self._names

    @property
    def size(self):
        return len(self.svcports)

    def with_backends(self, changes):
        """A new generation equal to this one but for the backends of the rows
        in changes ({row index: [(addr, port[, id])]}). Untouched rows keep
        their backends, ids and round-robin cursors, as the C copy does."""
        for i, rows in changes.items():
            if not 0 <= i < len(self.svcports):
                raise ValueError(f"no row {i}")
            if self.svcports[i].scheduler == SCHED_MH and len(rows) > MAGLEV_MAX_BACKENDS:
                raise ValueError(f"{self.svcports[i].name}: Maglev takes at most 65534 backends")
        t = copy.copy(self)
        t.svcports = []
        nb = 0
        for i, sv in enumerate(self.svcports):
            sv = copy.copy(sv)
            rows = changes.get(i)
            if rows is not None:
                sv.backends = [(_uint(be[0], 32, "addr"), _uint(be[1], 16, "port"),
                                _uint(be[2], 32, "id") if len(be) > 2 else nb + j)
                               for j, be in enumerate(rows)]
                if any(b[2] == U32 for b in sv.backends):
                    raise ValueError(f"{sv.name}: backend id out of range")
                sv.rr = 0
                sv.ring = _maglev_ring([(a, p) for a, p, _ in sv.backends]) \
                    if sv.scheduler == SCHED_MH and sv.backends else None
            nb += len(sv.backends)
            t.svcports.append(sv)
        t.max_bid = max([self.max_bid] + [b[2] + 1 for sv in t.svcports for b in sv.backends])
        t.by_key = {(sv.vip, sv.port, sv.proto): sv for sv in t.svcports}
        return t

    def lookup(self, addr, port, proto):
        return self.by_key.get((addr, port, proto))

    def is_vip(self, addr):
        return addr in self.vips

    def is_node_addr(self, addr):
        return addr in self.node_addrs

    def in_drop_cidrs(self, addr):
        return _in_cidrs(addr, self.drop_cidrs)

    def source_allowed(self, sv, addr):
        return _in_cidrs(addr, sv.source_ranges)


# --- connection tracking --------------------------------------------------------

def tcp_next_state(st, flags, direction, th):
    """TCP state after a packet with flags `th` in `direction`.
    Returns (state, entry flags)."""
    if th & TH_RST:
        return CT_CLOSE, flags
    if th & TH_FIN:
        flags |= CTF_FIN_ORIG if direction == DIR_ORIG else CTF_FIN_REPLY
    if st == CT_SYN_SENT:
        if direction == DIR_REPLY and th & (TH_SYN | TH_ACK) == TH_SYN | TH_ACK:
            return CT_SYN_RECV, flags
        return st, flags
    if st == CT_SYN_RECV:
        if direction == DIR_ORIG and th & TH_ACK and not th & TH_SYN:
            st = CT_ESTABLISHED     # and go on: the ACK may carry a FIN
        else:
            return st, flags
    if st == CT_CLOSE:
        return st, flags
    if flags & (CTF_FIN_ORIG | CTF_FIN_REPLY) == CTF_FIN_ORIG | CTF_FIN_REPLY:
        return CT_TIME_WAIT, flags
    if flags & CTF_FIN_ORIG:
        return CT_FIN_WAIT, flags
    if flags & CTF_FIN_REPLY:
        return CT_CLOSE_WAIT, flags
    return st, flags


class _Flow:
    """A tracked flow: both tuples, (saddr, daddr, sport, dport, proto).
    key[DIR_ORIG]: client -> VIP; key[DIR_REPLY]: backend -> masquerade address.
    svcport: stable service-port id (stats); backend: stable backend id (active flows)."""
    __slots__ = ("key", "expires", "svcport", "backend", "state", "flags")

    def __init__(self, orig, reply, svc, backend, state, expires):
        self.key = (orig, reply)
        self.svcport = svc
        self.backend = backend
        self.state = state
        self.flags = 0
        self.expires = expires


class _Conntrack:
    """Flow table of at most `max` entries with ids 0..max-1. `index` maps each
    flow tuple (both directions) to (id, direction). Free ids are a stack with
    0 on top at first; a freed id goes back on top. One clock hand serves both
    the expiry sweep and eviction. `active` counts flows per stable backend id
    below `nactive`: +1 when a flow is created (by the dataplane), -1 in
    remove(), whatever removes it (expiry, eviction, delete_flows, reuse)."""

    def __init__(self, maxflows, maxbackends):
        self.max = maxflows
        self.entries = [None] * maxflows            # None: free
        self.free_ids = list(range(maxflows - 1, -1, -1))   # top = end of list
        self.index = {}
        self.hand = 0
        self.nactive = maxbackends
        self.active = {}                            # backend id -> flows; absent: 0
        self.pads = {}      # entry id -> ct_entry_t.pad: only import_flows sets one

    @property
    def count(self):
        return self.max - len(self.free_ids)

    def find(self, key):
        return self.index.get(key)

    def deactivate(self, e):
        """The flow stops counting for its backend (closing or gone)."""
        if e.flags & CTF_ACTIVE and e.backend < self.nactive and self.active.get(e.backend):
            self.active[e.backend] -= 1
        e.flags &= ~CTF_ACTIVE

    def remove(self, fid):
        e = self.entries[fid]
        # (an imported record may carry one tuple twice: the C index then
        # holds it twice and finds the original direction first)
        if self.index.get(e.key[DIR_ORIG]) == (fid, DIR_ORIG):
            del self.index[e.key[DIR_ORIG]]
        if self.index.get(e.key[DIR_REPLY]) == (fid, DIR_REPLY):
            del self.index[e.key[DIR_REPLY]]
        self.deactivate(e)
        self.entries[fid] = None
        self.free_ids.append(fid)

    def _advance(self):
        fid = self.hand
        self.hand = (self.hand + 1) % self.max
        return fid

    def alloc(self, now):
        """A free entry id; when none is left, evicts (the first expired entry
        from the hand, else the first unestablished one seen) within a bounded
        scan. Returns (id or None, evicted 0/1)."""
        evicted = 0
        if not self.free_ids:
            victim = None
            for _ in range(min(self.max, EVICT_SCAN)):
                fid = self._advance()
                e = self.entries[fid]
                if e.expires <= now:
                    victim = fid
                    break
                if victim is None and e.state in UNESTABLISHED:
                    victim = fid
            if victim is None:
                return None, 0
            self.remove(victim)
            evicted = 1
        return self.free_ids.pop(), evicted

    def insert(self, fid, flow):
        self.entries[fid] = flow
        self.index[flow.key[DIR_ORIG]] = (fid, DIR_ORIG)
        self.index.setdefault(flow.key[DIR_REPLY], (fid, DIR_REPLY))

    def sweep(self, now, budget):
        """Removes expired entries among `budget` from the hand."""
        removed = 0
        if self.count == 0:
            return 0
        for _ in range(min(budget, self.max)):
            fid = self._advance()
            e = self.entries[fid]
            if e is not None and e.expires <= now:
                self.remove(fid)
                removed += 1
        return removed


# --- packet rewriting -----------------------------------------------------------

def nat_rewrite(p, l4, proto, nsrc, nsport, ndst, ndport, partial=False):
    """Rewrites addresses and ports in place, updating the IP and L4 checksums
    incrementally. A UDP checksum of 0 means "none" and stays 0; a computed 0
    is sent as 0xffff.

    partial: the packet came with VIRTIO_NET_HDR_F_NEEDS_CSUM, so the L4
    checksum field holds the folded pseudo-header sum, not complemented:
    adjust it for the addresses only (ports are summed later by whoever
    completes the checksum), with no UDP-zero rule. The IPv4 header checksum
    is always updated."""
    osrc, odst = struct.unpack_from("!II", p, IP_SRC)
    osport, odport = struct.unpack_from("!HH", p, l4 + L4_SPORT)
    (c,) = struct.unpack_from("!H", p, IP_CSUM)
    c = csum_replace4(c, osrc, nsrc)
    c = csum_replace4(c, odst, ndst)
    struct.pack_into("!HII", p, IP_CSUM, c, nsrc, ndst)
    off = l4 + (TCP_CSUM if proto == PROTO_TCP else UDP_CSUM)
    (c,) = struct.unpack_from("!H", p, off)
    if partial:
        c = ~csum_replace4(~c & 0xffff, osrc, nsrc) & 0xffff
        c = ~csum_replace4(~c & 0xffff, odst, ndst) & 0xffff
        struct.pack_into("!H", p, off, c)
    elif not (proto == PROTO_UDP and c == 0):
        c = csum_replace4(c, osrc, nsrc)
        c = csum_replace4(c, odst, ndst)
        c = csum_replace2(c, osport, nsport)
        c = csum_replace2(c, odport, ndport)
        if proto == PROTO_UDP and c == 0:
            c = 0xffff
        struct.pack_into("!H", p, off, c)
    struct.pack_into("!HH", p, l4 + L4_SPORT, nsport, ndport)


def build_port_unreachable(p, tot):
    """ICMP port unreachable from the datagram's destination to its source,
    quoting its first ICMP_QUOTE_MAX bytes at most."""
    quote = bytes(p[:min(tot, ICMP_QUOTE_MAX)])
    n = IP_MIN_HLEN + ICMP_HLEN + len(quote)
    src, dst = struct.unpack_from("!II", p, IP_SRC)
    icmp = bytearray(struct.pack("!BBHI", 3, 3, 0, 0) + quote)  # type 3, code 3
    struct.pack_into("!H", icmp, ICMP_CSUM, csum_full(icmp))
    ip = bytearray(struct.pack("!BBHHHBBHII", 0x45, 0xc0, n, 0, 0, 64,
                               PROTO_ICMP, 0, dst, src))
    struct.pack_into("!H", ip, IP_CSUM, csum_full(ip))
    return bytes(ip + icmp)


def xorshift32(x):
    x ^= (x << 13) & U32
    x ^= x >> 17
    x ^= (x << 5) & U32
    return x


# --- parsing ---------------------------------------------------------------------

class _Pkt:
    """A packet parsed once (the C code's pkt_t): reason "none" when it is a
    checked TCP, UDP or ICMP datagram, else why it drops."""
    __slots__ = ("p", "tot", "l4", "l4len", "proto", "th", "key", "reason")


class _Quote:
    """The datagram an ICMP error quotes, checked (offsets into the packet)."""
    __slots__ = ("ip", "l4", "len", "ihl", "proto", "src", "dst", "sport", "dport")


def parse(p):
    """Every length check of a packet, in the order that decides its drop
    reason (pkt_parse in cext/parse.pxi)."""
    v = _Pkt()
    v.p = p
    v.th = 0
    v.key = None
    v.reason = "malformed"
    n = len(p)
    if n < IP_MIN_HLEN:
        return v
    if p[IP_VER_IHL] >> 4 != 4:
        v.reason = "unsupported"
        return v
    ihl = (p[IP_VER_IHL] & 0x0f) * 4
    (v.tot,) = struct.unpack_from("!H", p, IP_TOTLEN)
    if ihl < IP_MIN_HLEN or v.tot < ihl or v.tot > n:
        return v
    (frag,) = struct.unpack_from("!H", p, IP_FRAG)
    if frag & 0x3fff:                       # MF set or offset != 0
        v.reason = "fragment"
        return v
    v.proto = p[IP_PROTO]
    v.l4 = l4 = ihl
    v.l4len = v.tot - ihl
    if v.proto == PROTO_TCP:
        if v.l4len < TCP_MIN_HLEN:
            return v
        doff = (p[l4 + TCP_DOFF] >> 4) * 4
        if doff < TCP_MIN_HLEN or doff > v.l4len:
            return v
        v.th = p[l4 + TCP_FLAGS]
    elif v.proto == PROTO_UDP:
        if v.l4len < UDP_HLEN:
            return v
        (ulen,) = struct.unpack_from("!H", p, l4 + UDP_LEN)
        if ulen < UDP_HLEN or ulen > v.l4len:
            return v
    elif v.proto == PROTO_ICMP:
        if v.l4len >= ICMP_HLEN:
            v.reason = "none"
        return v
    else:
        v.reason = "unsupported"
        return v
    saddr, daddr = struct.unpack_from("!II", p, IP_SRC)
    sport, dport = struct.unpack_from("!HH", p, l4 + L4_SPORT)
    v.key = (saddr, daddr, sport, dport, v.proto)
    v.reason = "none"
    return v


# --- the dataplane ---------------------------------------------------------------

class Dataplane:
    """Conntrack + NAT over compiled Tables."""

    batch_prefetch = True       # a cache hint of the C path: no effect here
    tun_queues = 1              # masquerade ports congruent to client ports modulo this
    overloaded = False          # the I/O loop's last read filled a batch (tests set it)

    def __init__(self, masquerade_ip, max_flows=262144, batch=64, seed=0x9E3779B9,
                 port_range=(1024, 65535), timeouts=None, tables=None,
                 max_services=65536, max_backends=1 << 20, affinity_size=65536, icmp_rate=1000,
                 icmp_source_rate=100, admit_rate=1000):
        if max_flows < 1:
            raise ValueError("max_flows must be positive")
        if not (1 <= port_range[0] <= port_range[1] <= 65535):
            raise ValueError("bad SNAT port range")
        if tables is not None and not isinstance(tables, Tables):
            raise TypeError("tables must be refpath.Tables")
        self.ct = _Conntrack(_uint(max_flows, 32, "max_flows"),
                             _uint(max_backends, 32, "max_backends"))
        self.max_services = _uint(max_services, 32, "max_services")
        self.icmp_rate = self.icmp_tokens = _uint(icmp_rate, 32, "icmp_rate")
        self.icmp_second = U32
        self.icmp_source_rate = _uint(icmp_source_rate, 32, "icmp_source_rate")
        self.icmp_sources = {}      # slot -> [addr (raw), second, tokens]; absent: none yet
        self.admit_rate = _uint(admit_rate, 32, "admit_rate")
        self.admit_tokens = 0
        self.admit_second = U32
        self.known = [set(), set()]     # bit indexes of known sources, this generation and the last
        self.known_epoch = 0
        self.svcport_stats = {}             # stable service-port id -> [5 counters]
        # sessionAffinity: ClientIP. Slot index -> [svc id + 1 (0: empty),
        # client (raw), backend addr, backend port, expires]; absent: empty.
        asize = 16
        while asize < affinity_size:
            asize <<= 1
        self.aff = {}
        self.aff_mask = asize - 1
        self.masq = int(masquerade_ip)
        self.port_lo = port_range[0]
        self.port_range = port_range[1] - port_range[0] + 1
        self.rng = _uint(seed, 32, "seed") or 1
        self.batch = batch
        self.cnt = dict.fromkeys(COUNTERS, 0)
        self.drops = [0] * len(DROP_REASONS)
        self.timeouts = [0] * len(STATE_NAMES)
        self.set_timeouts(timeouts or {})
        self.tables = Tables([])
        if tables is not None:
            self.swap(tables)

    def set_timeouts(self, timeouts):
        merged = dict(DEFAULT_TIMEOUTS)
        for k, v in timeouts.items():
            if k not in merged:
                raise ValueError(f"unknown conntrack state {k!r}")
            merged[k] = v
        self.timeouts = [int(merged.get(name, 0)) for name in STATE_NAMES]

    def swap(self, tables):
        """Replace the service tables; flows keep going where they go."""
        if not isinstance(tables, Tables):
            raise TypeError("tables must be refpath.Tables")
        if tables.max_id > self.max_services:
            raise ValueError(f"service id {tables.max_id - 1} beyond max_services {self.max_services}")
        if tables.max_bid > self.ct.nactive:
            raise ValueError(f"backend id {tables.max_bid - 1} beyond max_backends {self.ct.nactive}")
        self.tables = tables

    @property
    def current_tables(self):
        return self.tables

    def _rand(self):
        self.rng = xorshift32(self.rng)
        return self.rng

    def _drop(self, reason):
        self.cnt["drops"] += 1
        self.drops[DROP_REASONS.index(reason)] += 1
        return ("drop", reason, None)

    def _reject(self, p, tot, now):
        # no ICMP error to 0/8, loopback, multicast or broadcast sources
        if p[IP_SRC] == 0 or p[IP_SRC] == 127 or p[IP_SRC] >= 224:
            return self._drop("martian")
        # at most icmp_rate errors a second (tokens refilled each new second),
        # and at most icmp_source_rate to one source
        src = raw32(struct.unpack_from("!I", p, IP_SRC)[0])
        slot = ((src * 2654435761) & U32) >> 22
        b = self.icmp_sources.get(slot)
        if b is None or b[0] != src or b[1] != now:
            b = self.icmp_sources[slot] = [src, now, self.icmp_source_rate]
        if now != self.icmp_second:
            self.icmp_second = now
            self.icmp_tokens = self.icmp_rate
        if b[2] == 0 or self.icmp_tokens == 0:
            return self._drop("icmp_rate")
        b[2] -= 1
        self.icmp_tokens -= 1
        self.cnt["rejects"] += 1
        return ("reply", "none", build_port_unreachable(p, tot))

    def _stat(self, svc, what, n=1):
        row = self.svcport_stats.get(svc)
        if row is None:
            row = self.svcport_stats[svc] = [0] * len(SERVICE_COUNTERS)
        row[what] += n

    def _unmatched(self, t, daddr):
        """Drop reason for a packet that opens nothing and matches no flow."""
        if daddr == self.masq:
            return "spoofed"
        if t.in_drop_cidrs(daddr):
            return "unallocated"
        return "no_service"

    # -- the packet path -----------------------------------------------------

    def _process_one(self, t, p, now, partial=False):
        """p: bytearray, rewritten in place. Returns (verdict, reason, out)."""
        self.cnt["rx_packets"] += 1
        self.cnt["rx_bytes"] += len(p)
        v = parse(p)
        if v.reason != "none":
            return self._drop(v.reason)
        if v.proto == PROTO_ICMP:
            return self._icmp_in(t, v, now)
        ref, reopened = self._flow_lookup(v, now)
        if ref is not None:
            return self._flow_forward(v, ref, now, partial)
        return self._flow_open(t, v, now, partial, reopened)

    def _flow_lookup(self, v, now):
        """(The tracked flow of a TCP/UDP packet, either direction ((entry id,
        direction)), else None; reopened). An expired flow is removed on the
        way, and so is a closing TCP connection whose client port a new SYN
        reuses; reopened is then that flow's masquerade port, if the packet
        is its client's (the new flow keeps it), else 0."""
        ct = self.ct
        ref = ct.find(v.key)
        if ref is None:
            return None, 0
        fid, direction = ref
        e = ct.entries[fid]
        # the masquerade port of this client tuple's flow, when it is removed here
        reopened = e.key[DIR_REPLY][3] if direction == DIR_ORIG else 0
        if e.expires <= now:
            ct.remove(fid)
            self.cnt["flows_expired"] += 1
            return None, reopened
        if (v.proto == PROTO_TCP and direction == DIR_ORIG
                and v.th & (TH_SYN | TH_ACK | TH_RST) == TH_SYN
                and e.state in (CT_TIME_WAIT, CT_CLOSE)):
            ct.remove(fid)                      # port reuse: a new connection
            return None, reopened
        return ref, 0

    def _flow_forward(self, v, ref, now, partial):
        """A packet of tracked flow ref: rewritten to the flow's other tuple,
        and the flow's state and timeout moved on."""
        fid, direction = ref
        e = self.ct.entries[fid]
        o_saddr, o_daddr, o_sport, o_dport, _ = e.key[1 - direction]
        nat_rewrite(v.p, v.l4, v.proto, o_daddr, o_dport, o_saddr, o_sport, partial)
        if v.proto == PROTO_TCP:
            if e.state == CT_SYN_RECV and direction == DIR_ORIG:
                self._known_mark(raw32(e.key[DIR_ORIG][0]), now)   # the client got our SYN-ACK
            e.state, e.flags = tcp_next_state(e.state, e.flags, direction, v.th)
            if e.state == CT_TIME_WAIT or e.state == CT_CLOSE:
                self.ct.deactivate(e)           # closing: no longer an active flow
        elif direction == DIR_REPLY:
            e.state = CT_UDP_ASSURED
        e.expires = (now + self.timeouts[e.state]) & U32
        self._stat(e.svcport, S_PACKETS)
        self._stat(e.svcport, S_BYTES, v.tot)
        return ("forward", "none", bytes(v.p[:v.tot]))

    @staticmethod
    def _svcport_match(t, key):
        """The service port a new flow to key opens to: by (address, port,
        protocol), else the node port when the address is a node's. (Address
        0 is the node-port key: it is never matched as a destination.)"""
        _, daddr, _, dport, proto = key
        sv = t.lookup(daddr, dport, proto) if daddr != 0 else None
        if sv is None and t.is_node_addr(daddr):
            sv = t.lookup(0, dport, proto)
        return sv

    def _flow_open(self, t, v, now, partial, reopened=0):
        """A packet of no tracked flow: a new flow to a backend of its service
        port, or refused, or dropped."""
        saddr, daddr, sport, _, proto = v.key
        sv = self._svcport_match(t, v.key)
        if sv is None:
            if t.is_vip(daddr) or t.is_node_addr(daddr):
                return self._reject(v.p, v.tot, now)     # live VIP / node address, port not served
            return self._drop(self._unmatched(t, daddr))
        if sv.source_ranges and not t.source_allowed(sv, saddr):
            self._stat(sv.id, S_DENIED)
            return self._drop("source_denied")
        if not sv.backends:
            self._stat(sv.id, S_REJECTS)
            return self._reject(v.p, v.tot, now)
        if proto == PROTO_TCP and v.th & (TH_SYN | TH_ACK | TH_RST | TH_FIN) != TH_SYN:
            return self._drop("not_syn")
        if self.overloaded and not self._admit(raw32(saddr), now):
            return self._drop("overload")
        baddr, bport, bid = self._schedule(sv, raw32(saddr), raw16(sport), now)
        port = self._snat_port(baddr, bport, proto, sport, reopened, now)
        if port is None:
            return self._drop("nat_exhausted")
        ct = self.ct
        fid, evicted = ct.alloc(now)
        self.cnt["flows_evicted"] += evicted
        if fid is None:
            return self._drop("table_full")
        state = CT_SYN_SENT if proto == PROTO_TCP else CT_UDP_UNREPLIED
        e = _Flow(v.key, (baddr, self.masq, bport, port, proto), sv.id, bid, state,
                  (now + self.timeouts[state]) & U32)
        ct.insert(fid, e)
        if bid < ct.nactive:
            ct.active[bid] = ct.active.get(bid, 0) + 1
            e.flags = CTF_ACTIVE
        self._stat(sv.id, S_FLOWS)
        self._stat(sv.id, S_PACKETS)
        self._stat(sv.id, S_BYTES, v.tot)
        self.cnt["flows_created"] += 1
        nat_rewrite(v.p, v.l4, proto, self.masq, port, baddr, bport, partial)
        return ("forward", "none", bytes(v.p[:v.tot]))

    # -- admission under overload (see admit, cext/fastpath.pyx) --

    def _known_rotate(self, now):
        if (now - self.known_epoch) & U32 >= KNOWN_PERIOD:
            self.known = [set(), self.known[0]]
            if (now - self.known_epoch) & U32 >= 2 * KNOWN_PERIOD:
                self.known[1] = set()
            self.known_epoch = now

    def _known_mark(self, src, now):
        self._known_rotate(now)
        self.known[0].add(((src * 2654435761) & U32) >> (32 - KNOWN_BITS_LOG2))

    def _admit(self, src, now):
        """A new flow from src (raw) while overloaded: a known source always,
        another within admit_rate a second."""
        b = ((src * 2654435761) & U32) >> (32 - KNOWN_BITS_LOG2)
        self._known_rotate(now)
        if b in self.known[0] or b in self.known[1]:
            return True
        if now != self.admit_second:
            self.admit_second = now
            self.admit_tokens = self.admit_rate
        if self.admit_tokens == 0:
            return False
        self.admit_tokens -= 1
        return True

    def _snat_try(self, rk, now, victim):
        """Whether rk's masquerade port is free; an expired holder is removed,
        the first half-open one seen is remembered in victim ([id, port])."""
        ref = self.ct.find(rk)
        if ref is None:
            return True
        e = self.ct.entries[ref[0]]
        if e.expires <= now:
            self.ct.remove(ref[0])
            self.cnt["flows_expired"] += 1
            return True
        if not victim and e.state in UNESTABLISHED:
            victim += [ref[0], rk[3]]
        return False

    def _snat_port(self, baddr, bport, proto, cport, hint, now):
        """The masquerade port of a new flow from backend baddr:bport, or
        None: the reopened flow's port (hint), else the client's, else a
        search from a random start; past RECLAIM_AFTER taken tries a
        half-open holder's port is reclaimed (see snat_port, cext/nat.pxi)."""
        q = self.tun_queues or 1
        lo, hi = self.port_lo, self.port_lo + self.port_range - 1
        victim = []
        key = lambda port: (baddr, self.masq, bport, port, proto)  # noqa: E731
        if lo <= hint <= hi and hint % q == cport % q and self._snat_try(key(hint), now, victim):
            return hint
        if lo <= cport <= hi and cport != hint and self._snat_try(key(cport), now, victim):
            return cport
        first = lo + (cport % q + q - lo % q) % q
        count = (hi - first) // q + 1 if first <= hi else 0
        if count:
            start = self._rand() % count
            for i in range(min(PORT_TRIES, count)):
                port = first + (start + i) % count * q
                if self._snat_try(key(port), now, victim):
                    return port
                if victim and i + 1 >= RECLAIM_AFTER:
                    break
        if not victim:
            return None
        self.ct.remove(victim[0])
        self.cnt["flows_evicted"] += 1
        return victim[1]

    def _schedule(self, sv, client, csport, now):
        """The backend (addr, port, id) for a new flow of sv (which has one).
        client, csport: the client's address and port as raw values (the C
        code hashes those)."""
        bs = sv.backends
        n = len(bs)
        idx = None
        a = None
        if sv.affinity_timeout:
            a = self._aff_slot(sv.id, client, now)
            if a[0] == (sv.id + 1) & U32 and a[1] == client:
                for i, (addr, port, _) in enumerate(bs):
                    if addr == a[2] and port == a[3]:
                        idx = i
                        break
        if idx is None:
            sched = sv.scheduler
            if sched == SCHED_RR:
                idx = sv.rr % n
                sv.rr = (sv.rr + 1) & U32
            elif sched == SCHED_LC:
                # fewest flows, ties broken from a random start
                act = self.ct.active
                start = self._rand() % n
                idx = start
                best = act.get(bs[idx][2], 0)
                for j in range(1, n):
                    i = (start + j) % n
                    c = act.get(bs[i][2], 0)
                    if c < best:
                        idx, best = i, c
            elif sched == SCHED_SH:
                idx = mix64(client) % n
            elif sched == SCHED_MH:
                idx = sv.ring[mix64((client << 16) | csport) % MAGLEV_SIZE]
            else:
                idx = self._rand() % n
        if a is not None:
            a[0] = (sv.id + 1) & U32
            a[1] = client
            a[2], a[3] = bs[idx][0], bs[idx][1]
            a[4] = (now + sv.affinity_timeout) & U32
        return bs[idx]

    def _aff_slot(self, svc, client, now):
        """The live slot of (svc, client), else the slot to take for it (made
        empty): the first empty or expired slot within AFF_PROBE of the hashed
        one (an empty one preferred over an expired one, the last expired one
        otherwise), else the live one that expires first."""
        h = mix64((svc << 32) | client) & self.aff_mask
        aff = self.aff
        key = (svc + 1) & U32
        victim = None
        for i in range(AFF_PROBE):
            j = (h + i) & self.aff_mask
            a = aff.get(j)
            if a is None:
                a = aff[j] = [0, 0, 0, 0, 0]
            if a[0] == key and a[1] == client:
                if a[4] > now:
                    return a
                a[0] = 0                # expired: as good as empty
            if a[0] == 0 or a[4] <= now:
                if victim is None or victim[0] != 0:
                    victim = a
            elif victim is None or (victim[0] != 0 and a[4] < victim[4]):
                victim = a
        victim[0] = 0
        return victim

    def _icmp_in(self, t, v, now):
        """A checked ICMP message (at least its 8-byte header)."""
        typ = v.p[v.l4 + ICMP_TYPE]
        if typ == 8:
            return self._icmp_echo(t, v)
        if typ in (3, 11, 12):                  # unreachable, time exceeded, parameter problem
            return self._icmp_error(t, v, now)
        return self._drop("unsupported")

    def _icmp_echo(self, t, v):
        """An echo request to a live service address is answered (as IPVS
        mode's bound VIPs are), in place."""
        p, l4 = v.p, v.l4
        osrc, odst = struct.unpack_from("!II", p, IP_SRC)
        if p[l4 + ICMP_CODE] != 0 or not t.is_vip(odst):
            return self._drop(self._unmatched(t, odst))
        struct.pack_into("!II", p, IP_SRC, odst, osrc)   # a swap keeps the header sum
        (w,) = struct.unpack_from("!H", p, l4 + ICMP_TYPE)
        p[l4 + ICMP_TYPE] = 0
        (c,) = struct.unpack_from("!H", p, l4 + ICMP_CSUM)
        struct.pack_into("!H", p, l4 + ICMP_CSUM,
                         csum_replace2(c, w, struct.unpack_from("!H", p, l4 + ICMP_TYPE)[0]))
        (w,) = struct.unpack_from("!H", p, IP_TTL)
        p[IP_TTL] = 64
        (c,) = struct.unpack_from("!H", p, IP_CSUM)
        struct.pack_into("!H", p, IP_CSUM, csum_replace2(c, w, struct.unpack_from("!H", p, IP_TTL)[0]))
        return ("reply", "none", bytes(p[:v.tot]))

    @staticmethod
    def _icmp_quote_parse(v):
        """The quoted datagram (one we sent, so already translated), checked:
        a _Quote, or the drop reason."""
        p = v.p
        q = _Quote()
        q.ip = v.l4 + ICMP_HLEN
        q.len = v.l4len - ICMP_HLEN
        if q.len < IP_MIN_HLEN or p[q.ip + IP_VER_IHL] >> 4 != 4:
            return "malformed"
        q.ihl = (p[q.ip + IP_VER_IHL] & 0x0f) * 4
        if q.ihl < IP_MIN_HLEN or q.len < q.ihl + 8:
            return "malformed"
        q.proto = p[q.ip + IP_PROTO]
        if q.proto != PROTO_TCP and q.proto != PROTO_UDP:
            return "unsupported"
        q.l4 = q.ip + q.ihl
        q.src, q.dst = struct.unpack_from("!II", p, q.ip + IP_SRC)
        q.sport, q.dport = struct.unpack_from("!HH", p, q.l4 + L4_SPORT)
        return q

    @staticmethod
    def _icmp_quote_restore(p, q, K, ic):
        """Rewrites the quoted header back to K, what its sender sent; each
        change also goes into the ICMP checksum ic (which covers the quote).
        Returns the new ICMP checksum."""
        ks, kd, ksp, kdp, _ = K
        (ipc,) = struct.unpack_from("!H", p, q.ip + IP_CSUM)
        c = csum_replace4(csum_replace4(ipc, q.src, ks), q.dst, kd)
        ic = csum_replace2(ic, ipc, c)
        struct.pack_into("!H", p, q.ip + IP_CSUM, c)
        ic = csum_replace4(csum_replace4(ic, q.src, ks), q.dst, kd)
        struct.pack_into("!II", p, q.ip + IP_SRC, ks, kd)
        csoff = TCP_CSUM if q.proto == PROTO_TCP else UDP_CSUM
        if q.len >= q.ihl + csoff + 2:          # the L4 checksum is quoted
            (c0,) = struct.unpack_from("!H", p, q.l4 + csoff)
            if not (q.proto == PROTO_UDP and c0 == 0):
                c = csum_replace4(csum_replace4(c0, q.src, ks), q.dst, kd)
                c = csum_replace2(csum_replace2(c, q.sport, ksp), q.dport, kdp)
                if q.proto == PROTO_UDP and c == 0:
                    c = 0xffff
                ic = csum_replace2(ic, c0, c)
                struct.pack_into("!H", p, q.l4 + csoff, c)
        ic = csum_replace2(csum_replace2(ic, q.sport, ksp), q.dport, kdp)
        struct.pack_into("!HH", p, q.l4 + L4_SPORT, ksp, kdp)
        return ic

    def _icmp_error(self, t, v, now):
        """An error about a tracked flow (unreachable, frag needed, time
        exceeded, parameter problem) is translated, quote included, and sent
        on to the flow's other end."""
        p = v.p
        osrc, odst = struct.unpack_from("!II", p, IP_SRC)
        q = self._icmp_quote_parse(v)
        if isinstance(q, str):
            return self._drop(q)
        # the reverse of what we sent; a flow past its timeout is as good as gone
        ref = self.ct.find((q.dst, q.src, q.dport, q.sport, q.proto))
        # the error must be about a live flow and addressed to the quoted sender
        if ref is None or self.ct.entries[ref[0]].expires <= now or odst != q.src:
            return self._drop(self._unmatched(t, odst))
        fid, direction = ref
        e = self.ct.entries[fid]
        K = e.key[1 - direction]                # the packet as its sender sent it
        (ic,) = struct.unpack_from("!H", p, v.l4 + ICMP_CSUM)
        struct.pack_into("!H", p, v.l4 + ICMP_CSUM, self._icmp_quote_restore(p, q, K, ic))
        # outer: to the sender; from the far end's public face if it was the far end
        (c,) = struct.unpack_from("!H", p, IP_CSUM)
        if osrc == q.dst:
            c = csum_replace4(c, osrc, K[1])
            struct.pack_into("!I", p, IP_SRC, K[1])
        c = csum_replace4(c, odst, K[0])
        struct.pack_into("!I", p, IP_DST, K[0])
        struct.pack_into("!H", p, IP_CSUM, c)
        self._stat(e.svcport, S_PACKETS)
        self._stat(e.svcport, S_BYTES, v.tot)
        return ("forward", "none", bytes(p[:v.tot]))

    def process(self, pkt, now, partial=False):
        """In-memory path for tests: returns (verdict, reason, out bytes|None).
        partial: treat the L4 checksum as CHECKSUM_PARTIAL (vnet NEEDS_CSUM)."""
        if len(pkt) > SLOT_SIZE:
            raise ValueError("packet larger than a slot")
        return self._process_one(self.tables, bytearray(pkt), int(now) & U32, bool(partial))

    def process_batch(self, pkts, now, repeat=1):
        """Processes each packet `repeat` times over; returns how many were
        forwarded or answered (the benchmark entry point of the C module)."""
        if len(pkts) > self.batch:
            raise ValueError("more packets than batch slots")
        t = self.tables
        tnow = int(now) & U32
        fwd = 0
        for _ in range(repeat):
            for pk in pkts:
                if self._process_one(t, bytearray(pk), tnow)[0] != "drop":
                    fwd += 1
        return fwd

    # -- control plane views -------------------------------------------------

    def counters(self):
        out = dict(self.cnt)
        out["drops_by_reason"] = {DROP_REASONS[r]: self.drops[r]
                                  for r in range(1, len(DROP_REASONS))}
        out["flows"] = self.ct.count
        out["max_flows"] = self.ct.max
        return out

    def service_counters(self, ids):
        """{id: {packets, bytes, flows, rejects, denied}} for stable service ids."""
        out = {}
        zero = (0,) * len(SERVICE_COUNTERS)
        for i in ids:
            if not 0 <= i < self.max_services:
                raise ValueError(f"service id {i} out of range")
            out[i] = dict(zip(SERVICE_COUNTERS, self.svcport_stats.get(i, zero)))
        return out

    def active_flows(self, backend_id):
        """Tracked flows to a backend (the lc scheduler's measure)."""
        backend_id = _uint(backend_id, 32, "backend_id")
        if backend_id >= self.ct.nactive:
            raise ValueError("backend id out of range")
        return self.ct.active.get(backend_id, 0)

    def flows(self, now=-1):
        """Snapshot of the flow table: list of dicts (like conntrack -L)."""
        if now < 0:
            now = monotonic()
        tnow = int(now) & U32
        out = []
        for e in self.ct.entries:
            if e is None or e.expires <= tnow:
                continue
            out.append({
                "proto": e.key[DIR_ORIG][4],
                "state": STATE_NAMES[e.state],
                "timeout": (e.expires - tnow) & U32,
                "orig": _key_tuple(e.key[DIR_ORIG]),
                "reply": _key_tuple(e.key[DIR_REPLY]),
                "svc": e.svcport,
                "backend": e.backend,
            })
        return out

    def delete_flows(self, proto, backend_addr, backend_port=-1):
        """Remove flows whose reply tuple comes from backend_addr(:port), e.g.
        UDP flows to a removed endpoint. Returns how many went."""
        addr = int(backend_addr)
        removed = 0
        for fid, e in enumerate(self.ct.entries):
            if e is None:
                continue
            saddr, _, sport, _, p = e.key[DIR_REPLY]
            if p == proto and saddr == addr and (backend_port < 0 or sport == backend_port & 0xffff):
                self.ct.remove(fid)
                removed += 1
        return removed

    def export_flows(self, now=-1):
        """The live flow table as bytes (ENTRY_BYTES per flow, `expires`
        holding the seconds left), for a restart to pick up."""
        if now < 0:
            now = monotonic()
        tnow = int(now) & U32
        out = []
        for fid, e in enumerate(self.ct.entries):
            if e is None or e.expires <= tnow:
                continue
            rec = b"".join(_KEY.pack(*k[:4]) + _KEY_TAIL.pack(k[4], 4, 0) for k in e.key)
            out.append(rec + _ENTRY_TAIL.pack((e.expires - tnow) & U32, e.svcport, e.backend,
                                              e.state, e.flags, self.ct.pads.get(fid, 0)))
        return b"".join(out)

    def import_flows(self, data, now=-1, svc_ids=None, backend_ids=None, elapsed=0):
        """Insert flows from export_flows(); ids are mapped old -> new (an
        unknown service port counts into the last id, an unknown backend into
        none). A record that is malformed, or whose id maps to one out of
        range (a service port >= max_services, a backend >= max_backends, or
        not an int >= 0), is refused and counted (counters()["flows_refused"]);
        one that expired or clashes with a flow already here is skipped.
        Returns how many were taken."""
        data = memoryview(data).cast("B")
        elapsed = _uint(elapsed, 32, "elapsed")
        if svc_ids is not None and not isinstance(svc_ids, dict) \
                or backend_ids is not None and not isinstance(backend_ids, dict):
            raise TypeError("svc_ids and backend_ids must be dicts")
        if len(data) % ENTRY_BYTES:
            raise ValueError("flow snapshot length is not a whole number of entries")
        if now < 0:
            now = monotonic()
        tnow = int(now) & U32
        svc_ids = svc_ids or {}
        backend_ids = backend_ids or {}
        ct = self.ct
        taken = 0
        for off in range(0, len(data), ENTRY_BYTES):
            keys = []
            for half in (off, off + 16):
                saddr, daddr, sport, dport = _KEY.unpack_from(data, half)
                keys.append((saddr, daddr, sport, dport, data[half + 12]))
            expires, svc, backend, state, flags, pad = _ENTRY_TAIL.unpack_from(data, off + 32)
            if (state == CT_FREE or state >= len(STATE_NAMES)
                    or keys[0][4] != keys[1][4] or keys[0][4] not in (PROTO_TCP, PROTO_UDP)):
                self.cnt["flows_refused"] += 1
                continue
            if expires <= elapsed:
                continue
            if ct.find(keys[0]) is not None or ct.find(keys[1]) is not None:
                continue
            svc = svc_ids.get(svc, self.max_services - 1)
            backend = backend_ids.get(backend)          # None: no backend
            if not _is_id(svc, self.max_services) or (backend is not None and not _is_id(backend, ct.nactive)):
                self.cnt["flows_refused"] += 1
                continue
            if backend is None:
                backend = U32
            if not ct.free_ids:
                break
            fid, _ = ct.alloc(tnow)
            e = _Flow(keys[0], keys[1], svc, backend, state,
                      (tnow + expires - elapsed) & U32)
            e.flags = flags & ~CTF_ACTIVE
            if pad:
                ct.pads[fid] = pad
            else:
                ct.pads.pop(fid, None)
            if backend < ct.nactive and state != CT_TIME_WAIT and state != CT_CLOSE:
                ct.active[backend] = ct.active.get(backend, 0) + 1
                e.flags |= CTF_ACTIVE
            ct.insert(fid, e)
            taken += 1
        return taken

    def expire(self, now, budget=U32):
        """Sweep expired flows (tests pass their own clock)."""
        r = self.ct.sweep(int(now) & U32, budget)
        self.cnt["flows_expired"] += r
        return r


def _is_id(v, limit):
    return isinstance(v, int) and 0 <= v < limit


def _key_tuple(k):
    saddr, daddr, sport, dport, _ = k
    return (saddr, sport, daddr, dport)
