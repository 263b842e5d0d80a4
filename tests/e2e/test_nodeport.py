"""NodePort (and externalIPs) end to end: the seed's nodeport-exam.yaml as it is."""
import collections

import pytest

from test_clusterip import ENGINE, seed

NODE = "192.168.50.1"

EXTRA = """---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec:
  type: ClusterIP
  selector: {app: deploy-nginx}
  externalIPs: [192.168.60.10]
  ports: [{name: http, port: 8080, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: empty-np}
spec:
  type: NodePort
  selector: {app: nobody}
  ports: [{name: http, port: 80, nodePort: 30999}]
"""


@pytest.fixture(scope="module")
def engine(lab):
    text = "---\n".join([ENGINE, seed("nodeport-exam.yaml"), EXTRA]) + lab.pod_manifests()
    with lab.start_engine(text) as eng:
        yield eng


def test_node_port_from_another_host(lab, engine):
    r = lab.run(lab.client_ns, ["curl", "-s", "-m", "5", f"http://{NODE}:30200/?[1-60]"], timeout=60)
    assert r.returncode == 0, r.stderr
    counts = collections.Counter(r.stdout.split())
    assert sum(counts.values()) == 60 and set(counts) == {p.name for p in lab.pods}, counts


def test_node_port_from_the_node_itself(lab, engine):
    r = lab.run(lab.node_ns, ["curl", "-s", "-m", "5", f"http://{NODE}:30200/?[1-10]"])
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 10


def test_cluster_ip_of_a_node_port_service(lab, engine):
    assert lab.http_get(lab.client_ns, "http://10.96.100.100/").strip() in {p.name for p in lab.pods}


def test_node_port_without_endpoints_refuses(lab, engine):
    r = lab.run(lab.client_ns, ["curl", "-s", "-m", "5", f"http://{NODE}:30999/"])
    assert r.returncode == 7


def test_unused_node_port_refuses(lab, engine):
    r = lab.run(lab.client_ns, ["curl", "-s", "-m", "5", f"http://{NODE}:31555/"])
    assert r.returncode == 7


def test_node_traffic_outside_the_range_is_untouched(lab, engine):
    # the node's own services keep answering: a listener on the node at 8000
    srv = lab.popen(lab.node_ns, ["python3", "-m", "http.server", "8000", "--bind", NODE])
    try:
        for _ in range(50):
            r = lab.run(lab.client_ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "2",
                                        f"http://{NODE}:8000/"])
            if r.stdout == "200":
                break
        assert r.stdout == "200"
    finally:
        srv.terminate()
    # and the node still reaches pods directly
    assert lab.http_get(lab.node_ns, "http://10.244.1.2/").strip() == "deploy-nginx-1"


def test_external_ip(lab, engine):
    names = set()
    for _ in range(10):
        names.add(lab.http_get(lab.client_ns, "http://192.168.60.10:8080/").strip())
    assert names <= {p.name for p in lab.pods} and names
