"""Cluster DNS and ExternalName end to end: dig and curl from a client whose
resolv.conf has the cluster search path, an upstream DNS server of the test's
own in its own namespace, and an HTTP server standing in for google.com."""
import sys
import time

import pytest

from test_clusterip import ENGINE, seed

UPSTREAM, WEB, STUB = "192.168.50.53", "192.168.50.80", "192.168.50.54"

DNS_ENGINE = ENGINE + (f"dns: {{clusterIP: 10.96.0.10, upstream: [{UPSTREAM}], ttl: 7, "
                       f"stubDomains: {{corp.example: ['{STUB}:5353']}}}}\n")

EXTRA = """---
apiVersion: v1
kind: Service
metadata: {name: named}
spec:
  clusterIP: 10.96.100.101
  selector: {app: deploy-nginx}
  ports: [{name: http, port: 80}, {name: echo, protocol: UDP, port: 53, targetPort: echo}]
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec:
  clusterIP: None
  selector: {app: deploy-nginx}
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: alias, namespace: other}
spec: {type: ExternalName, externalName: deploy-svc.default.svc.cluster.local}
"""


@pytest.fixture(scope="module")
def world(lab):
    up = lab.add_host("updns", UPSTREAM)
    web = lab.add_host("google", WEB)
    lab.popen(web.ns, [sys.executable, "-m", "engine.lab.podserver", "--name", "google-com", "--http-port", "80"])
    p = lab.popen(up.ns, [sys.executable, "-m", "engine.lab.dns", "--bind", "0.0.0.0", "--port", "53",
                          "--record", f"google.com=A:{WEB}", "--record", "www.example.org=A:192.168.50.81"],
                  stdout=__import__("subprocess").PIPE)
    assert p.stdout.readline().startswith(b"ready")
    stub = lab.add_host("stubdns", STUB)
    p = lab.popen(stub.ns, [sys.executable, "-m", "engine.lab.dns", "--bind", "0.0.0.0", "--port", "5353",
                            "--record", "db.corp.example=A:10.0.0.9"], stdout=__import__("subprocess").PIPE)
    assert p.stdout.readline().startswith(b"ready")
    lab.set_resolv_conf(lab.client_ns, "search default.svc.cluster.local svc.cluster.local cluster.local\n"
                                       "nameserver 10.96.0.10\noptions ndots:5\n")
    text = "---\n".join([DNS_ENGINE, seed("service-exam.yaml"), seed("externalname-exam.yaml"), EXTRA]) \
        + lab.pod_manifests()
    with lab.start_engine(text) as eng:
        yield eng
    lab.remove_host("updns")
    lab.remove_host("stubdns")
    lab.remove_host("google")


def dig(lab, *args):
    """dig's full output, whitespace normalised to single spaces."""
    r = lab.run(lab.client_ns, ["dig", "@10.96.0.10", "+time=2", "+tries=1", *args])
    return " ".join(r.stdout.split())


def short(lab, *args):
    return lab.run(lab.client_ns, ["dig", "@10.96.0.10", "+time=2", "+tries=1", "+short", *args]).stdout.split()


def test_cluster_ip_a_record(lab, world):
    assert short(lab, "deploy-svc.default.svc.cluster.local") == ["10.96.100.100"]
    assert short(lab, "+tcp", "deploy-svc.default.svc.cluster.local") == ["10.96.100.100"]
    out = dig(lab, "deploy-svc.default.svc.cluster.local")
    assert "7 IN A 10.96.100.100" in out and "flags: qr aa" in out


def test_headless_has_one_a_per_ready_endpoint(lab, world):
    assert sorted(short(lab, "headless.default.svc.cluster.local")) == sorted(p.ip for p in lab.pods)


def test_srv_for_named_ports(lab, world):
    assert short(lab, "SRV", "_http._tcp.named.default.svc.cluster.local") == \
        ["0", "100", "80", "named.default.svc.cluster.local."]
    out = dig(lab, "SRV", "_http._tcp.headless.default.svc.cluster.local")
    assert out.count(" IN SRV 0 ") == 3     # (the question says "IN SRV" too)
    assert all(f"IN A {p.ip}" in out for p in lab.pods)      # additional section


def test_ptr_for_cluster_ip(lab, world):
    assert short(lab, "-x", "10.96.100.100") == ["deploy-svc.default.svc.cluster.local."]


def test_nxdomain_and_nodata(lab, world):
    assert "status: NXDOMAIN" in dig(lab, "nope.default.svc.cluster.local")
    out = dig(lab, "AAAA", "deploy-svc.default.svc.cluster.local")
    assert "status: NOERROR" in out and "ANSWER: 0" in out and "IN SOA" in out


def test_external_name_cname_then_target(lab, world):
    out = dig(lab, "external-svc.default.svc.cluster.local")
    assert "external-svc.default.svc.cluster.local. 7 IN CNAME google.com." in out
    assert f"IN A {WEB}" in out


def test_external_name_in_cluster_target(lab, world):
    assert short(lab, "alias.other.svc.cluster.local") == ["deploy-svc.default.svc.cluster.local.", "10.96.100.100"]


def test_search_path_short_names_and_curl(lab, world):
    r = lab.run(lab.client_ns, ["curl", "-s", "-m", "5", "http://external-svc/"])
    assert r.stdout.strip() == "google-com"
    r = lab.run(lab.client_ns, ["curl", "-s", "-m", "5", "http://external-svc.default/"])
    assert r.stdout.strip() == "google-com"
    r = lab.run(lab.client_ns, ["curl", "-s", "-m", "5", "http://deploy-svc/"])
    assert r.stdout.strip() in {p.name for p in lab.pods}


def test_other_names_forwarded_upstream(lab, world):
    assert short(lab, "www.example.org") == ["192.168.50.81"]
    assert "status: NXDOMAIN" in dig(lab, "unknown.example.org")


def test_stub_domain_goes_to_its_own_servers(lab, world):
    assert short(lab, "db.corp.example") == ["10.0.0.9"]              # only the stub server knows it
    assert "status: NXDOMAIN" in dig(lab, "www.corp.example")          # (and the stub server says so)
    assert short(lab, "www.example.org") == ["192.168.50.81"]          # the rest: the upstream


def test_servfail_when_upstream_is_gone(lab, world):
    host = lab.hosts["updns"]
    assert short(lab, "google.com") == [WEB]
    lab.run(host.ns, ["ip", "link", "set", "eth0", "down"])
    try:
        assert "status: SERVFAIL" in dig(lab, "+time=5", "never-asked.example.org")
        assert short(lab, "google.com") == [WEB]            # answered before: from the cache
        # cluster names still answer
        assert short(lab, "deploy-svc.default.svc.cluster.local") == ["10.96.100.100"]
    finally:
        lab.run(host.ns, ["ip", "link", "set", "eth0", "up"])
        lab.run(host.ns, ["ip", "route", "replace", "default", "via", "192.168.50.1"])


def test_endpoint_names_and_ptrs(lab, world):
    """Every service's ready endpoints have a name and a PTR (CoreDNS), and
    the service CIDR's reverse zone is answered here with authority."""
    p = lab.pods[0]
    dashed = p.ip.replace(".", "-")
    assert short(lab, f"{dashed}.deploy-svc.default.svc.cluster.local") == [p.ip]
    assert f"{dashed}.deploy-svc.default.svc.cluster.local." in short(lab, "-x", p.ip)
    out = dig(lab, "-x", "10.96.99.99")
    assert "status: NXDOMAIN" in out and "96.10.in-addr.arpa. 7 IN SOA ns.dns.96.10.in-addr.arpa." in out
    out = dig(lab, "other.svc.cluster.local")          # a namespace with objects: NODATA
    assert "status: NOERROR" in out and "ANSWER: 0" in out and "IN SOA" in out


def test_coredns_metrics_on_the_engine_metrics_endpoint(lab, world):
    short(lab, "deploy-svc.default.svc.cluster.local")
    m = lab.run(lab.node_ns, ["curl", "-s", "http://127.0.0.1:10249/metrics"]).stdout
    lines = [ln for ln in m.splitlines() if ln.startswith("coredns_dns_requests_total{") and 'type="A"' in ln
             and 'proto="udp"' in ln]
    assert lines and float(lines[0].split()[-1]) >= 1
    for name in ("coredns_dns_responses_total{", "coredns_dns_request_duration_seconds_bucket{",
                 "coredns_cache_hits_total{", "coredns_cache_misses_total{", "engine_dns_requests_total{"):
        assert name in m, name


def test_endpoint_names_follow_live_endpoint_changes(lab, world):
    """A pod turning up behind a ClusterIP service (an endpoint change, no
    service change) gets its endpoint name and PTR; gone, they go."""
    eng = world
    pod = ("kind: Pod\nmetadata: {name: late-1, labels: {app: deploy-nginx}}\n"
           "spec: {containers: [{name: c, ports: [{containerPort: 80}]}]}\n"
           'status: {podIP: 10.244.1.77, conditions: [{type: Ready, status: "True"}]}\n')
    r = eng.ctl("apply", "-f", "-", input=pod)
    assert r.returncode == 0, r.stderr
    name = "10-244-1-77.deploy-svc.default.svc.cluster.local"

    def until(pred, seconds=5.0):
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            if pred():
                return True
            time.sleep(0.2)
        return False
    try:
        assert until(lambda: short(lab, name) == ["10.244.1.77"])
        assert f"{name}." in short(lab, "-x", "10.244.1.77")
        r = eng.ctl("apply", "-f", "-", input=pod.replace('status: "True"', 'status: "False"'))
        assert r.returncode == 0, r.stderr
        assert until(lambda: "status: NXDOMAIN" in dig(lab, name))          # not ready: no name
        r = eng.ctl("apply", "-f", "-", input=pod)
        assert until(lambda: short(lab, name) == ["10.244.1.77"])
    finally:
        eng.ctl("delete", "-f", "-", input=pod)
    assert until(lambda: "status: NXDOMAIN" in dig(lab, name))
