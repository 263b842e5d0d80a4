"""What keeps the cluster DNS from being flooded, locked out or used as a
reflector: per-source and global budgets, BIND-style response-rate limiting,
DNS cookies (RFC 7873/9018) that tell a real client from a spoofed one, and
the per-source TCP connection count. Pure bookkeeping, thread-safe, every
clock injectable; engine/dns.py applies them."""
from __future__ import annotations

import collections
import hashlib
import hmac
import os
import socket
import struct
import threading
import time

RATE_LIMIT = 100.0            # queries per second per source address (0: no limit)
RATE_BURST = 200              # token bucket size per source address
RATE_SOURCES = 65536          # sources tracked by the rate limiter (least recent forgotten)
COOKIE_OPTION = 10            # EDNS option code of DNS COOKIE (RFC 7873)
COOKIE_LIFETIME = 3600        # seconds a server cookie stays valid (RFC 9018: 1 hour)
COOKIE_FUTURE = 300           # seconds a cookie's timestamp may lie ahead (clock skew)


class RateLimiter:
    """Per-key token buckets: `rate` tokens a second, at most `burst`; one
    token per query. At most `max_keys` keys are tracked (a spoofed flood
    cannot grow the table): the least recently seen is forgotten first.
    rate <= 0 disables the limit. Thread-safe; the clock is injectable.

    gate: a NewSourceGate, asked before a key is added, so a flood of
    never-seen (spoofed) keys cannot push known ones out of the table."""

    def __init__(self, rate=RATE_LIMIT, burst=RATE_BURST, max_keys=RATE_SOURCES, clock=time.monotonic, gate=None):
        self.rate = float(rate or 0)
        self.burst = float(max(1, burst))
        self.max_keys = max(1, int(max_keys))
        self.clock = clock
        self.gate = gate
        self._buckets = collections.OrderedDict()      # key -> [tokens, last refill]
        self._lock = threading.Lock()

    def allow(self, key, verified=False):
        """One token of key's bucket: True, or False when spent or (a new
        key, not verified) when the gate turns it away."""
        if self.rate <= 0 and self.gate is None:
            return True
        now = self.clock()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                if not verified and self.gate is not None and not self.gate.admit(key, now):
                    return False
                if len(self._buckets) >= self.max_keys:
                    self._buckets.popitem(last=False)
                b = self._buckets[key] = [self.burst, now]
            else:
                self._buckets.move_to_end(key)
                b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
                b[1] = now
            if self.rate <= 0:
                return True
            if b[0] >= 1.0:
                b[0] -= 1.0
                return True
            return False

    def __len__(self):
        return len(self._buckets)


class NewSourceGate:
    """The global budget beside the per-source one: sources not seen before
    are admitted at most `rate` a second (burst `rate`), all together. A
    spoofed flood is made of such sources; clients already known keep their
    own bucket (and their place in the table, which new sources enter only
    at this rate) and are not affected. A newcomer during a flood may be
    turned away; a retry can get in, and TCP always does (the handshake
    proves the address, so it needs no budget). There is no "second chance"
    for a source seen before: a spoofer can repeat its sources as easily as a
    client retries. Called with the RateLimiter's lock held."""

    def __init__(self, rate):
        self.rate = float(rate)
        self.tokens = self.rate
        self.last = None
        self.turned_away = 0

    def admit(self, key, now):
        if self.rate <= 0:
            return True
        if self.last is not None:
            self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.turned_away += 1
        return False


class ResponseRateLimiter:
    """Response-rate limiting as BIND's RRL: at most `rate` identical
    responses a second (burst `rate`) to one client network (/24 for IPv4,
    /56 for IPv6). An answer past the budget is dropped, except every
    `slip`-th one, which goes out truncated (TC=1, no records: smaller than
    the query), so a real client behind a spoofed victim's network retries
    over TCP and still gets its answer. `key` is what counts as identical:
    the caller makes it from the name, type and rcode (NXDOMAINs per zone).
    Returns "ok", "slip" or "drop"."""

    def __init__(self, rate, slip=2, max_keys=RATE_SOURCES, clock=time.monotonic):
        self.slip = int(slip)
        self.limiter = RateLimiter(rate, max(1, int(rate)), max_keys, clock)
        self.drops = collections.Counter()
        self._lock = threading.Lock()
        self.enabled = rate > 0

    @staticmethod
    def network(src_ip):
        if ":" in src_ip:
            try:
                return socket.inet_pton(socket.AF_INET6, src_ip)[:7]
            except OSError:
                return src_ip
        return src_ip.rpartition(".")[0]

    def check(self, src_ip, key):
        if not self.enabled:
            return "ok"
        k = (self.network(src_ip), key)
        if self.limiter.allow(k):
            return "ok"
        with self._lock:
            if len(self.drops) > self.limiter.max_keys:
                self.drops.clear()
            self.drops[k] += 1
            n = self.drops[k]
        return "slip" if self.slip and n % self.slip == 0 else "drop"


class Cookies:
    """DNS COOKIE (RFC 7873), server cookies in RFC 9018's layout: version 1,
    3 reserved bytes, a 32-bit timestamp and an 8-byte keyed hash of the
    client cookie, that header and the client address (BLAKE2b with a
    per-process secret; the hash is ours alone, as nothing else has to
    verify it). A query that returns a valid server cookie comes from an
    address that received our earlier answer: not spoofed."""

    def __init__(self, secret=None, clock=time.time):
        self.secret = secret or os.urandom(16)
        self.clock = clock

    def _hash(self, client, head, src_ip):
        return hashlib.blake2b(client + head + src_ip.encode(), key=self.secret, digest_size=8).digest()

    def server_cookie(self, client, src_ip):
        head = struct.pack("!B3xI", 1, int(self.clock()) & 0xFFFFFFFF)
        return head + self._hash(client, head, src_ip)

    def check(self, data, src_ip):
        """COOKIE option data -> (valid, client cookie); client is None for
        a malformed option (RFC 7873 5.2.2: FORMERR)."""
        if len(data) == 8:
            return False, data
        if len(data) < 16 or len(data) > 40:
            return False, None
        client, server = data[:8], data[8:]
        if len(server) != 16 or server[0] != 1:
            return False, client
        ts = struct.unpack("!I", server[4:8])[0]
        now = int(self.clock()) & 0xFFFFFFFF
        age = (now - ts) & 0xFFFFFFFF              # serial arithmetic (RFC 1982)
        fresh = age <= COOKIE_LIFETIME or (0x100000000 - age) <= COOKIE_FUTURE
        ok = fresh and hmac.compare_digest(server[8:], self._hash(client, server[:8], src_ip))
        return ok, client


class ConnectionCounter:
    """TCP connections per source and in total, with caps on both: one source
    at its cap is refused while every other source is still served."""

    def __init__(self, per_source, total):
        self.per_source = per_source
        self.total = total
        self.by_source = collections.Counter()
        self.count = 0
        self._lock = threading.Lock()

    def acquire(self, src_ip):
        """A slot for src_ip: "ok", or why not ("source" or "total")."""
        with self._lock:
            if self.by_source[src_ip] >= self.per_source:
                return "source"
            if self.count >= self.total:
                return "total"
            self.by_source[src_ip] += 1
            self.count += 1
            return "ok"

    def release(self, src_ip):
        with self._lock:
            self.count -= 1
            self.by_source[src_ip] -= 1
            if self.by_source[src_ip] <= 0:
                del self.by_source[src_ip]
