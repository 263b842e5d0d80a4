"""Endpoint-only changes take the incremental path (update_endpoints +
Tables.with_backends); it must give what a full rebuild gives."""
import ipaddress
import random

import pytest
from scapy.all import IP, TCP, raw

from engine import config, servicemap, views
from engine.dataplane import Engine


def pod(name, ip, app, ready=True, ns="default"):
    return f"""---
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}
spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: "{'True' if ready else 'False'}"}}]}}
"""


def base(n_svc=20, pods_per=3):
    docs = ["kind: EngineConfiguration\nscheduler: rr\n"]
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


@pytest.fixture
def engine(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(base())
    eng = Engine(config.load(str(p)))
    eng.sync(eng.base)
    return eng


def full_view(eng):
    smap = servicemap.build(config.merge(eng.base, eng.overrides))
    return views.services(smap), views.endpoints(smap)


def backends_seen(eng, vip, n=60):
    out = set()
    for k in range(n):
        pkt = IP(src=f"192.168.{k % 200}.{k // 200 + 1}", dst=vip) / TCP(sport=20000 + k, dport=80, flags="S")
        v, _, o = eng.fp.process(raw(pkt), 10)
        if v == "forward":
            out.add(IP(o).dst)
        elif v == "reply":
            out.add("refused")
    return out


def test_pod_changes_match_a_full_rebuild(engine):
    rng = random.Random(7)
    syncs = engine.syncs
    engine.sync = lambda *a: pytest.fail("endpoint-only change took the full path")
    for step in range(40):
        i, j = rng.randrange(20), rng.randrange(5)
        action = rng.choice(["ready", "unready", "delete", "move"])
        if action == "delete":
            engine.apply(pod(f"p{i}-{j}", f"10.244.{i}.{j + 2}", f"a{i}"), "x", delete=True)
        elif action == "move":          # relabelled: leaves one service, joins another
            engine.apply(pod(f"p{i}-{j}", f"10.244.{i}.{j + 2}", f"a{(i + 1) % 20}"), "x")
        else:
            engine.apply(pod(f"p{i}-{j}", f"10.244.{i}.{j + 2}", f"a{i}", ready=action == "ready"), "x")
        assert (views.services(engine.smap), views.endpoints(engine.smap)) == full_view(engine)
    assert engine.syncs == syncs + 40
    # the fast path uses exactly the usable endpoints
    for i in range(20):
        info = engine.smap.services[f"default/s{i}"]
        want = {e.ip for e in info.ports[0].usable} or {"refused"}
        assert backends_seen(engine, f"10.96.1.{i + 1}") == want, i


def test_endpointslice_change(engine):
    engine.apply("""kind: EndpointSlice
metadata: {name: ext-1, labels: {kubernetes.io/service-name: ext}}
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.244.99.3, 10.244.99.4]}]
""", "x")
    eps = engine.smap.services["default/ext"].ports[0].usable
    assert sorted(e.ip for e in eps) == ["10.244.99.3", "10.244.99.4"]
    assert (views.services(engine.smap), views.endpoints(engine.smap)) == full_view(engine)


def test_service_change_takes_the_full_path(engine):
    before = engine.fp.current_tables.size
    engine.apply("kind: Service\nmetadata: {name: new}\nspec: {clusterIP: 10.96.3.1, ports: [{port: 80}]}\n", "x")
    assert engine.fp.current_tables.size == before + 1


@pytest.mark.parametrize("modname", ["_fastpath", "refpath"])
def test_with_backends_is_what_a_fresh_table_gives(modname):
    """Patching rows gives the same choices as building the table anew."""
    import importlib
    mod = importlib.import_module(f"engine.{modname}")
    ip = lambda s: int(ipaddress.IPv4Address(s))
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
