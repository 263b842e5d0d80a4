"""engine.refpath: the packet semantics of engine._fastpath, in plain Python.

This is the specification the Cython fast path (cext/fastpath.pyx) is held to:
the same public API (Tables, Dataplane and the exported name tuples), the same
parse checks and drop reasons in the same order, the same connection tracking,
the same RNG draws and the same bytes out. The packet fixtures in tests/unit
run against both modules and compare their outputs byte for byte.

Where the C code makes a choice for speed that is observable (which free entry
id is taken next, where the clock hand stands, how many entries an eviction
looks at) this module makes the same choice, so that even eviction matches.
What is not observable (the open-addressing index, hashes, raw byte order of
the loads) is replaced by the obvious Python thing: a dict of flow tuples.

Addresses and ports are host-order ints throughout; checksums are computed on
big-endian 16-bit words, which gives the same bytes as the C code's
native-order arithmetic (the one's-complement sum is byte-order independent).

Stands alone: imports nothing from engine._fastpath and nothing outside the
standard library.
"""
import struct
import time

__all__ = ["Tables", "Dataplane", "DROP_REASONS", "COUNTERS", "STATE_NAMES",
           "DEFAULT_TIMEOUTS", "monotonic"]

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
ICMP_HLEN = 8

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

TH_FIN = 0x01
TH_SYN = 0x02
TH_RST = 0x04
TH_ACK = 0x10

SLOT_SIZE = 65536           # one IPv4 datagram at most
ICMP_QUOTE_MAX = 548        # RFC 1812: error messages stay within 576 bytes
PORT_TRIES = 512            # bounded search for a free SNAT port
EVICT_SCAN = 256            # entries an eviction looks at, at most

# --- verdicts, drop reasons, counters, states ----------------------------------

VERDICTS = ("drop", "forward", "reply")

DROP_REASONS = ("none", "malformed", "unsupported", "fragment", "no_service",
                "unallocated", "not_syn", "table_full", "nat_exhausted",
                "spoofed", "source_denied")

COUNTERS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "flows_created",
            "flows_expired", "flows_evicted", "rejects", "write_errors", "drops")

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

# FIN seen, per direction (entry flags)
CTF_FIN_ORIG = 1
CTF_FIN_REPLY = 2

DIR_ORIG = 0
DIR_REPLY = 1

U32 = 0xffffffff


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


class _Svc:
    """One service port: what a new flow to (vip, port, proto) may go to."""
    __slots__ = ("index", "name", "vip", "port", "proto", "backends",
                 "source_ranges", "scheduler", "nodeport")

    def __init__(self, index, s):
        self.index = index
        self.name = s["name"]
        self.vip = int(s["vip"])                # 0: a node port
        self.port = int(s["port"])
        self.proto = int(s["proto"])
        self.scheduler = s.get("scheduler", 0)
        self.nodeport = bool(s.get("nodeport"))
        self.backends = [(int(a), int(p)) for a, p in s["backends"]]
        self.source_ranges = [_cidr(n, l) for n, l in (s.get("source_ranges") or ())]


class Tables:
    """One generation of compiled service tables (immutable once built)."""

    def __init__(self, services, vips=(), drop_cidrs=(), node_addrs=()):
        """services: sequence of dicts with keys
             name, vip (int, host order; 0 for a node port), port, proto (6/17),
             backends [(addr int, port)], source_ranges [(net int, prefixlen)],
             scheduler (int), nodeport (bool)
           vips: addresses (int) that are live service addresses
           drop_cidrs: [(net int, prefixlen)] where unallocated addresses are dropped
           node_addrs: addresses (int) on which node-port keys (vip 0) apply
        """
        services = list(services)
        self._names = [s["name"] for s in services]
        self.svcs = [_Svc(i, s) for i, s in enumerate(services)]
        # (vip, port, proto) -> service port
        self.by_key = {}
        for sv in self.svcs:
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
        return len(self.svcs)

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
    key[DIR_ORIG]: client -> VIP; key[DIR_REPLY]: backend -> masquerade address."""
    __slots__ = ("key", "expires", "svc", "backend_addr", "state", "flags")

    def __init__(self, orig, reply, svc, state, expires):
        self.key = (orig, reply)
        self.svc = svc
        self.backend_addr = reply[0]
        self.state = state
        self.flags = 0
        self.expires = expires


class _Conntrack:
    """Flow table of at most `max` entries with ids 0..max-1. `index` maps each
    flow tuple (both directions) to (id, direction). Free ids are a stack with
    0 on top at first; a freed id goes back on top. One clock hand serves both
    the expiry sweep and eviction."""

    def __init__(self, maxflows):
        self.max = maxflows
        self.entries = [None] * maxflows            # None: free
        self.free_ids = list(range(maxflows - 1, -1, -1))   # top = end of list
        self.index = {}
        self.hand = 0

    @property
    def count(self):
        return self.max - len(self.free_ids)

    def find(self, key):
        return self.index.get(key)

    def remove(self, fid):
        e = self.entries[fid]
        del self.index[e.key[DIR_ORIG]]
        del self.index[e.key[DIR_REPLY]]
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
        self.index[flow.key[DIR_REPLY]] = (fid, DIR_REPLY)

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

def nat_rewrite(p, l4, proto, nsrc, nsport, ndst, ndport):
    """Rewrites addresses and ports in place, updating the IP and L4 checksums
    incrementally. A UDP checksum of 0 means "none" and stays 0; a computed 0
    is sent as 0xffff."""
    osrc, odst = struct.unpack_from("!II", p, IP_SRC)
    osport, odport = struct.unpack_from("!HH", p, l4 + L4_SPORT)
    (c,) = struct.unpack_from("!H", p, IP_CSUM)
    c = csum_replace4(c, osrc, nsrc)
    c = csum_replace4(c, odst, ndst)
    struct.pack_into("!HII", p, IP_CSUM, c, nsrc, ndst)
    off = l4 + (TCP_CSUM if proto == PROTO_TCP else UDP_CSUM)
    (c,) = struct.unpack_from("!H", p, off)
    if not (proto == PROTO_UDP and c == 0):
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


# --- the dataplane ---------------------------------------------------------------

class Dataplane:
    """Conntrack + NAT over compiled Tables."""

    def __init__(self, masquerade_ip, max_flows=262144, batch=64, seed=0x9E3779B9,
                 port_range=(1024, 65535), timeouts=None, tables=None):
        if max_flows < 1:
            raise ValueError("max_flows must be positive")
        if not (1 <= port_range[0] <= port_range[1] <= 65535):
            raise ValueError("bad SNAT port range")
        if not 0 <= seed <= U32:
            raise OverflowError("seed must fit 32 bits")
        if tables is not None and not isinstance(tables, Tables):
            raise TypeError("tables must be refpath.Tables")
        self.ct = _Conntrack(int(max_flows))
        self.masq = int(masquerade_ip)
        self.port_lo = port_range[0]
        self.port_range = port_range[1] - port_range[0] + 1
        self.rng = seed or 1
        self.batch = batch
        self.cnt = dict.fromkeys(COUNTERS, 0)
        self.drops = [0] * len(DROP_REASONS)
        self.timeouts = [0] * len(STATE_NAMES)
        self.set_timeouts(timeouts or {})
        self.tables = tables if tables is not None else Tables([])

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

    def _reject(self, p, tot):
        self.cnt["rejects"] += 1
        return ("reply", "none", build_port_unreachable(p, tot))

    # -- the packet path -----------------------------------------------------

    def _process_one(self, t, p, now):
        """p: bytearray, rewritten in place. Returns (verdict, reason, out)."""
        n = len(p)
        self.cnt["rx_packets"] += 1
        self.cnt["rx_bytes"] += n

        # 1. parse: every length is checked before it is relied on
        if n < IP_MIN_HLEN:
            return self._drop("malformed")
        if p[IP_VER_IHL] >> 4 != 4:
            return self._drop("unsupported")
        ihl = (p[IP_VER_IHL] & 0x0f) * 4
        (tot,) = struct.unpack_from("!H", p, IP_TOTLEN)
        if ihl < IP_MIN_HLEN or tot < ihl or tot > n:
            return self._drop("malformed")
        (frag,) = struct.unpack_from("!H", p, IP_FRAG)
        if frag & 0x3fff:                       # MF set or offset != 0
            return self._drop("fragment")
        proto = p[IP_PROTO]
        l4 = ihl
        l4len = tot - ihl
        th = 0
        if proto == PROTO_TCP:
            if l4len < TCP_MIN_HLEN:
                return self._drop("malformed")
            doff = (p[l4 + TCP_DOFF] >> 4) * 4
            if doff < TCP_MIN_HLEN or doff > l4len:
                return self._drop("malformed")
            th = p[l4 + TCP_FLAGS]
        elif proto == PROTO_UDP:
            if l4len < UDP_HLEN:
                return self._drop("malformed")
            (ulen,) = struct.unpack_from("!H", p, l4 + UDP_LEN)
            if ulen < UDP_HLEN or ulen > l4len:
                return self._drop("malformed")
        else:
            return self._drop("unsupported")
        saddr, daddr = struct.unpack_from("!II", p, IP_SRC)
        sport, dport = struct.unpack_from("!HH", p, l4 + L4_SPORT)
        k = (saddr, daddr, sport, dport, proto)

        # 2. a tracked flow, either direction
        ct = self.ct
        ref = ct.find(k)
        if ref is not None:
            fid, direction = ref
            e = ct.entries[fid]
            if e.expires <= now:
                ct.remove(fid)
                self.cnt["flows_expired"] += 1
                ref = None
            elif (proto == PROTO_TCP and direction == DIR_ORIG
                  and th & (TH_SYN | TH_ACK | TH_RST) == TH_SYN
                  and e.state in (CT_TIME_WAIT, CT_CLOSE)):
                ct.remove(fid)                  # port reuse: a new connection
                ref = None
        if ref is not None:
            o_saddr, o_daddr, o_sport, o_dport, _ = e.key[1 - direction]
            nat_rewrite(p, l4, proto, o_daddr, o_dport, o_saddr, o_sport)
            if proto == PROTO_TCP:
                e.state, e.flags = tcp_next_state(e.state, e.flags, direction, th)
            elif direction == DIR_REPLY:
                e.state = CT_UDP_ASSURED
            e.expires = (now + self.timeouts[e.state]) & U32
            return ("forward", "none", bytes(p[:tot]))

        # 3. a new flow: which service?
        sv = t.lookup(daddr, dport, proto) if daddr != 0 else None
        if sv is None and t.is_node_addr(daddr):
            sv = t.lookup(0, dport, proto)
        if sv is None:
            if t.is_vip(daddr) or t.is_node_addr(daddr):
                return self._reject(p, tot)     # live VIP / node address, port not served
            if daddr == self.masq:
                return self._drop("spoofed")
            if t.in_drop_cidrs(daddr):
                return self._drop("unallocated")
            return self._drop("no_service")
        if sv.source_ranges and not t.source_allowed(sv, saddr):
            return self._drop("source_denied")
        if not sv.backends:
            return self._reject(p, tot)
        if proto == PROTO_TCP and th & (TH_SYN | TH_ACK | TH_RST | TH_FIN) != TH_SYN:
            return self._drop("not_syn")

        # 4. scheduler, then a free SNAT port for the reply tuple
        baddr, bport = sv.backends[self._rand() % len(sv.backends)]
        start = self._rand() % self.port_range
        for i in range(min(PORT_TRIES, self.port_range)):
            port = self.port_lo + (start + i) % self.port_range
            rk = (baddr, self.masq, bport, port, proto)
            if ct.find(rk) is None:
                break
        else:
            return self._drop("nat_exhausted")
        fid, evicted = ct.alloc(now)
        self.cnt["flows_evicted"] += evicted
        if fid is None:
            return self._drop("table_full")
        state = CT_SYN_SENT if proto == PROTO_TCP else CT_UDP_UNREPLIED
        ct.insert(fid, _Flow(k, rk, sv.index, state, (now + self.timeouts[state]) & U32))
        self.cnt["flows_created"] += 1
        nat_rewrite(p, l4, proto, self.masq, port, baddr, bport)
        return ("forward", "none", bytes(p[:tot]))

    def process(self, pkt, now):
        """In-memory path for tests: returns (verdict, reason, out bytes|None)."""
        if len(pkt) > SLOT_SIZE:
            raise ValueError("packet larger than a slot")
        return self._process_one(self.tables, bytearray(pkt), int(now) & U32)

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
                "svc": e.svc,
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
            if p == proto and saddr == addr and (backend_port < 0 or sport == backend_port):
                self.ct.remove(fid)
                removed += 1
        return removed

    def expire(self, now, budget=U32):
        """Sweep expired flows (tests pass their own clock)."""
        r = self.ct.sweep(int(now) & U32, budget)
        self.cnt["flows_expired"] += r
        return r


def _key_tuple(k):
    saddr, daddr, sport, dport, _ = k
    return (saddr, sport, daddr, dport)
