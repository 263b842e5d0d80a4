"""A cache of upstream answers, as CoreDNS's cache plugin: positive and
negative entries (negative per RFC 2308: for as long as the SOA says), TTLs
clamped to [min_ttl, max_ttl] (negative to negative_max_ttl), TTLs counted
down on every hit, prefetch of popular names before they expire, and
serve-stale (RFC 8767) for a bounded time while the upstream is down.

Pure bookkeeping: the server asks get(), forwards on a miss and put()s the
answer; refreshing (prefetch) is the server's job, the cache only says when.
Thread-safe; the clock is injectable."""
from __future__ import annotations

import collections
import struct
import threading
import time

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

STALE_TTL = 30            # TTL of a stale answer (RFC 8767 section 4)
PREFETCH_GAP = 60.0       # a name stays popular while asked at least this often (CoreDNS: 1m)
PREFETCH_PERCENT = 10     # prefetch once less than this share of the TTL is left (CoreDNS: 10%)


class Entry:
    __slots__ = ("wire", "stored", "ttl", "negative", "hits", "last_hit", "refreshing", "fast", "patched")

    def __init__(self, wire, stored, ttl, negative):
        self.wire = wire              # the upstream answer, id 0
        self.stored = stored
        self.ttl = ttl
        self.negative = negative
        self.hits = 0
        self.last_hit = stored
        self.refreshing = False
        # for the server's answer table: (flags, ancount, nscount, arcount, sections after the
        # question with a lowercased question, [(offset of a TTL in them, its value)])
        self.fast = None
        self.patched = None               # (whole seconds elapsed, the sections with TTLs counted down)


class DNSCache:
    """max_entries 0 turns the cache off (get always misses, put keeps nothing)."""

    def __init__(self, max_entries=9984, max_ttl=3600, min_ttl=5, negative_max_ttl=1800, prefetch=10,
                 serve_stale=300, clock=time.monotonic):
        self.max_entries = int(max_entries)
        self.max_ttl = int(max_ttl)
        self.min_ttl = int(min_ttl)
        self.negative_max_ttl = int(negative_max_ttl)
        self.prefetch = int(prefetch)
        self.serve_stale = int(serve_stale)
        self.clock = clock
        self._entries = collections.OrderedDict()      # key -> Entry, least recently used first
        # (lowercased qname wire, qtype) -> Entry with .fast: what the server may answer from
        # bytes (class IN, no DO); emptied when the cluster zone changes (see promote)
        self.fast = {}
        self._lock = threading.Lock()
        self.stats = dict.fromkeys(("hits_success", "hits_denial", "misses", "prefetch", "served_stale",
                                    "evictions", "inserts"), 0)

    @staticmethod
    def key(q):
        """(lowercased name, type, class, DO) of a query's question, or None."""
        if len(q.question) != 1:
            return None
        qq = q.question[0]
        do = bool(q.ednsflags & dns.flags.DO) if q.edns >= 0 else False
        return (qq.name.to_text().lower(), qq.rdtype, qq.rdclass, do)

    def ttl_of(self, r):
        """How long answer r may be cached: (seconds, negative) or None for
        "not at all" (errors, truncated answers, a negative answer without SOA)."""
        if r.flags & dns.flags.TC:
            return None
        rc = r.rcode()
        negative = rc == dns.rcode.NXDOMAIN or (rc == dns.rcode.NOERROR and not r.answer)
        if rc not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return None
        if negative:
            soas = [rr for rr in r.authority if rr.rdtype == dns.rdatatype.SOA]
            if not soas:
                return None
            ttl = min(min(soas[0].ttl, rd.minimum) for rd in soas[0])      # RFC 2308 section 5
            cap = self.negative_max_ttl
        else:
            ttls = [rr.ttl for sec in (r.answer, r.authority, r.additional) for rr in sec
                    if rr.rdtype != dns.rdatatype.OPT]
            ttl = min(ttls) if ttls else self.min_ttl
            cap = self.max_ttl
        return max(self.min_ttl, min(ttl, cap)), negative

    def put(self, q, r):
        """Keep upstream answer r to query q, if it may be kept."""
        if self.max_entries <= 0:
            return
        k = self.key(q)
        t = self.ttl_of(r)
        if k is None or t is None:
            return
        wire = r.to_wire()
        now = self.clock()
        with self._lock:
            old = self._entries.pop(k, None)
            if old is not None and old.fast is not None:
                self._unfast(k)
            e = Entry(wire, now, t[0], t[1])
            if old is not None:               # a refresh keeps the name's popularity
                e.hits, e.last_hit = old.hits, old.last_hit
            self._entries[k] = e
            self.stats["inserts"] += 1
            while len(self._entries) > self.max_entries:
                ok, oe = self._entries.popitem(last=False)
                if oe.fast is not None:
                    self._unfast(ok)
                self.stats["evictions"] += 1

    def get(self, q):
        """(response for q, state) with state "fresh", "stale" (expired, but
        within serve_stale: to be used only when the upstream fails) or
        "miss" (response None). A fresh hit may also say "prefetch": fresh,
        and worth refreshing now (state "prefetch")."""
        if self.max_entries <= 0:
            return None, "miss"
        k = self.key(q)
        if k is None:
            return None, "miss"
        now = self.clock()
        state = "fresh"
        with self._lock:
            e = self._entries.get(k)
            if e is None:
                self.stats["misses"] += 1
                return None, "miss"
            age = now - e.stored
            if age >= e.ttl:
                if e.fast is not None:
                    self._unfast(k)
                if age - e.ttl > self.serve_stale:
                    del self._entries[k]
                    self.stats["misses"] += 1
                    return None, "miss"
                self.stats["misses"] += 1
                state = "stale"
            else:
                self._entries.move_to_end(k)
                e.hits = e.hits + 1 if now - e.last_hit < PREFETCH_GAP else 1
                e.last_hit = now
                self.stats["hits_denial" if e.negative else "hits_success"] += 1
                left = e.ttl - age
                if (self.prefetch and e.hits >= self.prefetch and not e.refreshing
                        and left * 100 < e.ttl * PREFETCH_PERCENT):
                    e.refreshing = True
                    self.stats["prefetch"] += 1
                    state = "prefetch"
            wire = e.wire
        r = dns.message.from_wire(wire)
        r.id = q.id
        elapsed = int(age)
        for sec in (r.answer, r.authority, r.additional):
            for rr in sec:
                rr.ttl = STALE_TTL if state == "stale" else max(0, rr.ttl - elapsed)
        return r, state

    @staticmethod
    def _fast_key(k):
        return (dns.name.from_text(k[0]).to_wire().lower(), k[1])

    def _unfast(self, k):
        self.fast.pop(self._fast_key(k), None)

    def promote(self, q):
        """Let the server answer q from bytes while its entry is fresh: call
        only for a name the cluster zone does not answer (the server does,
        after the zone said no)."""
        k = self.key(q)
        if k is None or k[2] != dns.rdataclass.IN or k[3]:
            return
        with self._lock:
            e = self._entries.get(k)
            if e is None or self.clock() - e.stored >= e.ttl:
                return
            if e.fast is None:
                e.fast = _fast_form(e.wire, q.question[0].name.to_wire().lower(), k[1])
            if e.fast is not None:
                self.fast[self._fast_key(k)] = e

    def clear_fast(self):
        """The cluster zone changed: a name it now answers must not come from here."""
        with self._lock:
            self.fast = {}

    def served_stale(self):
        with self._lock:
            self.stats["served_stale"] += 1

    def refresh_failed(self, q):
        """A prefetch that got nothing: let a later hit try again."""
        k = self.key(q)
        with self._lock:
            e = self._entries.get(k)
            if e is not None:
                e.refreshing = False

    def counts(self):
        """(positive entries, negative entries)."""
        with self._lock:
            neg = sum(1 for e in self._entries.values() if e.negative)
            return len(self._entries) - neg, neg

    def __len__(self):
        return len(self._entries)


def _fast_form(wire, lname, qtype):
    """An upstream answer as the server's answer table keeps it, or None."""
    try:
        c = dns.message.from_wire(wire)
        c.use_edns(False)
        c.id = 0
        c.question = [dns.rrset.RRset(dns.name.from_wire(lname, 0)[0], dns.rdataclass.IN, qtype)]
        w = c.to_wire()
    except Exception:
        return None
    an, ns, ar = struct.unpack("!HHH", w[6:12])
    start = 12 + len(lname) + 4
    ttls = _ttl_offsets(w, start, an + ns + ar)
    if ttls is None:
        return None
    flags = 0x8000 | (w[3] & 0x0F)                   # QR and the rcode; RD, RA per query; never AA
    return flags, an, ns, ar, w[start:], [(off - start, ttl) for off, ttl in ttls]


def _ttl_offsets(w, i, count):
    """[(offset, value)] of the TTL of each of `count` records from offset i
    of message w, or None if they do not parse (bounds-checked)."""
    out, n = [], len(w)
    for _ in range(count):
        while True:                                  # the owner name: labels, or a pointer
            if i >= n:
                return None
            ln = w[i]
            if ln & 0xC0 == 0xC0:
                i += 2
                break
            if ln > 63:
                return None
            i += ln + 1
            if ln == 0:
                break
        if i + 10 > n:
            return None
        out.append((i + 4, struct.unpack_from("!I", w, i + 4)[0]))
        i += 10 + struct.unpack_from("!H", w, i + 8)[0]
        if i > n:
            return None
    return out
