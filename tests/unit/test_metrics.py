"""/metrics as kube-proxy serves it: the sync duration and network
programming latency are histograms, full and partial syncs apart, change
counters and pending gauges; the engine's own counters beside them."""
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import config, refpath
from engine.host import FakeHost
from engine.proxier import Engine

CFG = """kind: EngineConfiguration
dns: {clusterIP: null}
---
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.20, selector: {app: web}, ports: [{port: 80}]}
---
kind: Pod
metadata: {name: web-1, labels: {app: web}}
status: {podIP: 10.244.0.5}
"""


def families(eng):
    return {f.name: f for f in text_string_to_metric_families(eng.metrics_text())}


def value(fam, sample_name, **labels):
    return next(s.value for s in fam.samples if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture
def engine():
    eng = Engine(config.load(text=CFG), host=FakeHost(), fastpath=refpath, serve_dns=False)
    eng.start()
    yield eng
    eng.stop()


def test_kube_proxy_metric_types(engine):
    f = families(engine)
    for name in ("kubeproxy_sync_proxy_rules_duration_seconds", "kubeproxy_sync_full_proxy_rules_duration_seconds",
                 "kubeproxy_sync_partial_proxy_rules_duration_seconds", "kubeproxy_network_programming_duration_seconds"):
        assert f[name].type == "histogram", name
    for name in ("kubeproxy_sync_proxy_rules_endpoint_changes", "kubeproxy_sync_proxy_rules_service_changes"):
        assert f[name].type == "counter", name
    for name in ("kubeproxy_sync_proxy_rules_endpoint_changes_pending", "kubeproxy_sync_proxy_rules_service_changes_pending",
                 "kubeproxy_sync_proxy_rules_last_timestamp_seconds", "engine_conntrack_entries"):
        assert f[name].type == "gauge", name
    assert f["engine_drops_total" if "engine_drops_total" in f else "engine_drops"].type == "counter"
    assert not [s.name for fam in f.values() for s in fam.samples if s.name.endswith("_created")]
    # the first sync was full, with the first objects as changes
    assert value(f["kubeproxy_sync_full_proxy_rules_duration_seconds"], "kubeproxy_sync_full_proxy_rules_duration_seconds_count") == 1
    assert value(f["kubeproxy_sync_proxy_rules_service_changes"], "kubeproxy_sync_proxy_rules_service_changes_total") == 1


def test_a_partial_sync_is_counted_and_timed(engine):
    engine.update("Pod", ("default", "web-2"), config.parse_text(
        "kind: Pod\nmetadata: {name: web-2, labels: {app: web}}\nstatus: {podIP: 10.244.0.6}\n", "x").pods[0])
    f = families(engine)
    assert value(f["kubeproxy_sync_proxy_rules_endpoint_changes_pending"], "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 1
    engine.sync()
    f = families(engine)
    assert value(f["kubeproxy_sync_proxy_rules_endpoint_changes_pending"], "kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0
    assert value(f["kubeproxy_sync_partial_proxy_rules_duration_seconds"], "kubeproxy_sync_partial_proxy_rules_duration_seconds_count") == 1
    assert value(f["kubeproxy_sync_proxy_rules_duration_seconds"], "kubeproxy_sync_proxy_rules_duration_seconds_count") == 2
    assert value(f["kubeproxy_sync_proxy_rules_endpoint_changes"], "kubeproxy_sync_proxy_rules_endpoint_changes_total") == 2
    prog = f["kubeproxy_network_programming_duration_seconds"]
    assert value(prog, "kubeproxy_network_programming_duration_seconds_count") == 3     # the 2 first objects, the pod
    assert value(prog, "kubeproxy_network_programming_duration_seconds_bucket", le="0.25") >= 1
