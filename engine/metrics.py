"""Prometheus metrics (prometheus-client), with kube-proxy's names, types
and buckets where kube-proxy has the metric, so its dashboards and alerts
work unchanged; engine_* for what is the engine's own (fast-path counters
and drops, per-service-port traffic, cluster DNS).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()       # no *_created series: kube-proxy's (Go client) has none


def _exponential(start, factor, count):
    return [start * factor ** i for i in range(count)]


def _linear(start, width, count):
    return [start + width * i for i in range(count)]


# kube-proxy's buckets (pkg/proxy/metrics): 1 ms .. 16 s for a sync; 0.25 s ..
# 5 min for network programming
SYNC_BUCKETS = _exponential(0.001, 2, 15)
PROGRAMMING_BUCKETS = _linear(0.25, 0.25, 2) + _linear(1, 1, 59) + _linear(60, 5, 12) + _linear(120, 30, 7)


class Metrics:
    """The metrics of one engine; text() is what /metrics serves."""

    def __init__(self, engine):
        self.engine = engine
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.sync = Histogram("kubeproxy_sync_proxy_rules_duration_seconds",
                              "SyncProxyRules latency in seconds", buckets=SYNC_BUCKETS, registry=r)
        self.sync_full = Histogram("kubeproxy_sync_full_proxy_rules_duration_seconds",
                                   "SyncProxyRules latency in seconds for full resyncs", buckets=SYNC_BUCKETS, registry=r)
        self.sync_partial = Histogram("kubeproxy_sync_partial_proxy_rules_duration_seconds",
                                      "SyncProxyRules latency in seconds for partial resyncs", buckets=SYNC_BUCKETS,
                                      registry=r)
        self.programming = Histogram("kubeproxy_network_programming_duration_seconds",
                                     "In-cluster network programming latency in seconds: from a change of an object "
                                     "noticed to the fast path using it", buckets=PROGRAMMING_BUCKETS, registry=r)
        self.last_sync = Gauge("kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                               "The last time proxy rules were successfully synced", registry=r)
        self.endpoint_changes = Counter("kubeproxy_sync_proxy_rules_endpoint_changes_total",
                                        "Cumulative proxy rules Endpoint changes", registry=r)
        self.service_changes = Counter("kubeproxy_sync_proxy_rules_service_changes_total",
                                       "Cumulative proxy rules Service changes", registry=r)
        self.endpoint_pending = Gauge("kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                                      "Pending proxy rules Endpoint changes", registry=r)
        self.service_pending = Gauge("kubeproxy_sync_proxy_rules_service_changes_pending",
                                     "Pending proxy rules Service changes", registry=r)
        self.endpoint_pending.set_function(lambda: engine.tracker.pending()[1])
        self.service_pending.set_function(lambda: engine.tracker.pending()[0])
        r.register(_EngineCollector(engine))

    def synced(self, kind, seconds, wall, ages, service_changes, endpoint_changes):
        """One sync done: kind "full" | "partial"; ages: seconds from each
        change being noticed to now (the swap)."""
        self.sync.observe(seconds)
        (self.sync_full if kind == "full" else self.sync_partial).observe(seconds)
        self.last_sync.set(wall)
        for a in ages:
            self.programming.observe(max(0.0, a))
        self.service_changes.inc(service_changes)
        self.endpoint_changes.inc(endpoint_changes)

    def text(self):
        return generate_latest(self.registry).decode()


class _EngineCollector:
    """The fast path's own counters, read when /metrics is scraped."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        eng = self.engine
        c = eng.fp.counters()
        yield CounterMetricFamily("engine_packets_total", "Packets read from the TUN.", value=c["rx_packets"])
        yield CounterMetricFamily("engine_bytes_total", "Bytes read from the TUN.", value=c["rx_bytes"])
        yield CounterMetricFamily("engine_tx_packets_total", "Packets written to the TUN.", value=c["tx_packets"])
        drops = CounterMetricFamily("engine_drops_total", "Packets dropped, by reason.", labels=["reason"])
        for reason, n in c["drops_by_reason"].items():
            drops.add_metric([reason], n)
        yield drops
        yield CounterMetricFamily("engine_rejects_total", "New flows refused (ICMP unreachable).", value=c["rejects"])
        yield GaugeMetricFamily("engine_conntrack_entries", "Flows in the flow table.", value=c["flows"])
        yield CounterMetricFamily("engine_flows_created_total", "Flows opened.", value=c["flows_created"])
        ids = eng.state.services.ids
        per = eng.fp.service_counters(sorted(ids.values()))
        names = {i: n for n, i in ids.items()}
        for metric, key, help_ in (("engine_service_packets_total", "packets", "Packets of a service port, both directions."),
                                   ("engine_service_bytes_total", "bytes", "Bytes of a service port, both directions."),
                                   ("engine_service_flows_total", "flows", "Flows opened to a service port."),
                                   ("engine_service_rejects_total", "rejects", "New flows refused: no ready endpoint."),
                                   ("engine_service_denied_total", "denied", "New flows dropped by loadBalancerSourceRanges.")):
            fam = CounterMetricFamily(metric, help_, labels=["service"])
            for i, cs in sorted(per.items()):
                if i in names:
                    fam.add_metric([names[i]], cs[key])
            yield fam
        if eng.api is not None:
            yield from _api_metrics(eng)
        if eng.dns:
            fam = CounterMetricFamily("engine_dns_requests_total", "Cluster DNS requests, by outcome.", labels=["outcome"])
            for k, v in sorted(eng.dns.stats.items()):
                fam.add_metric([k], v)
            yield fam
            yield from eng.dns.collector.collect()      # CoreDNS's names: coredns_dns_*, coredns_cache_*


def _api_metrics(eng):
    """The API source: whether the API server is reachable (while it is not,
    the last state keeps forwarding) and what each reflector did."""
    api = eng.api
    yield GaugeMetricFamily("engine_api_connected", "1 while every watch of the API server is up; 0 while the "
                            "engine forwards with the last state it had.", value=int(api.connected))
    objs = GaugeMetricFamily("engine_api_objects", "Objects held from the API server, by kind.", labels=["kind"])
    for r in api.reflectors:
        objs.add_metric([r.kind], len(r.cache))
    yield objs
    for name, key, help_ in (("engine_api_lists_total", "lists", "Full lists (first, after 410 Gone or an error)."),
                             ("engine_api_relists_gone_total", "relists_gone", "Relists after 410 Gone."),
                             ("engine_api_watch_events_total", "events", "Watch events applied."),
                             ("engine_api_errors_total", "errors", "Failed lists and watches (retried with backoff).")):
        fam = CounterMetricFamily(name, help_, labels=["kind"])
        for r in api.reflectors:
            fam.add_metric([r.kind], r.counts[key])
        yield fam
    yield CounterMetricFamily("engine_api_refused_objects_total", "API objects refused (each logged with the "
                              "reason).", value=eng.api_refused)
