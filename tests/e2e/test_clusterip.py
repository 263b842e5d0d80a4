"""ClusterIP end to end: real curl and UDP clients through `engine run`."""
import collections
import os
import re
import time

import pytest

SEED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "seed", "manifests")
VIP = "10.96.100.100"

ENGINE = """apiVersion: engine/v1alpha1
kind: EngineConfiguration
serviceCIDR: 10.96.0.0/12
masqueradeIP: 169.254.100.1
"""

EXTRA = """---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  clusterIP: 10.96.100.53
  selector: {app: deploy-nginx}
  ports: [{name: echo, protocol: UDP, port: 53, targetPort: echo}]
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  clusterIP: 10.96.100.200
  selector: {app: nothing-matches}
  ports: [{name: http, protocol: TCP, port: 80}, {name: dns, protocol: UDP, port: 53}]
"""


def seed(name):
    path = os.path.join(SEED, name)
    if not os.path.exists(path):
        path = os.path.join("/work/shared/seed/manifests", name)
    with open(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def engine(lab):
    docs = [ENGINE, seed("service-exam.yaml"), seed("deploy-nginx.yaml")]
    text = "---\n".join(docs) + EXTRA + lab.pod_manifests()
    with lab.start_engine(text) as eng:
        yield eng


def metrics(lab):
    r = lab.run(lab.node_ns, ["curl", "-s", "http://127.0.0.1:10249/metrics"])
    return r.stdout


def test_requests_spread_over_all_pods(lab, engine):
    # one curl, 300 URLs: the pods close each connection, so 300 new flows
    r = lab.run(lab.client_ns, ["curl", "-s", "-m", "5", f"http://{VIP}/?[1-300]"], timeout=120)
    assert r.returncode == 0, r.stderr
    names = r.stdout.split()
    assert len(names) == 300
    counts = collections.Counter(names)
    assert set(counts) == {p.name for p in lab.pods}, counts
    for name, n in counts.items():
        assert 0.20 <= n / 300 <= 0.46, counts


def test_backends_see_the_masquerade_address(lab, engine):
    r = lab.run(lab.client_ns, ["curl", "-s", "-D", "-", "-o", "/dev/null", f"http://{VIP}/"])
    assert re.search(r"X-Client-Addr: 169\.254\.100\.1\b", r.stdout), r.stdout


def test_udp_round_trips(lab, engine):
    seen = set()
    for i in range(12):
        reply = lab.udp_query(lab.client_ns, "10.96.100.53", 53, payload=f"hello{i}")
        assert reply is not None and reply.endswith(f" hello{i}"), reply
        seen.add(reply.split()[0])
    assert len(seen) >= 2, seen


def test_no_endpoints_refuses_at_once(lab, engine):
    t0 = time.monotonic()
    r = lab.run(lab.client_ns, ["curl", "-s", "-m", "5", "http://10.96.100.200/"])
    took = time.monotonic() - t0
    assert r.returncode == 7, (r.returncode, r.stderr)       # couldn't connect: refused
    assert took < 1.0
    # UDP: the ICMP port unreachable makes the socket report ECONNREFUSED
    r = lab.python(lab.client_ns, """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
s.connect(("10.96.100.200", 53)); s.send(b"x")
try:
    s.recv(100); print("answered")
except ConnectionRefusedError:
    print("refused")
except socket.timeout:
    print("timeout")
""")
    assert r.stdout.strip() == "refused"


def test_live_vip_on_unserved_port_refuses(lab, engine):
    r = lab.run(lab.client_ns, ["curl", "-s", "-m", "5", f"http://{VIP}:81/"])
    assert r.returncode == 7


def test_unallocated_service_address_is_dropped(lab, engine):
    before = metrics(lab)
    r = lab.run(lab.client_ns, ["curl", "-s", "-m", "1", "http://10.96.55.55/"])
    assert r.returncode == 28          # timed out: dropped, not refused
    after = metrics(lab)
    pat = r'engine_drops_total\{reason="unallocated"\} (\d+)'
    assert int(re.search(pat, after).group(1)) > int(re.search(pat, before).group(1))


def test_hairpin_pod_reaches_itself(lab, engine):
    pod = lab.pods[0]
    r = lab.run(pod.ns, ["curl", "-s", "-m", "30", f"http://{VIP}/?[1-40]"], timeout=60)
    assert r.returncode == 0
    names = r.stdout.split()
    assert len(names) == 40 and pod.name in names


def test_node_itself_reaches_the_service(lab, engine):
    r = lab.run(lab.node_ns, ["curl", "-s", "-m", "5", f"http://{VIP}/"])
    assert r.stdout.strip() in {p.name for p in lab.pods}
