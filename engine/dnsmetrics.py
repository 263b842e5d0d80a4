"""The cluster DNS's metrics under CoreDNS's names and labels, so its
dashboards work: coredns_dns_requests_total, coredns_dns_responses_total,
coredns_dns_request_duration_seconds, coredns_cache_*.

Counting is plain integers under one lock (the query path pays no more);
DNSCollector turns them into metric families for prometheus-client when
/metrics is read. CoreDNS's label sets are kept (server, zone, view, ...),
with the values a single server block `.:53` would have."""
from __future__ import annotations

import bisect
import collections
import threading

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# CoreDNS's request duration buckets: ExponentialBuckets(0.00025, 2, 16)
BUCKETS = tuple(0.00025 * 2 ** i for i in range(16))
# the types CoreDNS names in its "type" label (plugin/metrics/vars: monitorType); the rest is "other"
TYPES = {1: "A", 28: "AAAA", 5: "CNAME", 6: "SOA", 2: "NS", 12: "PTR", 33: "SRV", 15: "MX", 16: "TXT",
         255: "ANY", 35: "NAPTR", 43: "DS", 48: "DNSKEY", 46: "RRSIG", 47: "NSEC", 50: "NSEC3", 65: "HTTPS",
         64: "SVCB", 252: "AXFR", 251: "IXFR"}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def qtype_of(wire):
    """The question's type of a query in wire form, or None (bounds-checked)."""
    n = len(wire)
    if n < 17:
        return None
    i = 12
    while i < n:
        ln = wire[i]
        if ln == 0:
            return (wire[i + 1] << 8) | wire[i + 2] if i + 3 <= n else None
        if ln > 63:
            return None
        i += ln + 1
    return None


class DNSMetrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = collections.Counter()         # (proto, type) -> n
        self.responses = collections.Counter()        # rcode name -> n
        self.hist = {}                                # type -> [count per bucket..., +Inf], sum
        # the same, written by the UDP receive loop alone (no lock on its path); UDP
        self.loop_requests = collections.Counter()
        self.loop_responses = collections.Counter()
        self.loop_hist = {}

    def observe_loop(self, qtype, rcode, seconds):
        """observe() for the UDP receive loop's own thread."""
        t = TYPES.get(qtype, "other")
        self.loop_requests[t] += 1
        if rcode is None:
            return
        self.loop_responses[RCODES.get(rcode, str(rcode))] += 1
        h = self.loop_hist.get(t)
        if h is None:
            h = self.loop_hist[t] = [[0] * (len(BUCKETS) + 1), 0.0]
        h[0][bisect.bisect_left(BUCKETS, seconds)] += 1
        h[1] += seconds

    def snapshot(self):
        """(requests, responses, hist) of both kinds, added up."""
        with self._lock:
            requests = collections.Counter(self.requests)
            responses = collections.Counter(self.responses)
            hist = {t: [list(h[0]), h[1]] for t, h in self.hist.items()}
        for t, n in dict(self.loop_requests).items():
            requests[("udp", t)] += n
        responses.update(dict(self.loop_responses))
        for t, h in dict(self.loop_hist).items():
            counts, total = list(h[0]), h[1]
            mine = hist.setdefault(t, [[0] * (len(BUCKETS) + 1), 0.0])
            mine[0] = [a + b for a, b in zip(mine[0], counts)]
            mine[1] += total
        return requests, responses, hist

    def observe(self, proto, qtype, rcode, seconds):
        """One request; rcode None: no response was sent (dropped)."""
        t = TYPES.get(qtype, "other")
        with self._lock:
            self.requests[(proto, t)] += 1
            if rcode is None:
                return
            self.responses[RCODES.get(rcode, str(rcode))] += 1
            h = self.hist.get(t)
            if h is None:
                h = self.hist[t] = [[0] * (len(BUCKETS) + 1), 0.0]
            h[0][bisect.bisect_left(BUCKETS, seconds)] += 1
            h[1] += seconds



class DNSCollector:
    """prometheus-client collector of one DNSServer."""

    SERVER = "dns://:53"

    def __init__(self, server):
        self.server = server

    def collect(self):
        m = self.server.metrics
        srv = self.SERVER
        requests, responses, hist = m.snapshot()
        c = CounterMetricFamily("coredns_dns_requests", "Counter of DNS requests made per zone, protocol and family.",
                                labels=["server", "zone", "view", "proto", "family", "type"])
        for (proto, t), n in sorted(requests.items()):
            c.add_metric([srv, ".", "", proto, "1", t], n)
        yield c
        c = CounterMetricFamily("coredns_dns_responses", "Counter of response status codes.",
                                labels=["server", "zone", "view", "rcode", "plugin"])
        for rc, n in sorted(responses.items()):
            c.add_metric([srv, ".", "", rc, ""], n)
        yield c
        h = HistogramMetricFamily("coredns_dns_request_duration_seconds",
                                  "Histogram of the time (in seconds) each request took per zone.",
                                  labels=["server", "zone", "view", "type"])
        for t, (counts, total) in sorted(hist.items()):
            acc, buckets = 0, []
            for le, n in zip([*(repr(b) for b in BUCKETS), "+Inf"], counts):
                acc += n
                buckets.append((le, acc))
            h.add_metric([srv, ".", "", t], buckets, total)
        yield h
        cache = self.server.cache
        st = dict(cache.stats)
        pos, neg = cache.counts()
        labels = ["server", "type", "view", "zones"]
        c = CounterMetricFamily("coredns_cache_hits", "The count of cache hits.", labels=labels)
        c.add_metric([srv, "success", "", "."], st["hits_success"])
        c.add_metric([srv, "denial", "", "."], st["hits_denial"])
        yield c
        c = CounterMetricFamily("coredns_cache_misses", "The count of cache misses.", labels=["server", "view", "zones"])
        c.add_metric([srv, "", "."], st["misses"])
        yield c
        g = GaugeMetricFamily("coredns_cache_entries", "The number of elements in the cache.", labels=labels)
        g.add_metric([srv, "success", "", "."], pos)
        g.add_metric([srv, "denial", "", "."], neg)
        yield g
        for name, key, help_ in (("coredns_cache_prefetch", "prefetch", "The number of times the cache has prefetched a cached item."),
                                 ("coredns_cache_served_stale", "served_stale", "The number of requests served from stale cache entries."),
                                 ("coredns_cache_evictions", "evictions", "The count of cache evictions.")):
            c = CounterMetricFamily(name, help_, labels=["server", "view", "zones"])
            c.add_metric([srv, "", "."], st[key])
            yield c
        # the engine's own guard counters, under the engine's prefix
        c = CounterMetricFamily("engine_dns_guard_drops", "Queries turned away by the DNS's guards, by reason.",
                                labels=["reason"])
        stats = dict(self.server.stats)
        for reason in ("ratelimited", "rrl_dropped", "rrl_slipped", "tcp_refused", "tcp_deadline"):
            c.add_metric([reason], stats.get(reason, 0))
        if self.server.gate is not None:
            c.add_metric(["new_source_budget"], self.server.gate.turned_away)
        yield c


def metrics_text(server):
    """The collector's metrics in Prometheus text format."""
    from prometheus_client import CollectorRegistry, generate_latest
    reg = CollectorRegistry(auto_describe=False)
    reg.register(DNSCollector(server))
    return generate_latest(reg).decode()
