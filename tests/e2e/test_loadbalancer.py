"""LoadBalancer end to end: the seed's loadbalancer-exam.yaml as it is, an
ingress IP from loadBalancerCIDR, source ranges enforced."""
import re

import pytest

from test_clusterip import ENGINE, seed

LB_ENGINE = ENGINE + "loadBalancerCIDR: 172.18.255.0/24\n"

EXTRA = """---
apiVersion: v1
kind: Service
metadata: {name: restricted}
spec:
  type: LoadBalancer
  loadBalancerIP: 172.18.255.50
  loadBalancerSourceRanges: [192.168.50.3/32]
  selector: {app: deploy-nginx}
  ports: [{name: http, port: 80}]
"""


@pytest.fixture(scope="module")
def engine(lab):
    text = "---\n".join([LB_ENGINE, seed("loadbalancer-exam.yaml"), EXTRA]) + lab.pod_manifests()
    with lab.start_engine(text) as eng:
        yield eng


def check(lab, eng):
    import sys
    return lab.run(lab.node_ns, [sys.executable, "-m", "engine", "check", eng.path]).stdout


def test_check_shows_ingress_and_node_port(lab, engine):
    out = check(lab, engine)
    line = next(l for l in out.splitlines() if " deploy-svc " in l).split()
    assert line[2] == "LoadBalancer" and line[4] == "172.18.255.1"
    assert re.fullmatch(r"80:3\d{4}/TCP", line[5])


def test_ingress_ip_from_outside(lab, engine):
    r = lab.run(lab.client_ns, ["curl", "-s", "-m", "5", "http://172.18.255.1/?[1-30]"], timeout=60)
    assert r.returncode == 0
    names = r.stdout.split()
    assert len(names) == 30 and set(names) == {p.name for p in lab.pods}


def test_node_port_and_cluster_ip_of_a_load_balancer(lab, engine):
    line = next(l for l in check(lab, engine).splitlines() if " deploy-svc " in l).split()
    cluster_ip, node_port = line[3], line[5].split(":")[1].split("/")[0]
    assert lab.http_get(lab.client_ns, f"http://192.168.50.1:{node_port}/").strip()
    assert lab.http_get(lab.client_ns, f"http://{cluster_ip}/").strip()


def test_source_ranges_enforced(lab, engine):
    r = lab.run(lab.client_ns, ["curl", "-s", "-m", "1", "http://172.18.255.50/"])
    assert r.returncode == 28            # no answer at all
    m = lab.run(lab.node_ns, ["curl", "-s", "http://127.0.0.1:10249/metrics"]).stdout
    assert int(re.search(r'engine_drops_total\{reason="source_denied"\} (\d+)', m).group(1)) >= 1
    host = lab.add_host("allowed", "192.168.50.3")
    try:
        assert lab.http_get(host.ns, "http://172.18.255.50/").strip() in {p.name for p in lab.pods}
    finally:
        lab.remove_host("allowed")


def test_unallocated_pool_address_is_dropped(lab, engine):
    assert lab.run(lab.client_ns, ["curl", "-s", "-m", "1", "http://172.18.255.99/"]).returncode == 28


def test_without_a_pool_the_ingress_is_pending(tmp_path):
    import subprocess, sys
    p = tmp_path / "c.yaml"
    p.write_text(seed("loadbalancer-exam.yaml"))
    r = subprocess.run([sys.executable, "-m", "engine", "check", str(p)], capture_output=True, text=True)
    line = next(l for l in r.stdout.splitlines() if " deploy-svc " in l).split()
    assert line[4] == "<pending>"
    assert "stays <pending>" in r.stderr
