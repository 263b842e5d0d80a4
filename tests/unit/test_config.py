"""Configuration loading: the seed manifests, defaults, and errors that name
file, object and field."""
import os
import subprocess
import sys

import pytest

from engine import config, servicemap
from engine.config import ConfigError

SEED = "/work/shared/seed/manifests"
if not os.path.isdir(SEED):
    SEED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "seed", "manifests")


def write(tmp_path, text, name="config.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("name", ["service-exam.yaml", "deploy-nginx.yaml", "nodeport-exam.yaml",
                                  "loadbalancer-exam.yaml", "externalname-exam.yaml"])
def test_seed_manifests_load_as_they_are(name):
    cfg = config.load(os.path.join(SEED, name))
    smap = servicemap.build(cfg)
    if name == "deploy-nginx.yaml":
        assert cfg.services == [] and "Deployment deploy-nginx: ignored" in cfg.notes[0]
    else:
        assert len(smap.services) == 1


def test_defaults_without_engine_document(tmp_path):
    cfg = config.load(write(tmp_path, open(os.path.join(SEED, "service-exam.yaml")).read()))
    e = cfg.engine
    assert (e.tun_name, e.service_cidr, e.masquerade_ip, e.node_port_range) == \
        ("kube-tun0", "10.96.0.0/12", "169.254.100.1", (30000, 32767))
    assert e.conntrack.tcp_established_timeout == 86400
    assert e.conntrack.tcp_close_wait_timeout == 3600
    assert e.healthz_bind_address == "127.0.0.1:10256"


def test_engine_document_and_durations(tmp_path):
    cfg = config.load(write(tmp_path, """
apiVersion: engine/v1alpha1
kind: EngineConfiguration
tunName: tun7
serviceCIDR: 10.100.0.0/16
nodePortRange: 31000-31010
conntrack: {max: 1024, tcpEstablishedTimeout: 1h30m, udpTimeout: 45s}
dns: {clusterIP: 10.100.0.10, upstream: [192.168.50.53, "192.168.50.54:5353"]}
"""))
    e = cfg.engine
    assert e.tun_name == "tun7" and e.node_port_range == (31000, 31010)
    assert e.conntrack.max == 1024 and e.conntrack.tcp_established_timeout == 5400
    assert e.conntrack.udp_timeout == 45
    assert e.dns.upstream == [("192.168.50.53", 53), ("192.168.50.54", 5353)]


@pytest.mark.parametrize("value,secs", [(None, 10), (0, 0), ("0s", 0), ("0", 0), (3, 3), ("1m", 60)])
def test_snapshot_interval(tmp_path, value, secs):
    ct = "" if value is None else f"conntrack: {{snapshotInterval: {value!r}}}\n".replace("'", '"')
    cfg = config.load(write(tmp_path, "kind: EngineConfiguration\n" + ct))
    assert cfg.engine.conntrack.snapshot_interval == secs


@pytest.mark.parametrize("value", ["-1", "soon", "true", "[1]"])
def test_snapshot_interval_refused(tmp_path, value):
    with pytest.raises(ConfigError, match="conntrack.snapshotInterval"):
        config.load(write(tmp_path, f"kind: EngineConfiguration\nconntrack: {{snapshotInterval: {value}}}\n"))


def test_api_server_settings(tmp_path):
    e = config.load(write(tmp_path, "kind: EngineConfiguration\n")).engine
    assert (e.kubeconfig, e.hostname_override, e.config_sync_period) == (None, None, 900)
    e = config.load(write(tmp_path, """kind: EngineConfiguration
clientConnection: {kubeconfig: /etc/kubernetes/engine.kubeconfig, qps: 5, burst: 10}
hostnameOverride: Node-1
configSyncPeriod: 1h30m
""")).engine
    assert (e.kubeconfig, e.hostname_override, e.config_sync_period) == \
        ("/etc/kubernetes/engine.kubeconfig", "node-1", 5400)


@pytest.mark.parametrize("text, field", [
    ("clientConnection: {kubeconfg: /x}", "clientConnection"),
    ("clientConnection: /x", "clientConnection"),
    ("hostnameOverride: 'no spaces allowed'", "hostnameOverride"),
    ("configSyncPeriod: soon", "configSyncPeriod"),
])
def test_api_server_settings_refused(tmp_path, text, field):
    with pytest.raises(ConfigError, match=field):
        config.load(write(tmp_path, f"kind: EngineConfiguration\n{text}\n"))


def test_manifests_paths_are_read(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "svc.yaml").write_text(open(os.path.join(SEED, "service-exam.yaml")).read())
    (d / "pods.yaml").write_text("""apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a, labels: {app: deploy-nginx}}
  status: {podIP: 10.244.1.2, conditions: [{type: Ready, status: "True"}]}
""")
    cfg = config.load(write(tmp_path, "kind: EngineConfiguration\nmanifests: [m]\n"))
    smap = servicemap.build(cfg)
    eps = smap.services["default/deploy-svc"].ports[0].usable
    assert [(e.ip, e.port) for e in eps] == [("10.244.1.2", 80)]


BAD = [
    ("bad yaml", "kind: Service\nmetadata: {name: x\n", "invalid YAML at line"),
    ("not a mapping", "- a\n- b\n", "a document must be a mapping"),
    ("no name", "kind: Service\nspec: {ports: [{port: 80}]}\n", "metadata.name: is required"),
    ("unknown type", "kind: Service\nmetadata: {name: web}\nspec: {type: Magic, ports: [{port: 80}]}\n",
     "Service default/web: spec.type: unsupported value 'Magic'"),
    ("port out of range", "kind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 70000}]}\n",
     "Service default/web: spec.ports[0].port: 70000 is out of range 1-65535"),
    ("port not int", "kind: Service\nmetadata: {name: web}\nspec: {ports: [{port: eighty}]}\n",
     "spec.ports[0].port: expected an integer"),
    ("bad cluster ip", "kind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n",
     "spec.clusterIP: not an IPv4 address: '10.96.0.300'"),
    ("cluster ip outside cidr", "kind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n",
     "spec.clusterIP: 10.0.0.1 is not in serviceCIDR 10.96.0.0/12"),
    ("duplicate cluster ip", "kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}\n---\n"
     "kind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}\n",
     "Service default/b: spec.clusterIP: 10.96.0.5 is already allocated to service default/a"),
    ("unnamed multi ports", "kind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}, {port: 81}]}\n",
     "spec.ports[0].name: is required when a service has more than one port"),
    ("bad protocol", "kind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, protocol: ICMP}]}\n",
     "spec.ports[0].protocol: unsupported value 'ICMP'"),
    ("bad target port name", "kind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, targetPort: Not_A_Name}]}\n",
     "spec.ports[0].targetPort: not a port number or name"),
    ("bad engine field", "kind: EngineConfiguration\ntunnName: x\n", "tunnName: unknown field"),
    ("bad scheduler", "kind: EngineConfiguration\nscheduler: fastest\n", "scheduler: unknown scheduler 'fastest'"),
    ("bad cidr", "kind: EngineConfiguration\nserviceCIDR: 10.96.0.0/40\n", "serviceCIDR: not an IPv4 CIDR"),
    ("bad duration", "kind: EngineConfiguration\nconntrack: {udpTimeout: soon}\n", "conntrack.udpTimeout: expected a duration"),
    ("bad pod ip", "kind: Pod\nmetadata: {name: p}\nstatus: {podIP: banana}\n", "Pod default/p: status.podIP: not an IPv4 address"),
    ("duplicate service", "kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n---\n"
     "kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 81}]}\n", "duplicate Service default/a"),
    ("missing manifests", "kind: EngineConfiguration\nmanifests: [nowhere]\n", "manifests: no such file or folder"),
    ("not utf8", b"\xff\xfe\x00kind".decode("latin-1"), None),
]


@pytest.mark.parametrize("label,text,expect", BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_file_object_field(tmp_path, label, text, expect):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        servicemap.build(config.load(path))
    msg = str(ei.value)
    assert msg.startswith(path)
    if expect:
        assert expect in msg


def test_check_command_exits_nonzero_with_message(tmp_path):
    path = write(tmp_path, "kind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 70000}]}\n")
    r = subprocess.run([sys.executable, "-m", "engine", "check", path], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith(f"error: {path}: Service default/web: spec.ports[0].port:")


def test_check_prints_resolved_table(tmp_path):
    path = write(tmp_path, open(os.path.join(SEED, "service-exam.yaml")).read() + """---
apiVersion: v1
kind: Pod
metadata: {name: p1, labels: {app: deploy-nginx}}
status: {podIP: 10.244.1.2, conditions: [{type: Ready, status: "True"}]}
""")
    r = subprocess.run([sys.executable, "-m", "engine", "check", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"]
    assert lines[1].split() == ["default", "deploy-svc", "ClusterIP", "10.96.100.100", "<none>", "80/TCP"]
    assert ["default", "deploy-svc", "10.244.1.2:80"] in [l.split() for l in lines]


def test_embedded_seed_copies_are_verbatim():
    """engine demo ships the seed manifests; they must stay the seed's own."""
    here = os.path.join(os.path.dirname(__file__), "..", "..", "engine", "seed")
    for name in os.listdir(here):
        with open(os.path.join(here, name), "rb") as a, open(os.path.join(SEED, name), "rb") as b:
            assert a.read() == b.read(), name
