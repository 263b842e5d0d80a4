"""Service map: allocation, endpoint resolution, compiled table rows."""
import pytest

from engine import compiler, config, servicemap
from engine.config import ConfigError


def load(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return config.load(str(p))


def pod(name, ip, labels="app: web", ready=True, ports="[{name: http, containerPort: 8080}]", extra=""):
    return f"""---
kind: Pod
metadata: {{name: {name}, labels: {{{labels}}}{extra}}}
spec: {{containers: [{{name: c, ports: {ports}}}]}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: "{'True' if ready else 'False'}"}}]}}
"""


def test_cluster_ip_allocated_in_cidr_and_stable(tmp_path):
    text = "kind: Service\nmetadata: {name: web}\nspec: {selector: {app: web}, ports: [{port: 80}]}\n"
    a = servicemap.build(load(tmp_path, text)).services["default/web"].cluster_ip
    b = servicemap.build(load(tmp_path, text)).services["default/web"].cluster_ip
    assert a == b
    import ipaddress
    assert ipaddress.IPv4Address(a) in ipaddress.IPv4Network("10.96.0.0/12")
    assert a != "10.96.0.10"      # reserved for DNS


def test_allocation_avoids_explicit_addresses(tmp_path):
    # allocate first, then claim that address explicitly for another service
    first = servicemap.build(load(tmp_path, "kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n"))
    ip = first.services["default/a"].cluster_ip
    smap = servicemap.build(load(tmp_path, f"""kind: Service
metadata: {{name: a}}
spec: {{ports: [{{port: 80}}]}}
---
kind: Service
metadata: {{name: b}}
spec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}
"""))
    assert smap.services["default/b"].cluster_ip == ip
    assert smap.services["default/a"].cluster_ip != ip


def test_previous_allocation_is_kept(tmp_path):
    cfg = load(tmp_path, "kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n")
    prev = {"default/a": {"cluster_ip": "10.96.7.7", "ingress_ip": None, "node_ports": {}}}
    assert servicemap.build(cfg, prev).services["default/a"].cluster_ip == "10.96.7.7"


def test_selector_named_target_port_readiness(tmp_path):
    cfg = load(tmp_path, """kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: raw, port: 81, targetPort: 9000}]
""" + pod("p1", "10.244.1.2") + pod("p2", "10.244.1.3", ports="[{name: http, containerPort: 9090}]")
        + pod("p3", "10.244.1.4", ready=False) + pod("p4", "10.244.1.5", ports="[]")
        + pod("other", "10.244.1.6", labels="app: other"))
    info = servicemap.build(cfg).services["default/web"]
    http, raw = info.ports
    # named port resolves per pod; p4 lacks the name; p3 is not ready
    assert [(e.ip, e.port) for e in http.usable] == [("10.244.1.2", 8080), ("10.244.1.3", 9090)]
    assert [(e.ip, e.port) for e in raw.usable] == [("10.244.1.2", 9000), ("10.244.1.3", 9000), ("10.244.1.5", 9000)]
    assert not any(e.ready for e in http.endpoints if e.ip == "10.244.1.4")


def test_terminating_endpoints_are_a_fallback(tmp_path):
    base = """kind: Service
metadata: {name: web}
spec: {ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.1.2]
  conditions: {ready: false, serving: true, terminating: true}
"""
    info = servicemap.build(load(tmp_path, base)).services["default/web"]
    assert [(e.ip, e.port) for e in info.ports[0].usable] == [("10.244.1.2", 8080)]
    more = base + "- addresses: [10.244.1.3]\n  conditions: {ready: true}\n"
    info = servicemap.build(load(tmp_path, more)).services["default/web"]
    assert [(e.ip, e.port) for e in info.ports[0].usable] == [("10.244.1.3", 8080)]


def test_legacy_endpoints_for_selectorless_service(tmp_path):
    cfg = load(tmp_path, """kind: Service
metadata: {name: ext}
spec: {ports: [{name: dns, protocol: UDP, port: 53}]}
---
kind: Endpoints
metadata: {name: ext}
subsets:
- addresses: [{ip: 10.244.2.2}]
  notReadyAddresses: [{ip: 10.244.2.3}]
  ports: [{name: dns, port: 5353, protocol: UDP}]
""")
    info = servicemap.build(cfg).services["default/ext"]
    assert [(e.ip, e.port) for e in info.ports[0].usable] == [("10.244.2.2", 5353)]


def test_node_port_allocation_and_conflicts(tmp_path):
    text = """kind: EngineConfiguration
nodePortRange: 30000-30002
---
kind: Service
metadata: {name: a}
spec: {type: NodePort, ports: [{port: 80, nodePort: 30001}]}
---
kind: Service
metadata: {name: b}
spec: {type: NodePort, ports: [{port: 80}]}
"""
    smap = servicemap.build(load(tmp_path, text))
    assert smap.services["default/a"].ports[0].node_port == 30001
    assert smap.services["default/b"].ports[0].node_port in (30000, 30002)
    with pytest.raises(ConfigError, match="30005 is not in nodePortRange 30000-30002"):
        servicemap.build(load(tmp_path, text.replace("nodePort: 30001", "nodePort: 30005")))
    dup = text.replace("ports: [{port: 80}]}", "ports: [{port: 80, nodePort: 30001}]}")
    with pytest.raises(ConfigError, match="30001/TCP is already allocated to service default/a"):
        servicemap.build(load(tmp_path, dup))


def test_compiled_rows(tmp_path):
    cfg = load(tmp_path, """kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.20, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}
""" + pod("p1", "10.244.1.2"))
    rows = compiler.rows(servicemap.build(cfg), cfg.engine)
    assert rows == [dict(name="default/web:http", port=80, proto=6, backends=[(0x0AF40102, 8080)],
                         scheduler=0, vip=0x0A600014)]
    t = compiler.compile_tables(servicemap.build(cfg), cfg.engine)
    assert t.size == 1
