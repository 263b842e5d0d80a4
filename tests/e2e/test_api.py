"""The engine following a real kube-apiserver (etcd + kube-apiserver from
scripts/build_peers.sh, reached from the lab's node namespace through a
forwarded port): Services and EndpointSlices created through the API
reach the fast path, the engine's ServiceAccount (deploy/rbac.yaml) is
all it needs, the API server can go away for a while without traffic
noticing, and 1,000 services arrive in measured time."""

import concurrent.futures
import os
import sys
import time

import pytest
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "kube"))

from apiserver import NetnsForwarder, PeersMissing, ControlPlane  # noqa: E402
from pki import kubeconfig  # noqa: E402

from engine.kube.client import path_for  # noqa: E402
from engine.kube.kubeconfig import load_kubeconfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
VIP = "10.96.100.100"


@pytest.fixture(scope="module")
def cluster(lab, tmp_path_factory):
    try:
        # watches straight from etcd (no watch cache): compacting etcd makes
        # an old resourceVersion 410 Gone, as a long partition would
        cp = ControlPlane(apiserver_args=["--watch-cache=false"]).__enter__()
    except PeersMissing as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    fwd = cp.forwarder = None
    try:
        for name in ("rbac.yaml",):
            with open(os.path.join(ROOT, "deploy", name)) as f:
                for doc in yaml.safe_load_all(f):
                    if doc:
                        cp.admin.apply(doc)
        lab.run(lab.node_ns, ["ip", "link", "set", "lo", "up"], check=True)
        fwd = NetnsForwarder(lab.node_ns, ("127.0.0.1", 6443), ("127.0.0.1", cp.port))
        # the engine's own ServiceAccount token, seen from the node at the forwarded port
        sa = load_kubeconfig(cp.service_account_kubeconfig("kube-system", "engine"))
        kc = kubeconfig(str(tmp_path_factory.mktemp("api") / "engine.kubeconfig"), "https://127.0.0.1:6443",
                        cp.ca_file, token=sa.token, user="engine")
        cp.admin.create(path_for("Node"), {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}})
        cp.admin.merge_patch(path_for("Node", name="node-a", subresource="status"), {"status": {
            "addresses": [{"type": "InternalIP", "address": "192.168.50.1"}]}})
        cp.forwarder = fwd
        yield cp, kc
    finally:
        if cp.forwarder:
            cp.forwarder.close()
        cp.stop()


def engine_config(kc):
    return f"""apiVersion: engine/v1alpha1
kind: EngineConfiguration
clientConnection: {{kubeconfig: {kc}}}
hostnameOverride: Node-A
configSyncPeriod: 1m
metricsBindAddress: 127.0.0.1:10249
"""


def service(ns, name, ip=None, port=80):
    spec = {"ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 80}]}
    if ip:
        spec["clusterIP"] = ip
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def slice_(ns, svc, ips):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc}-1", "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node-a"} for ip in ips]}


def answers(lab, url, n=12):
    """The distinct answers of n GETs ("error" for a failed one)."""
    return {lab.http_get(lab.client_ns, url, timeout=2).strip() or "error" for _ in range(n)}


def wait(cond, timeout=30, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


def metric(lab, name):
    r = lab.run(lab.node_ns, ["curl", "-s", "-m", "2", "http://127.0.0.1:10249/metrics"])
    for line in r.stdout.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_follows_the_api_server_and_survives_its_outage(lab, cluster):
    cp, kc = cluster
    a = cp.admin
    pods = [p.ip for p in lab.pods]
    with lab.start_engine(engine_config(kc)) as eng:
        t0 = time.monotonic()
        a.create(path_for("Service", "default"), service("default", "web", VIP))
        a.create(path_for("EndpointSlice", "default"), slice_("default", "web", pods))
        assert wait(lambda: not any(x.startswith("error") for x in answers(lab, f"http://{VIP}/", 3))), \
            eng.log()[-3000:]
        print(f"\nservice + slice created through the API -> served: {time.monotonic() - t0:.2f}s")
        assert len(answers(lab, f"http://{VIP}/")) == len(pods)
        assert "node addresses from the Node object: ['192.168.50.1']" in eng.log()
        assert "as node node-a" in eng.log()
        # one endpoint left
        a.merge_patch(path_for("EndpointSlice", "default", "web-1"),
                      {"endpoints": [{"addresses": [pods[0]], "conditions": {"ready": True}}]})
        assert wait(lambda: len(answers(lab, f"http://{VIP}/", 6)) == 1)
        assert metric(lab, "engine_api_connected") == 1

        # the API server goes away: traffic flows on the last state, the metric says so
        cp.stop_process("kube-apiserver")
        assert wait(lambda: metric(lab, "engine_api_connected") == 0, 30), eng.log()[-2000:]
        seen = answers(lab, f"http://{VIP}/", 10)
        assert len(seen) == 1 and not next(iter(seen)).startswith("error"), seen
        r = lab.run(lab.node_ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:10256/healthz"])
        assert r.stdout == "200"
        assert "API server unreachable, keeping the last state" in eng.log()
        time.sleep(5)
        # it returns; a change made after that is applied
        cp.start_apiserver()
        a.merge_patch(path_for("EndpointSlice", "default", "web-1"),
                      {"endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in pods]})
        assert wait(lambda: len(answers(lab, f"http://{VIP}/", 12)) == len(pods), 60), eng.log()[-3000:]
        assert wait(lambda: metric(lab, "engine_api_connected") == 1, 30)
        # a deletion: the service goes (REJECT: connection refused at once)
        a.delete(path_for("Service", "default", "web"))
        assert wait(lambda: all(x.startswith("error") for x in answers(lab, f"http://{VIP}/", 3)), 30)


def test_a_thousand_services_through_the_api(lab, cluster):
    cp, kc = cluster
    a = cp.admin
    ns = "bulk"
    cp.ensure_namespace(ns)
    pods = [p.ip for p in lab.pods]
    with lab.start_engine(engine_config(kc)) as eng:
        def make(i):
            a.create(path_for("Service", ns), service(ns, f"s{i}", f"10.96.{200 + i // 250}.{i % 250 + 1}"))
            a.create(path_for("EndpointSlice", ns), slice_(ns, f"s{i}", pods))
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(make, range(1000)))
        created = time.monotonic() - t0
        last = "10.96.203.250"
        assert wait(lambda: not any(x.startswith("error") for x in answers(lab, f"http://{last}/", 2)), 120), \
            eng.log()[-3000:]
        served = time.monotonic() - t0
        assert wait(lambda: (metric(lab, 'engine_api_objects{kind="Service"}') or 0) >= 1000, 30)
        first = "10.96.200.1"
        assert not any(x.startswith("error") for x in answers(lab, f"http://{first}/", 2))
        print(f"\n1000 services + slices through the API: created in {created:.1f}s, "
              f"the last one served {served:.1f}s after the first create")


def lb_ingress(cp, ns, name):
    s = cp.admin.get(path_for("Service", ns, name))
    return [i["ip"] for i in ((s.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []]


def test_load_balancer_ip_is_allocated_written_to_status_and_kept(lab, cluster):
    """The engine (the only one: it holds the Lease) allocates from
    loadBalancerCIDR and writes status.loadBalancer.ingress; it serves that
    IP; after a restart the same IP is kept (read back from status)."""
    cp, kc = cluster
    ns = "lb"
    cp.ensure_namespace(ns)
    pods = [p.ip for p in lab.pods]
    conf = engine_config(kc) + "loadBalancerCIDR: 172.18.255.0/24\n"
    for name in ("first", "second"):
        svc = service(ns, name)
        svc["spec"]["type"] = "LoadBalancer"
        cp.admin.create(path_for("Service", ns), svc)
        cp.admin.create(path_for("EndpointSlice", ns), slice_(ns, name, pods))
    # status written by someone else earlier (a previous leader): kept as it is
    cp.admin.merge_patch(path_for("Service", ns, "second", "status"),
                         {"status": {"loadBalancer": {"ingress": [{"ip": "172.18.255.7"}]}}})
    with lab.start_engine(conf) as eng:
        assert wait(lambda: lb_ingress(cp, ns, "first") == ["172.18.255.1"], 30), eng.log()[-3000:]
        assert lb_ingress(cp, ns, "second")[0] == "172.18.255.7"
        lease = cp.admin.get(path_for("Lease", "kube-system", "engine-lb-ipam"))
        assert lease["spec"]["holderIdentity"] == "node-a"
        for ip in ("172.18.255.1", "172.18.255.7"):
            assert wait(lambda: not any(x == "error" for x in answers(lab, f"http://{ip}/", 3)), 30), \
                (ip, eng.log()[-3000:])
    # restart: the allocation stays, nothing is rewritten
    rv = cp.admin.get(path_for("Service", ns, "first"))["metadata"]["resourceVersion"]
    with lab.start_engine(conf) as eng:
        assert wait(lambda: not any(x == "error" for x in answers(lab, "http://172.18.255.1/", 3)), 30)
        time.sleep(2)
        assert lb_ingress(cp, ns, "first") == ["172.18.255.1"]
        assert cp.admin.get(path_for("Service", ns, "first"))["metadata"]["resourceVersion"] == rv


def test_partition_with_410_applies_the_deletions_made_in_the_gap(lab, cluster):
    """The node loses the API server; meanwhile a service is deleted, another
    changed, and etcd compacted; when the node is reachable again its watch
    gets 410 Gone, relists, and the deletion takes effect."""
    import base64
    import json
    import urllib.request
    cp, kc = cluster
    a = cp.admin
    ns = "gap"
    cp.ensure_namespace(ns)
    pods = [p.ip for p in lab.pods]
    for i, name in enumerate(("keep", "drop")):
        a.create(path_for("Service", ns), service(ns, name, f"10.96.150.{i + 1}"))
        a.create(path_for("EndpointSlice", ns), slice_(ns, name, pods))
    with lab.start_engine(engine_config(kc)) as eng:
        for ip in ("10.96.150.1", "10.96.150.2"):
            assert wait(lambda: not any(x == "error" for x in answers(lab, f"http://{ip}/", 2)), 30)
        cp.forwarder.close()                                  # partition
        assert wait(lambda: metric(lab, "engine_api_connected") == 0, 30)
        a.delete(path_for("Service", ns, "drop"))
        a.merge_patch(path_for("EndpointSlice", ns, "keep-1"),
                      {"endpoints": [{"addresses": [pods[0]], "conditions": {"ready": True}}]})

        def etcd(path, body):
            req = urllib.request.Request(f"http://127.0.0.1:{cp.etcd_port}{path}", data=json.dumps(body).encode())
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())
        rev = etcd("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"]
        etcd("/v3/kv/compaction", {"revision": rev, "physical": True})
        assert not any(x == "error" for x in answers(lab, "http://10.96.150.2/", 2))   # still the last state
        cp.forwarder = NetnsForwarder(lab.node_ns, ("127.0.0.1", 6443), ("127.0.0.1", cp.port))
        assert wait(lambda: all(x == "error" for x in answers(lab, "http://10.96.150.2/", 2)), 60), eng.log()[-3000:]
        assert wait(lambda: len(answers(lab, "http://10.96.150.1/", 6)) == 1, 30)
        assert "watch expired (410 Gone)" in eng.log()
        assert (metric(lab, 'engine_api_relists_gone_total{kind="Service"}') or 0) >= 1
