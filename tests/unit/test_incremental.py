"""One change tracker, one sync: every source's changes take the partial
path (services too) and must give what a full rebuild gives, on both fast
paths, with the host faked (no root, netlink or pytun needed)."""
import contextlib
import itertools
import random
import subprocess
import sys
import time

import pytest
from scapy.all import IP, TCP, UDP, raw

from engine import config, refpath, servicemap, views
from engine.changes import ChangeTracker
from engine.config import ConfigError
from engine.proxier import NotFound
from engine.host import FakeHost
from engine.proxier import Engine

try:
    from engine import _fastpath
    TARGETS = [_fastpath, refpath]
except ImportError:         # not built: the reference path still runs everything
    TARGETS = [refpath]


def pod(name, ip, app, ready=True, ns="default"):
    return f"""---
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}
spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: "{'True' if ready else 'False'}"}}]}}
"""


def service(name, ip, app, port=80, extra=""):
    return f"""---
kind: Service
metadata: {{name: {name}}}
spec:
  clusterIP: {ip}
  selector: {{app: {app}}}
  ports: [{{name: http, port: {port}, targetPort: http}}]{extra}
"""


def base(n_svc=20, pods_per=3):
    docs = ["kind: EngineConfiguration\nscheduler: rr\nloadBalancerCIDR: 172.18.255.0/24\n"]
    for i in range(n_svc):
        sched = "\n  annotations: {engine.io/scheduler: mh}" if i % 5 == 0 else ""
        docs.append(f"""---
kind: Service
metadata:
  name: s{i}{sched}
spec:
  clusterIP: 10.96.1.{i + 1}
  selector: {{app: a{i}}}
  ports: [{{name: http, port: 80, targetPort: http}}]
""")
        for j in range(pods_per):
            docs.append(pod(f"p{i}-{j}", f"10.244.{i}.{j + 2}", f"a{i}"))
    docs.append("""---
kind: Service
metadata: {name: ext}
spec: {clusterIP: 10.96.2.1, ports: [{name: dns, protocol: UDP, port: 53}]}
---
kind: EndpointSlice
metadata: {name: ext-1, labels: {kubernetes.io/service-name: ext}}
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.244.99.2]}]
""")
    return "".join(docs)


@pytest.fixture(params=TARGETS, ids=lambda m: m.__name__.split(".")[-1])
def engine(request, tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(base())
    host = FakeHost(node_addresses=["192.168.50.1"])
    eng = Engine(config.load(str(p)), host=host, fastpath=request.param, serve_dns=False)
    eng.start()
    yield eng
    eng.stop()


def full_view(eng):
    """What a full build of the same objects gives."""
    smap = servicemap.build(config.from_objects(eng.cfg, eng.sources.all()))
    return views.services(smap), views.endpoints(smap)


def view(eng):
    return views.services(eng.smap), views.endpoints(eng.smap)


_clients = itertools.count()


def backends_seen(eng, vip, port=80, n=60, proto=TCP):
    """Where new flows to vip:port go (fresh client ports: no tracked flow)."""
    out = set()
    for k in range(n):
        sport = 1024 + next(_clients) % 60000
        l4 = TCP(sport=sport, dport=port, flags="S") if proto is TCP else UDP(sport=sport, dport=port)
        pkt = IP(src=f"192.168.{k % 200}.{k // 200 + 1}", dst=vip) / l4
        v, _, o = eng.fp.process(raw(pkt), 10)
        if v == "forward":
            out.add(IP(o).dst)
        elif v == "reply":
            out.add("refused")
        else:
            out.add(v)
    return out


def no_full_sync(eng):
    def fail(*a, **kw):
        pytest.fail("a change took the full path")
    eng._full = fail


def test_pod_changes_match_a_full_rebuild(engine):
    rng = random.Random(7)
    syncs = engine.syncs
    no_full_sync(engine)
    for step in range(40):
        i, j = rng.randrange(20), rng.randrange(5)
        action = rng.choice(["ready", "unready", "delete", "move"])
        if action == "delete":          # a pod deleted twice: NotFound, as kubectl, and nothing changes
            with contextlib.suppress(NotFound):
                engine.apply(pod(f"p{i}-{j}", f"10.244.{i}.{j + 2}", f"a{i}"), "x", delete=True)
        elif action == "move":          # relabelled: leaves one service, joins another
            engine.apply(pod(f"p{i}-{j}", f"10.244.{i}.{j + 2}", f"a{(i + 1) % 20}"), "x")
        else:
            engine.apply(pod(f"p{i}-{j}", f"10.244.{i}.{j + 2}", f"a{i}", ready=action == "ready"), "x")
        assert view(engine) == full_view(engine)
    assert engine.syncs <= syncs + 40       # an apply that changes nothing syncs nothing
    for i in range(20):
        info = engine.smap.services[f"default/s{i}"]
        want = {e.ip for e in info.ports[0].usable} or {"refused"}
        assert backends_seen(engine, f"10.96.1.{i + 1}") == want, i


def test_endpointslice_change(engine):
    no_full_sync(engine)
    engine.apply("""kind: EndpointSlice
metadata: {name: ext-1, labels: {kubernetes.io/service-name: ext}}
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.244.99.3, 10.244.99.4]}]
""", "x")
    eps = engine.smap.services["default/ext"].ports[0].usable
    assert sorted(e.ip for e in eps) == ["10.244.99.3", "10.244.99.4"]
    assert view(engine) == full_view(engine)
    assert backends_seen(engine, "10.96.2.1", 53, proto=UDP) == {"10.244.99.3", "10.244.99.4"}


def test_service_added_changed_deleted_take_the_partial_path(engine):
    no_full_sync(engine)
    rows = engine.fp.current_tables.size
    # added, with pods of its own
    engine.apply(service("new", "10.96.3.1", "n") + pod("n-0", "10.244.30.2", "n"), "x")
    assert engine.last_sync_kind == "partial"
    assert engine.fp.current_tables.size == rows + 1
    assert backends_seen(engine, "10.96.3.1") == {"10.244.30.2"}
    assert view(engine) == full_view(engine)
    # its port changes: the old one is gone, the new one serves
    engine.apply(service("new", "10.96.3.1", "n", port=8080), "x")
    assert backends_seen(engine, "10.96.3.1", 8080) == {"10.244.30.2"}
    assert backends_seen(engine, "10.96.3.1", 80) == {"refused"}    # a VIP port not served
    # type NodePort: a node-port row more, the host steers node ports to the node's address
    engine.apply(service("new", "10.96.3.1", "n", port=8080, extra="\n  type: NodePort"), "x")
    assert engine.fp.current_tables.size == rows + 2
    node_port = engine.smap.services["default/new"].ports[0].node_port
    assert engine.host.node_port_routing == (["192.168.50.1"], (30000, 32767))
    assert backends_seen(engine, "192.168.50.1", node_port) == {"10.244.30.2"}
    # affinity and scheduler
    engine.apply(service("new", "10.96.3.1", "n", port=8080,
                         extra="\n  type: NodePort\n  sessionAffinity: ClientIP"), "x")
    row = engine.compiler.rows["default/new"][0]
    assert row["affinity_timeout"] == 10800
    engine.apply(service("new", "10.96.3.1", "n", port=8080).replace(
        "metadata: {name: new}", "metadata: {name: new, annotations: {engine.io/scheduler: mh}}"), "x")
    assert engine.compiler.rows["default/new"][0]["scheduler"] == 4
    assert engine.fp.current_tables.size == rows + 1
    assert view(engine) == full_view(engine)
    # deleted: the VIP is no longer served, every other service still is
    engine.apply(service("new", "10.96.3.1", "n", port=8080), "x", delete=True)
    assert engine.fp.current_tables.size == rows
    assert "default/new" not in engine.smap.services
    assert backends_seen(engine, "10.96.3.1", 8080) == {"drop"}
    assert backends_seen(engine, "10.96.1.4") == {"10.244.3.2", "10.244.3.3", "10.244.3.4"}
    assert view(engine) == full_view(engine)


def test_load_balancer_routes_follow_partial_changes(engine):
    no_full_sync(engine)
    engine.apply(service("lb", "10.96.3.2", "a1", extra="\n  type: LoadBalancer\n  externalIPs: [203.0.113.9]"), "x")
    info = engine.smap.services["default/lb"]
    assert info.ingress_ip == "172.18.255.1"
    assert engine.host.extra_routes == {"203.0.113.9/32"}      # the pool itself is routed whole
    assert backends_seen(engine, "203.0.113.9") == {"10.244.1.2", "10.244.1.3", "10.244.1.4"}
    engine.apply(service("lb", "10.96.3.2", "a1"), "x", delete=True)
    assert engine.host.extra_routes == set()


def test_allocated_addresses_are_kept_and_freed(engine):
    no_full_sync(engine)
    engine.apply("kind: Service\nmetadata: {name: auto}\nspec: {selector: {app: a1}, ports: [{port: 80, targetPort: http}]}\n", "x")
    ip = engine.smap.services["default/auto"].cluster_ip
    assert engine.smap.ips[ip] == "default/auto"
    engine.apply("kind: Service\nmetadata: {name: auto}\nspec: {selector: {app: a2}, ports: [{port: 80, targetPort: http}]}\n", "x")
    assert engine.smap.services["default/auto"].cluster_ip == ip       # a change keeps its address
    assert backends_seen(engine, ip) == {"10.244.2.2", "10.244.2.3", "10.244.2.4"}
    engine.apply("kind: Service\nmetadata: {name: auto}\nspec: {ports: [{port: 80}]}\n", "x", delete=True)
    assert ip not in engine.smap.ips


def test_a_conflict_is_refused_and_changes_nothing(engine):
    before = view(engine), engine.fp.current_tables.size
    with pytest.raises(ConfigError, match="already allocated"):
        engine.apply(service("dup", "10.96.1.1", "a1"), "x")        # s0's cluster IP
    assert (view(engine), engine.fp.current_tables.size) == before
    assert len(engine.tracker) == 0
    # and the next change goes through
    engine.apply(service("fine", "10.96.3.3", "a1"), "x")
    assert "default/fine" in engine.smap.services


def test_file_objects_are_diffed(engine, tmp_path):
    """A reload hands over only the objects that changed."""
    totals = dict(engine.tracker.totals)
    text = base().replace('p3-1, namespace: default, labels: {app: a3}}', 'p3-1, namespace: default, labels: {app: a3}}')
    text = text.replace('name: p3-1, namespace: default, labels: {app: a3}}\nspec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}\nstatus: {podIP: 10.244.3.3, conditions: [{type: Ready, status: "True"',
                        'name: p3-1, namespace: default, labels: {app: a3}}\nspec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}\nstatus: {podIP: 10.244.3.3, conditions: [{type: Ready, status: "False"')
    assert text != base()
    (tmp_path / "c.yaml").write_text(text)
    no_full_sync(engine)
    engine.reload()
    assert engine.tracker.totals["endpoint"] == totals["endpoint"] + 1
    assert engine.tracker.totals["service"] == totals["service"]
    assert backends_seen(engine, "10.96.1.4") == {"10.244.3.2", "10.244.3.4"}


def test_an_api_style_event_is_a_first_class_input(engine):
    """One object event (kind, key, new) from a source of its own."""
    no_full_sync(engine)
    svc = config.parse_text(service("watched", "10.96.4.1", "a2"), "api").services[0]
    engine.update("Service", ("default", "watched"), svc)
    assert engine.tracker.pending() == (1, 0)
    engine.sync()
    assert backends_seen(engine, "10.96.4.1") == {"10.244.2.2", "10.244.2.3", "10.244.2.4"}
    engine.update("Service", ("default", "watched"), None)
    engine.sync()
    assert "default/watched" not in engine.smap.services


def test_many_changes_take_a_full_sync(engine):
    engine.FULL_SYNC_MIN = 10
    text = base().replace("port: 80, targetPort", "port: 81, targetPort")
    engine.apply(text.split("---", 1)[1], "x")
    assert engine.last_sync_kind == "full"
    assert backends_seen(engine, "10.96.1.2", 81) == {"10.244.1.2", "10.244.1.3", "10.244.1.4"}


def test_tracker_keeps_first_previous_and_last_current():
    t = ChangeTracker()
    assert not t.update("Pod", ("default", "a"), None, None)           # no-op
    assert t.update("Pod", ("default", "a"), None, "v1")
    assert t.update("Pod", ("default", "a"), "v1", "v2")
    c = t.take()[("Pod", "default", "a")]
    assert (c.previous, c.current) == (None, ("v2",))
    t.update("Service", ("default", "s"), "v1", "v2")
    assert not t.update("Service", ("default", "s"), "v2", "v1")        # back where it was: dropped
    assert len(t) == 0 and t.pending() == (0, 0)
    with pytest.raises(ValueError):
        t.update("ConfigMap", ("default", "x"), None, "v")


def test_the_control_plane_imports_without_pytun_or_netlink():
    code = ("import sys; sys.modules['pytun'] = None; sys.modules['pyroute2'] = None\n"
            "from engine import proxier, refpath, host, config\n"
            "cfg = config.parse_text('kind: Service\\nmetadata: {name: s}\\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}\\n', 'x')\n"
            "e = proxier.Engine(cfg, host=host.FakeHost(), fastpath=refpath, serve_dns=False)\n"
            "e.start(); print(e.fp.current_tables.size); e.stop()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"


@pytest.mark.parametrize("mod", TARGETS, ids=lambda m: m.__name__.split(".")[-1])
def test_with_backends_is_what_a_fresh_table_gives(mod):
    """Patching rows gives the same choices as building the table anew."""
    from engine.model import ip_int as ip
    rows = [dict(name=f"s{i}", vip=ip(f"10.96.0.{i + 1}"), port=80, proto=6, scheduler=i % 5, id=i,
                 backends=[(ip(f"10.244.{i}.{j}"), 8080, 100 * i + j) for j in range(2, 5)]) for i in range(6)]
    new_b = [(ip("10.244.50.2"), 9090, 777), (ip("10.244.50.3"), 9090, 778)]
    fresh_rows = [dict(r, backends=new_b) if r["name"] in ("s1", "s4") else r for r in rows]
    kw = dict(vips=[r["vip"] for r in rows])
    a = mod.Dataplane(ip("169.254.100.1"), tables=mod.Tables(rows, **kw).with_backends({1: new_b, 4: new_b}))
    b = mod.Dataplane(ip("169.254.100.1"), tables=mod.Tables(fresh_rows, **kw))
    for k in range(60):
        pkt = raw(IP(src=f"192.168.1.{k + 1}", dst=f"10.96.0.{k % 6 + 1}") / TCP(sport=30000 + k, dport=80, flags="S"))
        assert a.process(pkt, 5) == b.process(pkt, 5)


@pytest.fixture
def file_engine(tmp_path):
    """An engine on a folder of manifests: one file per service and its pods."""
    m = tmp_path / "manifests"
    m.mkdir()
    for i in range(5):
        (m / f"s{i}.yaml").write_text(service(f"s{i}", f"10.96.1.{i + 1}", f"a{i}") + pod(f"p{i}", f"10.244.{i}.2", f"a{i}"))
    p = tmp_path / "engine.yaml"
    p.write_text("kind: EngineConfiguration\nmanifests: [./manifests]\n")
    cache = config.FileCache()
    eng = Engine(config.load(str(p), cache=cache), host=FakeHost(), fastpath=refpath, serve_dns=False, file_cache=cache)
    eng.start()
    yield eng, m
    eng.stop()


def test_a_changed_file_alone_is_read_and_synced_partially(file_engine):
    eng, m = file_engine
    no_full_sync(eng)
    f = m / "s2.yaml"
    f.write_text(service("s2", "10.96.1.3", "a2") + pod("p2", "10.244.2.2", "a2") + pod("p2b", "10.244.2.3", "a2"))
    eng.reload(paths=[str(f)])
    assert eng.file_cache.read == [str(f)]
    assert backends_seen(eng, "10.96.1.3") == {"10.244.2.2", "10.244.2.3"}
    new = m / "s9.yaml"                                     # a new file in the folder
    new.write_text(service("s9", "10.96.1.9", "a1"))
    eng.reload(paths=[str(new)])
    assert str(new) in eng.cfg.files
    assert backends_seen(eng, "10.96.1.9") == {"10.244.1.2"}
    f.unlink()                                              # a file removed takes its objects along
    eng.reload(paths=[str(f)])
    assert "default/s2" not in eng.smap.services and str(f) not in eng.cfg.files
    assert view(eng) == full_view(eng)


def test_a_bad_or_duplicate_file_is_refused(file_engine):
    eng, m = file_engine
    before = view(eng)
    dup = m / "dup.yaml"
    dup.write_text(service("s1", "10.96.1.50", "a1"))      # s1 is s1.yaml's
    with pytest.raises(ConfigError, match="duplicate Service default/s1"):
        eng.reload(paths=[str(dup)])
    dup.write_text(service("s7", "10.96.1.50", "a1") + service("s7", "10.96.1.51", "a1"))     # twice in one file
    with pytest.raises(ConfigError, match="duplicate Service default/s7"):
        eng.reload(paths=[str(dup)])
    bad = m / "s3.yaml"
    bad.write_text("kind: Service\nmetadata: {name: s3\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        eng.reload(paths=[str(bad)])
    assert view(eng) == before and len(eng.tracker) == 0
    bad.write_text(service("s3", "10.96.1.4", "a3", port=81) + pod("p3", "10.244.3.2", "a3"))
    dup.unlink()
    eng.reload(paths=[str(bad), str(dup)])
    assert backends_seen(eng, "10.96.1.4", 81) == {"10.244.3.2"}


def test_api_watch_events_feed_the_tracker(engine):
    """engine.kube's reflector callback (kind, "ns/name", old dict, new dict)
    goes straight in; a burst is taken by the sync thread together."""
    import yaml
    no_full_sync(engine)
    svc = yaml.safe_load(service("api-svc", "10.96.5.1", "a4"))
    sl = {"kind": "EndpointSlice", "metadata": {"name": "api-svc-x", "namespace": "default",
                                                "labels": {"kubernetes.io/service-name": "api-svc"}},
          "ports": [{"name": "http", "port": 9000, "protocol": "TCP"}],
          "endpoints": [{"addresses": ["10.244.77.2"]}]}
    svc["spec"].pop("selector")
    engine.synced_event.clear()
    assert engine.on_api_event("Service", "default/api-svc", None, svc)
    assert engine.on_api_event("EndpointSlice", "default/api-svc-x", None, sl)
    assert not engine.on_api_event("Node", "node-1", None, {"kind": "Node"})      # not the tracker's
    deadline = time.monotonic() + 10
    while "default/api-svc" not in (engine.smap.services if engine.smap else {}) or \
            not engine.smap.services["default/api-svc"].ports[0].endpoints:
        assert time.monotonic() < deadline
        engine.synced_event.wait(1)
        engine.synced_event.clear()
    assert backends_seen(engine, "10.96.5.1") == {"10.244.77.2"}
    bad = dict(svc, spec={"ports": [{"port": 0}]})
    assert not engine.on_api_event("Service", "default/api-bad", None, bad)
    assert engine.api_refused == 1
    assert engine.on_api_event("Service", "default/api-svc", svc, None)
    deadline = time.monotonic() + 10
    while "default/api-svc" in engine.smap.services:
        assert time.monotonic() < deadline
        time.sleep(0.01)
