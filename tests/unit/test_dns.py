"""Cluster DNS: ClusterZone answers (no sockets), then DNSServer over UDP/TCP
on 127.0.0.1 with a labdns upstream."""
import os
import socket
import struct
import subprocess
import sys
import time

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from engine import config, servicemap, views
from engine.config import DNSConfig
from engine import dns as enginedns
from engine.dns import ClusterZone, DNSServer, RateLimiter, to_wire_limited, udp_limit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return config.load(str(p))


def pod(name, ip, labels, ready=True, ports="[{name: http, containerPort: 8080}]", ns="default", hostname=None):
    host = f", hostname: {hostname}" if hostname else ""
    return f"""---
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}
spec: {{containers: [{{name: c, ports: {ports}}}]{host}}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: "{'True' if ready else 'False'}"}}]}}
"""


CLUSTER = """apiVersion: engine/v1alpha1
kind: EngineConfiguration
dns: {clusterIP: 10.96.0.10, domain: cluster.local, upstream: [192.0.2.53]}
---
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.100.100
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: dns, protocol: UDP, port: 53, targetPort: 5353}]
---
kind: Service
metadata: {name: plain}
spec: {clusterIP: 10.96.100.101, selector: {app: web}, ports: [{port: 8080}]}
---
kind: Service
metadata: {name: np}
spec: {type: NodePort, clusterIP: 10.96.100.102, selector: {app: web}, ports: [{port: 80, nodePort: 30080}]}
---
kind: Service
metadata: {name: db}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: pg, port: 5432, targetPort: 6432}, {name: metrics, port: 9100}]
---
kind: Service
metadata: {name: empty}
spec: {clusterIP: None, selector: {app: nothing}, ports: [{name: x, port: 1}]}
---
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: www.example.org}
---
kind: Service
metadata: {name: alias}
spec: {type: ExternalName, externalName: web.default.svc.cluster.local}
---
kind: Service
metadata: {name: alias2}
spec: {type: ExternalName, externalName: alias.default.svc.cluster.local}
---
kind: Service
metadata: {name: chain-out}
spec: {type: ExternalName, externalName: ext.default.svc.cluster.local}
---
kind: Service
metadata: {name: loop1}
spec: {type: ExternalName, externalName: loop2.default.svc.cluster.local}
---
kind: Service
metadata: {name: loop2}
spec: {type: ExternalName, externalName: loop1.default.svc.cluster.local}
---
kind: Service
metadata: {name: dangling}
spec: {type: ExternalName, externalName: nothere.default.svc.cluster.local}
---
kind: Service
metadata: {name: api, namespace: prod}
spec: {clusterIP: 10.96.200.1, selector: {app: api}, ports: [{name: https, port: 443}]}
""" + pod("web-1", "10.244.1.2", "app: web") + pod("web-2", "10.244.1.3", "app: web") \
    + pod("web-3", "10.244.1.4", "app: web", ready=False) \
    + pod("db-0", "10.244.2.2", "app: db", hostname="db-0",
          ports="[{name: metrics, containerPort: 9100}]") \
    + pod("db-1", "10.244.2.3", "app: db") \
    + pod("db-2", "10.244.2.4", "app: db", ready=False)

DOM = "cluster.local."


class FakeUpstream:
    """ClusterZone resolver: canned answers, records the calls."""

    def __init__(self, table=None, fail=False):
        self.table = table or {}
        self.fail = fail
        self.calls = []

    def __call__(self, name, rdtype):
        self.calls.append((name.to_text(), dns.rdatatype.to_text(rdtype)))
        if self.fail:
            return None
        recs = self.table.get((name.to_text().lower(), rdtype))
        return [dns.rrset.from_text_list(name, 60, "IN", rdtype, recs)] if recs else []


@pytest.fixture
def cfg(tmp_path):
    return load(tmp_path, CLUSTER)


@pytest.fixture
def zone(cfg):
    up = FakeUpstream({("www.example.org.", dns.rdatatype.A): ["93.184.216.34"]})
    z = ClusterZone(servicemap.build(cfg), cfg.engine.dns, resolver=up)
    z.upstream = up
    return z


def ask(zone, name, rdtype="A", recursion=True, **kw):
    q = dns.message.make_query(name, rdtype, **kw)
    return zone.answer(q, recursion=recursion)


def answers(r, rdtype=None):
    """[(owner, type, rdata text)] of the answer section."""
    return [(rr.name.to_text().lower(), dns.rdatatype.to_text(rr.rdtype), rd.to_text())
            for rr in r.answer for rd in rr if rdtype is None or rr.rdtype == dns.rdatatype.from_text(rdtype)]


def rdatas(r, rdtype="A", section="answer"):
    t = dns.rdatatype.from_text(rdtype)
    return sorted(rd.to_text() for rr in getattr(r, section) for rd in rr if rr.rdtype == t)


def is_nodata(r):
    return (r.rcode() == dns.rcode.NOERROR and not r.answer
            and [rr.rdtype for rr in r.authority] == [dns.rdatatype.SOA])


def is_nxdomain(r):
    return (r.rcode() == dns.rcode.NXDOMAIN and not r.answer
            and [rr.rdtype for rr in r.authority] == [dns.rdatatype.SOA])


# -- ClusterIP ---------------------------------------------------------------

def test_clusterip_a_record_ttl_and_aa(zone):
    r = ask(zone, "web.default.svc.cluster.local", "A")
    assert r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.AA and r.flags & dns.flags.QR
    assert answers(r) == [("web.default.svc.cluster.local.", "A", "10.96.100.100")]
    assert r.answer[0].ttl == 5
    # NodePort services answer with their cluster IP; other namespaces work
    assert rdatas(ask(zone, "np.default.svc.cluster.local")) == ["10.96.100.102"]
    assert rdatas(ask(zone, "api.prod.svc.cluster.local")) == ["10.96.200.1"]


def test_names_are_case_insensitive_and_question_preserved(zone):
    r = ask(zone, "WeB.DeFault.SVC.Cluster.Local.", "A")
    assert rdatas(r) == ["10.96.100.100"]
    assert r.question[0].name.to_text() == "WeB.DeFault.SVC.Cluster.Local."
    assert r.answer[0].name.to_text() == "WeB.DeFault.SVC.Cluster.Local."


def test_ttl_from_config(tmp_path):
    cfg = load(tmp_path, CLUSTER.replace("upstream: [192.0.2.53]", "upstream: [192.0.2.53], ttl: 30"))
    z = ClusterZone(servicemap.build(cfg), cfg.engine.dns)
    assert ask(z, "web.default.svc.cluster.local").answer[0].ttl == 30
    r = ask(z, "nope.default.svc.cluster.local")
    assert r.authority[0].ttl == 30 and r.authority[0][0].minimum == 30


def test_aaaa_and_txt_on_a_service_are_nodata_with_soa(zone):
    for t in ("AAAA", "TXT", "MX"):
        r = ask(zone, "web.default.svc.cluster.local", t)
        assert is_nodata(r), t
        assert r.flags & dns.flags.AA
    soa = ask(zone, "web.default.svc.cluster.local", "AAAA").authority[0]
    assert soa.name.to_text() == DOM
    rd = soa[0]
    assert rd.mname.to_text() == "ns.dns.cluster.local." and rd.rname.to_text() == "hostmaster.cluster.local."
    assert (rd.refresh, rd.retry, rd.expire, rd.minimum) == (7200, 1800, 86400, 5)
    assert rd.serial > 0


@pytest.mark.parametrize("name", ["svc.cluster.local", "default.svc.cluster.local", "prod.svc.cluster.local",
                                  "cluster.local", "pod.cluster.local", "_tcp.web.default.svc.cluster.local"])
def test_intermediate_names_are_nodata(zone, name):
    assert is_nodata(ask(zone, name, "A"))
    assert is_nodata(ask(zone, name, "AAAA"))


@pytest.mark.parametrize("name", ["nope.default.svc.cluster.local", "web.nons.svc.cluster.local",
                                  "x.web.default.svc.cluster.local", "foo.cluster.local",
                                  "a.b.c.default.svc.cluster.local", "web.default.cluster.local",
                                  "_http._udp.web.default.svc.cluster.local",
                                  "_nope._tcp.web.default.svc.cluster.local"])
def test_unknown_names_under_the_domain_are_nxdomain(zone, name):
    for t in ("A", "AAAA", "SRV", "TXT"):
        r = ask(zone, name, t)
        assert is_nxdomain(r), (name, t)
        assert r.flags & dns.flags.AA


def test_soa_ns_and_version_at_the_apex(zone):
    r = ask(zone, "cluster.local", "SOA")
    assert rdatas(r, "SOA")[0].startswith("ns.dns.cluster.local. hostmaster.cluster.local. ")
    r = ask(zone, "cluster.local", "NS")
    assert rdatas(r, "NS") == ["ns.dns.cluster.local."]
    assert rdatas(r, "A", "additional") == ["10.96.0.10"]
    assert rdatas(ask(zone, "ns.dns.cluster.local")) == ["10.96.0.10"]
    assert rdatas(ask(zone, "dns-version.cluster.local", "TXT"), "TXT") == ['"1.1.0"']


def test_any_is_answered_with_one_rrset(zone):
    """RFC 8482: ANY gets one RRset of the name, not every record (no
    amplification); the A record where there is one."""
    r = ask(zone, "web.default.svc.cluster.local", "ANY")
    assert answers(r) == [("web.default.svc.cluster.local.", "A", "10.96.100.100")]
    r = ask(zone, "_http._tcp.web.default.svc.cluster.local", "ANY")
    assert [a[1] for a in answers(r)] == ["SRV"]
    r = ask(zone, "cluster.local", "ANY")
    assert [a[1] for a in answers(r)] == ["SOA"]
    r = ask(zone, "db.default.svc.cluster.local", "ANY")          # headless: the A records
    assert {a[1] for a in answers(r)} == {"A"}
    assert is_nxdomain(ask(zone, "nope.default.svc.cluster.local", "ANY"))


def test_pods_insecure(zone):
    assert rdatas(ask(zone, "10-244-9-9.default.pod.cluster.local")) == ["10.244.9.9"]
    assert is_nodata(ask(zone, "10-244-9-9.default.pod.cluster.local", "AAAA"))
    assert is_nxdomain(ask(zone, "10-244-9-999.default.pod.cluster.local"))
    assert is_nxdomain(ask(zone, "not-an-ip.default.pod.cluster.local"))


def test_custom_domain(tmp_path):
    cfg = load(tmp_path, CLUSTER.replace("domain: cluster.local", "domain: Corp.Example"))
    z = ClusterZone(servicemap.build(cfg), cfg.engine.dns)
    assert rdatas(ask(z, "web.default.svc.corp.example")) == ["10.96.100.100"]
    assert ask(z, "web.default.svc.cluster.local") is None      # not ours: forward
    assert rdatas(ask(z, "corp.example", "SOA"), "SOA")[0].startswith("ns.dns.corp.example. hostmaster.corp.example.")


# -- SRV ---------------------------------------------------------------------

def test_srv_for_named_ports_of_a_clusterip_service(zone):
    r = ask(zone, "_http._tcp.web.default.svc.cluster.local", "SRV")
    assert answers(r) == [("_http._tcp.web.default.svc.cluster.local.", "SRV", "0 100 80 web.default.svc.cluster.local.")]
    assert r.answer[0].ttl == 5
    assert [(rr.name.to_text(), rd.to_text()) for rr in r.additional for rd in rr] == \
        [("web.default.svc.cluster.local.", "10.96.100.100")]
    r = ask(zone, "_dns._udp.web.default.svc.cluster.local", "SRV")
    assert rdatas(r, "SRV") == ["0 100 53 web.default.svc.cluster.local."]
    # the SRV name exists, other types are NODATA; unnamed ports have no SRV name
    assert is_nodata(ask(zone, "_http._tcp.web.default.svc.cluster.local", "A"))
    assert is_nxdomain(ask(zone, "_tcp.plain.default.svc.cluster.local", "SRV"))


def test_headless_srv_per_ready_endpoint(zone):
    r = ask(zone, "_metrics._tcp.db.default.svc.cluster.local", "SRV")
    assert r.rcode() == dns.rcode.NOERROR
    assert rdatas(r, "SRV") == ["0 50 9100 10-244-2-3.db.default.svc.cluster.local.",
                                "0 50 9100 db-0.db.default.svc.cluster.local."]
    add = sorted((rr.name.to_text(), rd.to_text()) for rr in r.additional for rd in rr)
    assert add == [("10-244-2-3.db.default.svc.cluster.local.", "10.244.2.3"),
                   ("db-0.db.default.svc.cluster.local.", "10.244.2.2")]
    # port = the endpoint's port (targetPort), not the service port
    r = ask(zone, "_pg._tcp.db.default.svc.cluster.local", "SRV")
    assert {rd.port for rr in r.answer for rd in rr} == {6432}
    assert len(r.answer[0]) == 2


def test_no_srv_for_externalname(zone):
    assert is_nxdomain(ask(zone, "_http._tcp.ext.default.svc.cluster.local", "SRV"))


# -- headless ------------------------------------------------------------------

def test_headless_a_per_ready_endpoint_distinct(zone):
    r = ask(zone, "db.default.svc.cluster.local", "A")
    # db-0/db-1 appear under two ports each: one A per IP; db-2 is not ready
    assert rdatas(r) == ["10.244.2.2", "10.244.2.3"]
    assert len(r.answer) == 1 and r.flags & dns.flags.AA
    assert is_nodata(ask(zone, "db.default.svc.cluster.local", "AAAA"))


def test_headless_per_endpoint_names(zone):
    assert rdatas(ask(zone, "db-0.db.default.svc.cluster.local")) == ["10.244.2.2"]
    # an endpoint with a hostname is known by it alone (CoreDNS's endpointHostname)
    assert is_nxdomain(ask(zone, "10-244-2-2.db.default.svc.cluster.local"))
    assert rdatas(ask(zone, "10-244-2-3.db.default.svc.cluster.local")) == ["10.244.2.3"]
    assert is_nxdomain(ask(zone, "10-244-2-4.db.default.svc.cluster.local"))     # not ready
    assert is_nxdomain(ask(zone, "db-1.db.default.svc.cluster.local"))           # no hostname
    assert is_nodata(ask(zone, "db-0.db.default.svc.cluster.local", "TXT"))


def test_headless_without_ready_endpoints_is_nxdomain(zone):
    assert is_nxdomain(ask(zone, "empty.default.svc.cluster.local", "A"))
    assert is_nxdomain(ask(zone, "_x._tcp.empty.default.svc.cluster.local", "SRV"))


def test_headless_from_endpointslice_with_hostnames(tmp_path):
    cfg = load(tmp_path, """kind: Service
metadata: {name: kafka, namespace: data}
spec: {clusterIP: None, ports: [{name: broker, port: 9092}]}
---
kind: EndpointSlice
metadata: {name: kafka-1, namespace: data, labels: {kubernetes.io/service-name: kafka}}
addressType: IPv4
ports: [{name: broker, port: 9093}]
endpoints:
- {addresses: [10.244.3.1], hostname: kafka-0}
- {addresses: [10.244.3.2], hostname: kafka-1}
- {addresses: [10.244.3.3], conditions: {ready: false}}
""")
    z = ClusterZone(servicemap.build(cfg), cfg.engine.dns)
    assert rdatas(ask(z, "kafka.data.svc.cluster.local")) == ["10.244.3.1", "10.244.3.2"]
    assert rdatas(ask(z, "kafka-1.kafka.data.svc.cluster.local")) == ["10.244.3.2"]
    r = ask(z, "_broker._tcp.kafka.data.svc.cluster.local", "SRV")
    assert rdatas(r, "SRV") == ["0 50 9093 kafka-0.kafka.data.svc.cluster.local.",
                                "0 50 9093 kafka-1.kafka.data.svc.cluster.local."]
    assert rdatas(ask(z, "2.3.244.10.in-addr.arpa", "PTR"), "PTR") == ["kafka-1.kafka.data.svc.cluster.local."]


def test_headless_without_ports_answers_its_addresses(tmp_path):
    """A headless service may have no ports (a StatefulSet's governing
    service often has none): its endpoints still get A records and names,
    from pods, EndpointSlices without ports and legacy Endpoints alike; no SRV."""
    cfg = load(tmp_path, """kind: Service
metadata: {name: gov}
spec: {clusterIP: None, selector: {app: gov}}
---
kind: Service
metadata: {name: sl}
spec: {clusterIP: None}
---
kind: EndpointSlice
metadata: {name: sl-1, labels: {kubernetes.io/service-name: sl}}
addressType: IPv4
endpoints:
- {addresses: [10.244.5.1], hostname: a}
- {addresses: [10.244.5.2], conditions: {ready: false}}
---
kind: Service
metadata: {name: legacy}
spec: {clusterIP: None}
---
kind: Endpoints
metadata: {name: legacy}
subsets: [{addresses: [{ip: 10.244.6.1}]}]
""" + pod("gov-0", "10.244.4.1", "app: gov", hostname="gov-0")
        + pod("gov-1", "10.244.4.2", "app: gov", ready=False))
    smap = servicemap.build(cfg)
    z = ClusterZone(smap, cfg.engine.dns)
    assert rdatas(ask(z, "gov.default.svc.cluster.local")) == ["10.244.4.1"]
    assert rdatas(ask(z, "gov-0.gov.default.svc.cluster.local")) == ["10.244.4.1"]
    assert is_nxdomain(ask(z, "10-244-4-1.gov.default.svc.cluster.local"))     # known by its hostname
    assert is_nodata(ask(z, "gov.default.svc.cluster.local", "SRV"))
    assert rdatas(ask(z, "1.4.244.10.in-addr.arpa", "PTR"), "PTR") == ["gov-0.gov.default.svc.cluster.local."]
    assert rdatas(ask(z, "sl.default.svc.cluster.local")) == ["10.244.5.1"]
    assert rdatas(ask(z, "a.sl.default.svc.cluster.local")) == ["10.244.5.1"]
    assert rdatas(ask(z, "legacy.default.svc.cluster.local")) == ["10.244.6.1"]
    assert "10.244.4.1" in views.endpoints(smap) and "10.244.4.2" not in views.endpoints(smap)
    # the incremental path keeps them too: gov-1 turns ready
    smap2, affected, _ = servicemap.update(
        smap, cfg.engine, pods=[(("default", "gov-1"), config.parse_text(pod("gov-1", "10.244.4.2", "app: gov"), "x").pods[0])])
    assert affected == {"default/gov"}
    z2 = ClusterZone(smap2, cfg.engine.dns)
    assert rdatas(ask(z2, "gov.default.svc.cluster.local")) == ["10.244.4.1", "10.244.4.2"]


def test_kube_dns_is_a_service_of_the_cluster(zone):
    """kube-dns.kube-system resolves to the DNS address, as in any cluster."""
    assert rdatas(ask(zone, "kube-dns.kube-system.svc.cluster.local")) == ["10.96.0.10"]
    assert rdatas(ask(zone, "_dns._udp.kube-dns.kube-system.svc.cluster.local", "SRV"), "SRV") == \
        ["0 100 53 kube-dns.kube-system.svc.cluster.local."]
    assert rdatas(ask(zone, "10.0.96.10.in-addr.arpa", "PTR"), "PTR") == ["kube-dns.kube-system.svc.cluster.local."]


def test_kube_dns_from_a_cluster_dump_is_accepted(tmp_path):
    """`kubectl get svc -A -o yaml` includes kube-dns on the DNS address: it
    loads, and answers as the user wrote it; another service there is refused."""
    kube_dns = """---
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec: {clusterIP: 10.96.0.10, selector: {k8s-app: kube-dns},
       ports: [{name: dns, protocol: UDP, port: 53}, {name: dns-tcp, port: 53}, {name: metrics, port: 9153}]}
"""
    cfg = load(tmp_path, CLUSTER + kube_dns)
    smap = servicemap.build(cfg)
    z = ClusterZone(smap, cfg.engine.dns)
    assert rdatas(ask(z, "kube-dns.kube-system.svc.cluster.local")) == ["10.96.0.10"]
    assert rdatas(ask(z, "_metrics._tcp.kube-dns.kube-system.svc.cluster.local", "SRV"), "SRV") == \
        ["0 100 9153 kube-dns.kube-system.svc.cluster.local."]
    assert [l.split()[:2] for l in views.services(smap, cfg.engine.dns).splitlines()].count(["kube-system", "kube-dns"]) == 1
    other = load(tmp_path, CLUSTER + kube_dns.replace("name: kube-dns,", "name: impostor,"), name="d.yaml")
    with pytest.raises(config.ConfigError, match="already allocated to the cluster DNS"):
        servicemap.build(other)


# -- PTR -----------------------------------------------------------------------

def test_ptr_for_cluster_ips_and_headless_endpoints(zone):
    r = ask(zone, "100.100.96.10.in-addr.arpa", "PTR")
    assert answers(r) == [("100.100.96.10.in-addr.arpa.", "PTR", "web.default.svc.cluster.local.")]
    assert r.flags & dns.flags.AA and r.answer[0].ttl == 5
    assert rdatas(ask(zone, "1.200.96.10.IN-ADDR.ARPA", "PTR"), "PTR") == ["api.prod.svc.cluster.local."]
    assert rdatas(ask(zone, "2.2.244.10.in-addr.arpa", "PTR"), "PTR") == ["db-0.db.default.svc.cluster.local."]
    assert rdatas(ask(zone, "3.2.244.10.in-addr.arpa", "PTR"), "PTR") == ["10-244-2-3.db.default.svc.cluster.local."]


def test_other_reverse_names_are_forwarded(zone):
    """Outside serviceCIDR and dns.podCIDR (unset here) reverse names go upstream."""
    assert ask(zone, "4.2.244.10.in-addr.arpa", "PTR") is None        # not-ready endpoint
    assert ask(zone, "8.8.8.8.in-addr.arpa", "PTR") is None
    assert ask(zone, "2.2.244.10.in-addr.arpa", "TXT") is None


def test_service_cidr_reverse_zone_is_answered_with_authority(zone):
    """serviceCIDR 10.96.0.0/12 -> zones 96.10.in-addr.arpa .. 111.10.in-addr.arpa:
    an unallocated address is NXDOMAIN with the zone's SOA, not forwarded."""
    r = ask(zone, "99.99.96.10.in-addr.arpa", "PTR")
    assert is_nxdomain(r) and r.flags & dns.flags.AA
    assert r.authority[0].name.to_text() == "96.10.in-addr.arpa."
    soa = r.authority[0][0]
    assert (soa.mname.to_text(), soa.rname.to_text(), soa.minimum, r.authority[0].ttl) == \
        ("ns.dns.96.10.in-addr.arpa.", "hostmaster.96.10.in-addr.arpa.", 5, 5)
    assert ask(zone, "1.0.111.10.in-addr.arpa", "PTR").authority[0].name.to_text() == "111.10.in-addr.arpa."
    assert ask(zone, "1.0.112.10.in-addr.arpa", "PTR") is None          # outside the /12
    # other types on a reverse name: NXDOMAIN (CoreDNS), partial names too
    assert is_nxdomain(ask(zone, "100.100.96.10.in-addr.arpa", "TXT"))
    assert is_nxdomain(ask(zone, "100.96.10.in-addr.arpa", "PTR"))
    # the apex: SOA and NS answer, other types NODATA
    assert rdatas(ask(zone, "96.10.in-addr.arpa", "SOA"), "SOA")[0].startswith("ns.dns.96.10.in-addr.arpa.")
    assert rdatas(ask(zone, "96.10.in-addr.arpa", "NS"), "NS") == ["ns.dns.96.10.in-addr.arpa."]
    assert is_nodata(ask(zone, "96.10.in-addr.arpa", "PTR"))


def test_pod_cidr_reverse_zones_v4_and_v6(tmp_path):
    cfg = load(tmp_path, CLUSTER.replace("upstream: [192.0.2.53]",
                                         "upstream: [192.0.2.53], podCIDR: '10.244.0.0/16,fd00:10:244::/56'"))
    z = ClusterZone(servicemap.build(cfg), cfg.engine.dns)
    assert rdatas(ask(z, "2.2.244.10.in-addr.arpa", "PTR"), "PTR") == ["db-0.db.default.svc.cluster.local."]
    r = ask(z, "4.2.244.10.in-addr.arpa", "PTR")        # a not-ready endpoint: not named
    assert is_nxdomain(r) and r.authority[0].name.to_text() == "244.10.in-addr.arpa."
    v6 = ask(z, "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.4.4.2.0.0.1.0.0.0.0.d.f.ip6.arpa", "PTR")
    assert is_nxdomain(v6) and v6.authority[0].name.to_text() == "0.0.4.4.2.0.0.1.0.0.0.0.d.f.ip6.arpa."
    assert ask(z, "1.0.245.10.in-addr.arpa", "PTR") is None
    with pytest.raises(config.ConfigError, match="dns.podCIDR"):
        load(tmp_path, CLUSTER.replace("upstream: [192.0.2.53]", "upstream: [192.0.2.53], podCIDR: nope"))


def test_endpoint_names_and_ptrs_for_clusterip_services(zone):
    """Every service's ready endpoints are named <hostname or a-b-c-d>.<svc>
    and have a PTR to that name, as CoreDNS (not only headless services)."""
    assert rdatas(ask(zone, "10-244-1-2.web.default.svc.cluster.local")) == ["10.244.1.2"]
    assert rdatas(ask(zone, "10-244-1-3.plain.default.svc.cluster.local")) == ["10.244.1.3"]
    assert is_nxdomain(ask(zone, "10-244-1-4.web.default.svc.cluster.local"))     # not ready
    assert is_nodata(ask(zone, "10-244-1-2.web.default.svc.cluster.local", "AAAA"))
    # the service's own A stays its cluster IP
    assert rdatas(ask(zone, "web.default.svc.cluster.local")) == ["10.96.100.100"]
    # an endpoint of three services has three PTRs
    r = ask(zone, "2.1.244.10.in-addr.arpa", "PTR")
    assert rdatas(r, "PTR") == ["10-244-1-2.np.default.svc.cluster.local.",
                                "10-244-1-2.plain.default.svc.cluster.local.",
                                "10-244-1-2.web.default.svc.cluster.local."]


def test_existing_namespaces_are_nodata(tmp_path):
    cfg = load(tmp_path, CLUSTER + pod("lonely", "10.244.7.7", "app: x", ns="quiet"))
    z = ClusterZone(servicemap.build(cfg), cfg.engine.dns)
    for name in ("quiet.svc.cluster.local", "prod.svc.cluster.local", "default.svc.cluster.local",
                 "kube-system.svc.cluster.local", "quiet.pod.cluster.local"):
        assert is_nodata(ask(z, name)), name
    assert is_nxdomain(ask(z, "nothere.svc.cluster.local"))
    assert is_nxdomain(ask(z, "x.quiet.svc.cluster.local"))


def test_pod_modes(tmp_path):
    def zone_for(mode):
        text = CLUSTER + pod("lonely", "10.244.7.7", "app: x", ns="quiet")
        if mode:
            text = text.replace("upstream: [192.0.2.53]", f"upstream: [192.0.2.53], pods: {mode}")
        c = load(tmp_path, text)
        assert c.engine.dns.pods == (mode or "insecure")
        return ClusterZone(servicemap.build(c), c.engine.dns)
    # insecure (the default): any address in an existing namespace
    z = zone_for(None)
    assert rdatas(ask(z, "10-1-2-3.quiet.pod.cluster.local")) == ["10.1.2.3"]
    assert is_nxdomain(ask(z, "10-1-2-3.nothere.pod.cluster.local"))
    # verified: only a pod's own address, in its own namespace
    z = zone_for("verified")
    assert rdatas(ask(z, "10-244-7-7.quiet.pod.cluster.local")) == ["10.244.7.7"]
    assert is_nxdomain(ask(z, "10-1-2-3.quiet.pod.cluster.local"))
    assert is_nxdomain(ask(z, "10-244-7-7.default.pod.cluster.local"))
    assert is_nodata(ask(z, "quiet.pod.cluster.local"))
    # disabled: nothing under pod.<domain>
    z = zone_for("disabled")
    assert is_nxdomain(ask(z, "10-244-7-7.quiet.pod.cluster.local"))
    assert is_nxdomain(ask(z, "quiet.pod.cluster.local"))
    assert is_nxdomain(ask(z, "pod.cluster.local"))
    with pytest.raises(config.ConfigError, match="dns.pods"):
        zone_for("sometimes")


# -- ExternalName ----------------------------------------------------------------

def test_externalname_cname_plus_upstream_answer(zone):
    r = ask(zone, "ext.default.svc.cluster.local", "A")
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    assert answers(r) == [("ext.default.svc.cluster.local.", "CNAME", "www.example.org."),
                          ("www.example.org.", "A", "93.184.216.34")]
    assert r.answer[0].ttl == 5
    assert zone.upstream.calls == [("www.example.org.", "A")]


def test_externalname_cname_for_every_qtype(zone):
    for t in ("AAAA", "TXT", "MX", "SRV"):
        r = ask(zone, "ext.default.svc.cluster.local", t)
        assert r.rcode() == dns.rcode.NOERROR
        assert answers(r) == [("ext.default.svc.cluster.local.", "CNAME", "www.example.org.")], t
    r = ask(zone, "ext.default.svc.cluster.local", "CNAME")
    assert answers(r) == [("ext.default.svc.cluster.local.", "CNAME", "www.example.org.")]
    assert ("www.example.org.", "CNAME") not in zone.upstream.calls


def test_externalname_upstream_failure_gives_cname_only(cfg):
    z = ClusterZone(servicemap.build(cfg), cfg.engine.dns, resolver=FakeUpstream(fail=True))
    r = ask(z, "ext.default.svc.cluster.local")
    assert r.rcode() == dns.rcode.NOERROR
    assert answers(r) == [("ext.default.svc.cluster.local.", "CNAME", "www.example.org.")]
    z = ClusterZone(servicemap.build(cfg), cfg.engine.dns, resolver=None)
    assert answers(ask(z, "ext.default.svc.cluster.local")) == answers(r)


def test_externalname_without_recursion_does_not_ask_upstream(zone):
    r = ask(zone, "ext.default.svc.cluster.local", recursion=False)
    assert answers(r) == [("ext.default.svc.cluster.local.", "CNAME", "www.example.org.")]
    assert zone.upstream.calls == []


def test_externalname_to_in_cluster_name_resolves_internally(zone):
    r = ask(zone, "alias.default.svc.cluster.local")
    assert answers(r) == [("alias.default.svc.cluster.local.", "CNAME", "web.default.svc.cluster.local."),
                          ("web.default.svc.cluster.local.", "A", "10.96.100.100")]
    r = ask(zone, "alias2.default.svc.cluster.local")
    assert answers(r) == [("alias2.default.svc.cluster.local.", "CNAME", "alias.default.svc.cluster.local."),
                          ("alias.default.svc.cluster.local.", "CNAME", "web.default.svc.cluster.local."),
                          ("web.default.svc.cluster.local.", "A", "10.96.100.100")]
    # in-cluster then out: the chain ends at the upstream
    r = ask(zone, "chain-out.default.svc.cluster.local")
    assert [a[1] for a in answers(r)] == ["CNAME", "CNAME", "A"]
    assert answers(r)[-1] == ("www.example.org.", "A", "93.184.216.34")
    assert zone.upstream.calls == [("www.example.org.", "A")]


def test_externalname_loop_and_dangling_target(zone):
    r = ask(zone, "loop1.default.svc.cluster.local")
    assert r.rcode() == dns.rcode.NOERROR
    assert [a[1:] for a in answers(r)] == [("CNAME", "loop2.default.svc.cluster.local."),
                                          ("CNAME", "loop1.default.svc.cluster.local.")]
    r = ask(zone, "dangling.default.svc.cluster.local")
    assert r.rcode() == dns.rcode.NOERROR          # coredns#6088: NODATA
    assert answers(r) == [("dangling.default.svc.cluster.local.", "CNAME", "nothere.default.svc.cluster.local.")]
    assert [rr.rdtype for rr in r.authority] == [dns.rdatatype.SOA]
    assert zone.upstream.calls == []


def test_externalname_chain_is_bounded(tmp_path):
    docs = [f"kind: Service\nmetadata: {{name: s{i}}}\nspec: {{type: ExternalName, externalName: s{i + 1}.default.svc.cluster.local}}\n"
            for i in range(20)]
    cfg = load(tmp_path, "---\n".join(docs))
    z = ClusterZone(servicemap.build(cfg), cfg.engine.dns)
    r = ask(z, "s0.default.svc.cluster.local")
    assert r.rcode() == dns.rcode.NOERROR
    assert 1 <= len(r.answer) <= 9 and all(rr.rdtype == dns.rdatatype.CNAME for rr in r.answer)


# -- what is not ours / bad input ---------------------------------------------------

def test_outside_the_zone_is_forwarded(zone):
    for name in ("google.com", "local", "svc.cluster.local.example.com", "10.in-addr.arpa"):
        assert ask(zone, name) is None


def test_bad_queries(zone):
    q = dns.message.make_query("web.default.svc.cluster.local", "A")
    q.set_opcode(dns.opcode.STATUS)
    assert zone.answer(q).rcode() == dns.rcode.NOTIMP
    q = dns.message.Message()
    assert zone.answer(q).rcode() == dns.rcode.FORMERR
    assert ask(zone, "cluster.local", "AXFR").rcode() == dns.rcode.REFUSED
    q = dns.message.make_query("web.default.svc.cluster.local", "A", rdclass="CH")
    assert zone.answer(q).rcode() == dns.rcode.REFUSED


def test_empty_service_map_and_update():
    cfg = DNSConfig()
    z = ClusterZone(servicemap.ServiceMap(services={}), cfg)
    assert is_nodata(ask(z, "svc.cluster.local"))
    assert is_nxdomain(ask(z, "web.default.svc.cluster.local"))
    assert is_nodata(ask(z, "default.svc.cluster.local"))       # every cluster has it
    assert is_nxdomain(ask(z, "elsewhere.svc.cluster.local"))


def test_truncation_keeps_what_fits():
    q = dns.message.make_query("x.example.", "A")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text_list("x.example.", 5, "IN", "A", [f"10.0.0.{i}" for i in range(100)]))
    wire, truncated = to_wire_limited(r, 512)
    assert truncated and len(wire) <= 512
    m = dns.message.from_wire(wire)
    assert m.flags & dns.flags.TC and 10 < len(m.answer[0]) < 100
    wire, truncated = to_wire_limited(r, 65535)
    assert not truncated and len(dns.message.from_wire(wire).answer[0]) == 100


# -- sockets ----------------------------------------------------------------------

def free_port():
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(50):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        port = u.getsockname()[1]
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            u.close()
            t.close()
    raise RuntimeError("no free port")


@pytest.fixture
def upstream():
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "engine.lab.dns", "--bind", "127.0.0.1", "--port", str(port),
                          "--record", "google.com=A:192.168.50.80",
                          "--record", "www.example.org=CNAME:google.com",
                          "--record", "big.example=TXT:" + "x" * 200,
                          "--record", "big.example=TXT:" + "y" * 200,
                          "--record", "big.example=TXT:" + "z" * 200],
                         cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        yield port
    finally:
        p.terminate()
        p.wait(timeout=5)


def many_endpoints(n):
    eps = "\n".join(f"- {{addresses: [10.244.{i // 250}.{i % 250 + 1}]}}" for i in range(n))
    return f"""---
kind: Service
metadata: {{name: many}}
spec: {{clusterIP: None, ports: [{{name: http, port: 80}}]}}
---
kind: EndpointSlice
metadata: {{name: many-1, labels: {{kubernetes.io/service-name: many}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
{eps}
"""


def start_server(tmp_path, upstream_port, text=CLUSTER, **kw):
    cfg = load(tmp_path, text + many_endpoints(100), name="srv.yaml")
    dcfg = cfg.engine.dns
    dcfg.upstream = [("127.0.0.1", upstream_port)] if upstream_port else []
    srv = DNSServer(dcfg, "127.0.0.1", port=0, **kw)
    srv.update(servicemap.build(cfg))
    return srv.start()


def udp(srv, name, rdtype="A", **kw):
    return dns.query.udp(dns.message.make_query(name, rdtype, **kw), "127.0.0.1", port=srv.port, timeout=5)


def tcp(srv, name, rdtype="A", **kw):
    return dns.query.tcp(dns.message.make_query(name, rdtype, **kw), "127.0.0.1", port=srv.port, timeout=5)


CLIENT_COOKIE = b"\x01\x02\x03\x04\x05\x06\x07\x08"


def cookie_of(r):
    return next((o.to_wire() for o in r.options if o.otype == 10), None)


def udp_with_cookie(srv, name, rdtype="A", payload=4096):
    """As a resolver that keeps DNS cookies: a first query learns the server
    cookie, the second returns it (the address is proven: answers of any size)."""
    opt = dns.edns.GenericOption(10, CLIENT_COOKIE)
    r = dns.query.udp(dns.message.make_query(name, rdtype, use_edns=0, payload=payload, options=[opt]),
                      "127.0.0.1", port=srv.port, timeout=5)
    full = cookie_of(r)
    assert full is not None and full[:8] == CLIENT_COOKIE and len(full) == 24
    opt = dns.edns.GenericOption(10, full)
    return dns.query.udp(dns.message.make_query(name, rdtype, use_edns=0, payload=payload, options=[opt]),
                         "127.0.0.1", port=srv.port, timeout=5)


def test_server_answers_zone_over_udp_and_tcp(tmp_path):
    srv = start_server(tmp_path, None)
    try:
        for f in (udp, tcp):
            r = f(srv, "web.default.svc.cluster.local")
            assert rdatas(r) == ["10.96.100.100"] and r.flags & dns.flags.AA
            assert f(srv, "nope.default.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
            assert rdatas(f(srv, "_http._tcp.web.default.svc.cluster.local", "SRV"), "SRV") == \
                ["0 100 80 web.default.svc.cluster.local."]
        # no upstream configured: outside names are SERVFAIL
        assert udp(srv, "google.com").rcode() == dns.rcode.SERVFAIL
        assert srv.stats["queries"] == 7 and srv.stats["nxdomain"] == 2 and srv.stats["servfail"] == 1
    finally:
        srv.close()


def test_server_several_queries_per_tcp_connection(tmp_path):
    srv = start_server(tmp_path, None)
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            for i in range(3):
                q = dns.message.make_query("api.prod.svc.cluster.local", "A")
                w = q.to_wire()
                s.sendall(struct.pack("!H", len(w)) + w)
                n = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
                r = dns.message.from_wire(s.recv(n, socket.MSG_WAITALL))
                assert r.id == q.id and rdatas(r) == ["10.96.200.1"]
    finally:
        srv.close()


def test_server_update_swaps_the_zone(tmp_path):
    srv = start_server(tmp_path, None)
    try:
        assert udp(srv, "new.default.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
        cfg = load(tmp_path, "kind: Service\nmetadata: {name: new}\nspec: {clusterIP: 10.96.5.5, ports: [{port: 1}]}\n",
                   name="new.yaml")
        srv.update(servicemap.build(cfg))
        assert rdatas(udp(srv, "new.default.svc.cluster.local")) == ["10.96.5.5"]
        assert udp(srv, "web.default.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    finally:
        srv.close()


def test_server_forwards_to_upstream(tmp_path, upstream):
    srv = start_server(tmp_path, upstream)
    try:
        for f in (udp, tcp):
            r = f(srv, "GOOGLE.com")           # dns.query checks the id and the question
            assert rdatas(r) == ["192.168.50.80"]
            assert r.question[0].name.to_text() == "GOOGLE.com."
            r = f(srv, "www.example.org")
            assert [a[1] for a in answers(r)] == ["CNAME", "A"]
            assert f(srv, "nothing.example").rcode() == dns.rcode.NXDOMAIN
        # an upstream answer larger than 512 bytes: truncated to the UDP client, whole over TCP
        r = udp(srv, "big.example", "TXT")
        assert r.flags & dns.flags.TC
        r = tcp(srv, "big.example", "TXT")
        assert not r.flags & dns.flags.TC and len(r.answer[0]) == 3
        r = udp(srv, "big.example", "TXT", use_edns=0, payload=4096)
        assert r.flags & dns.flags.TC            # no cookie: 3x the query at most
        r = udp_with_cookie(srv, "big.example", "TXT")
        assert not r.flags & dns.flags.TC and len(r.answer[0]) == 3
        # the second transport's questions came from the cache
        assert srv.stats["forwarded"] >= 4 and srv.cache.stats["hits_success"] >= 3
    finally:
        srv.close()


def test_server_externalname_cname_plus_upstream_a(tmp_path, upstream):
    srv = start_server(tmp_path, upstream)
    try:
        for f in (udp, tcp):
            r = f(srv, "ext.default.svc.cluster.local")
            assert r.rcode() == dns.rcode.NOERROR
            assert answers(r) == [("ext.default.svc.cluster.local.", "CNAME", "www.example.org."),
                                  ("www.example.org.", "CNAME", "google.com."),
                                  ("google.com.", "A", "192.168.50.80")]
    finally:
        srv.close()


def test_server_servfail_when_upstream_is_down(tmp_path):
    dead = free_port()
    srv = start_server(tmp_path, dead)
    try:
        t0 = time.monotonic()
        r = udp(srv, "google.com")
        assert r.rcode() == dns.rcode.SERVFAIL
        assert time.monotonic() - t0 < 3
        assert tcp(srv, "google.com").rcode() == dns.rcode.SERVFAIL
        # ExternalName with the upstream down: just the CNAME
        r = udp(srv, "ext.default.svc.cluster.local")
        assert r.rcode() == dns.rcode.NOERROR
        assert answers(r) == [("ext.default.svc.cluster.local.", "CNAME", "www.example.org.")]
        assert srv.stats["servfail"] == 2
    finally:
        srv.close()


def test_server_forwarding_timeout_budget(tmp_path):
    # an upstream that swallows queries: SERVFAIL after about the 2 s budget
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    srv = start_server(tmp_path, sink.getsockname()[1])
    try:
        import threading
        slow = []
        th = threading.Thread(target=lambda: slow.append(udp(srv, "slow.example")))
        th.start()
        time.sleep(0.2)
        t0 = time.monotonic()       # the zone is answered while a forward waits
        assert rdatas(udp(srv, "web.default.svc.cluster.local")) == ["10.96.100.100"]
        assert time.monotonic() - t0 < 0.5
        t0 = time.monotonic()
        assert udp(srv, "google.com").rcode() == dns.rcode.SERVFAIL
        assert 1.5 < time.monotonic() - t0 < 3.5
        th.join()
        assert slow[0].rcode() == dns.rcode.SERVFAIL
    finally:
        srv.close()
        sink.close()


def test_server_truncates_udp_and_tcp_is_complete(tmp_path):
    srv = start_server(tmp_path, None)
    try:
        r = udp(srv, "many.default.svc.cluster.local")
        assert r.flags & dns.flags.TC
        assert sum(len(rr) for rr in r.answer) < 100
        assert len(r.to_wire()) <= 512
        r = udp_with_cookie(srv, "many.default.svc.cluster.local", payload=1232)
        assert r.flags & dns.flags.TC and 30 < sum(len(rr) for rr in r.answer) < 100
        r = tcp(srv, "many.default.svc.cluster.local")
        assert not r.flags & dns.flags.TC
        assert len(rdatas(r)) == 100
        r = tcp(srv, "_http._tcp.many.default.svc.cluster.local", "SRV")
        assert len(rdatas(r, "SRV")) == 100 and len(rdatas(r, "A", "additional")) == 100
        assert srv.stats["truncated"] == 3
    finally:
        srv.close()


def test_server_survives_malformed_input(tmp_path):
    srv = start_server(tmp_path, None)
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        junk = [b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07exa",      # cut in the question
                b"\xab\xcd\x01\x00" + b"\xff" * 40,                               # garbage after the header
                b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01"]  # pointer loop
        for w in junk:
            s.sendto(w, ("127.0.0.1", srv.port))
            r = dns.message.from_wire(s.recv(4096))
            assert r.id == struct.unpack("!H", w[:2])[0]
            assert r.rcode() in (dns.rcode.FORMERR, dns.rcode.NOTIMP)
        # too short for a header, or a response: no answer at all
        for w in (b"\x01\x02\x03", dns.message.make_response(dns.message.make_query("a.b", "A")).to_wire()):
            s.sendto(w, ("127.0.0.1", srv.port))
            with pytest.raises(socket.timeout):
                s.settimeout(0.3)
                s.recv(4096)
        # an UPDATE: NOTIMP
        q = dns.message.make_query("a.b", "A")
        q.set_opcode(dns.opcode.UPDATE)
        s.settimeout(2)
        s.sendto(q.to_wire(), ("127.0.0.1", srv.port))
        assert dns.message.from_wire(s.recv(4096)).rcode() == dns.rcode.NOTIMP
        # no question: FORMERR
        q = dns.message.Message()
        s.sendto(q.to_wire(), ("127.0.0.1", srv.port))
        assert dns.message.from_wire(s.recv(4096)).rcode() == dns.rcode.FORMERR
        # EDNS version 1: BADVERS
        q = dns.message.make_query("web.default.svc.cluster.local", "A", use_edns=1)
        s.sendto(q.to_wire(), ("127.0.0.1", srv.port))
        assert dns.message.from_wire(s.recv(4096)).rcode() == dns.rcode.BADVERS
        s.close()
        # garbage over TCP, then a good query on a new connection
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as c:
            c.sendall(struct.pack("!H", 20) + b"\x55\x55\x01\x00" + b"\x55" * 16)
            n = struct.unpack("!H", c.recv(2, socket.MSG_WAITALL))[0]
            assert dns.message.from_wire(c.recv(n, socket.MSG_WAITALL)).rcode() == dns.rcode.FORMERR
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as c:
            c.sendall(b"\x00")                  # half a length prefix, then hang up
        assert rdatas(udp(srv, "web.default.svc.cluster.local")) == ["10.96.100.100"]
        assert rdatas(tcp(srv, "web.default.svc.cluster.local")) == ["10.96.100.100"]
        assert srv.stats["formerr"] >= 4
    finally:
        srv.close()


def test_server_refuses_recursion_outside_allowed_sources(tmp_path, upstream):
    srv = start_server(tmp_path, upstream, allowed_sources=["10.0.0.0/8"])
    try:
        r = udp(srv, "google.com")
        assert r.rcode() == dns.rcode.REFUSED
        assert rdatas(udp(srv, "web.default.svc.cluster.local")) == ["10.96.100.100"]    # zone: still answered
        r = udp(srv, "ext.default.svc.cluster.local")
        assert answers(r) == [("ext.default.svc.cluster.local.", "CNAME", "www.example.org.")]
        assert srv.stats["refused"] == 1 and srv.stats["forwarded"] == 0
    finally:
        srv.close()
    srv = start_server(tmp_path, upstream, allowed_sources=["127.0.0.0/8"])
    try:
        assert rdatas(udp(srv, "google.com")) == ["192.168.50.80"]
    finally:
        srv.close()


# -- hardening: not an open resolver, rate limits, bounded answers, ANY -------------

class Clock:
    """A hand-driven clock for the rate limiter and the TCP validation."""

    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def query(name, rdtype="A", **kw):
    q = dns.message.make_query(name, rdtype, **kw)
    return q, q.to_wire()


def hardened(tmp_path, **kw):
    """A DNSServer (not started: handle() only) over CLUSTER plus a headless
    service of 100 endpoints, with a fake upstream that records calls."""
    cfg = load(tmp_path, CLUSTER + many_endpoints(100), name="h.yaml")
    srv = DNSServer(cfg.engine.dns, "127.0.0.1", port=0, **kw)
    srv.update(servicemap.build(cfg))
    srv.forwarded_to = []

    def forward(q, servers=None):
        srv.forwarded_to.append(q.question[0].name.to_text())
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "192.0.2.80"))
        return r
    srv.forward = forward
    return srv


def test_rate_limiter_token_bucket():
    clock = Clock()
    rl = RateLimiter(rate=10, burst=5, clock=clock)
    assert [rl.allow("a") for _ in range(7)] == [True] * 5 + [False] * 2
    assert rl.allow("b")                       # per key
    clock.t += 0.1                             # one token back
    assert rl.allow("a") and not rl.allow("a")
    clock.t += 100                             # refills up to the burst, no more
    assert sum(rl.allow("a") for _ in range(20)) == 5
    assert all(RateLimiter(rate=0, burst=1).allow("x") for _ in range(1000))     # 0: off


def test_rate_limiter_table_is_bounded():
    rl = RateLimiter(rate=1, burst=2, max_keys=100, clock=Clock())
    for i in range(10000):                     # a spoofed flood from 10,000 sources
        rl.allow(f"10.0.{i // 256}.{i % 256}")
    assert len(rl) == 100


def test_default_limits():
    assert (enginedns.RATE_LIMIT, enginedns.RATE_BURST) == (100.0, 200)
    srv = DNSServer(DNSConfig(), "127.0.0.1", port=0)
    # the engine's default: private ranges recurse, a public source does not
    assert srv.allowed("192.168.50.2") and srv.allowed("10.244.1.2") and not srv.allowed("203.0.113.9")
    assert (srv.limiter.rate, srv.limiter.burst) == (100.0, 200.0)
    srv = DNSServer(DNSConfig(allowed_sources=None), "127.0.0.1", port=0)
    assert srv.allowed("203.0.113.9")                   # None: everyone may recurse


def test_udp_over_the_rate_is_dropped_silently_and_counted(tmp_path):
    clock = Clock()
    srv = hardened(tmp_path, rate_limit=100, rate_burst=200, clock=clock, rrl_rate=0)
    _, w = query("web.default.svc.cluster.local")
    out = [srv.handle(w, "198.51.100.7") for _ in range(250)]
    assert all(o is not None for o in out[:200])
    assert out[200:] == [None] * 50
    assert srv.stats["ratelimited"] == 50 and srv.stats["queries"] == 250
    assert srv.handle(w, "198.51.100.8") is not None          # another source is not affected
    clock.t += 0.5                                             # 50 tokens back
    assert sum(srv.handle(w, "198.51.100.7") is not None for _ in range(60)) == 50


def test_tcp_over_the_rate_is_refused(tmp_path):
    srv = hardened(tmp_path, rate_limit=1, rate_burst=3, clock=Clock())
    q, w = query("web.default.svc.cluster.local")
    rs = [dns.message.from_wire(srv.handle(w, "198.51.100.7", tcp=True)) for _ in range(5)]
    assert [r.rcode() for r in rs] == [dns.rcode.NOERROR] * 3 + [dns.rcode.REFUSED] * 2
    assert all(q.is_response(r) for r in rs) and not rs[-1].answer
    assert srv.stats["ratelimited"] == 2


def test_rate_limit_over_sockets(tmp_path):
    """Through the real UDP and TCP loops: UDP excess gets no answer at all,
    TCP excess REFUSED, on the same connection."""
    clock = Clock()
    srv = start_server(tmp_path, None, rate_limit=1, rate_burst=5, clock=clock)
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        _, w = query("web.default.svc.cluster.local")
        got = 0
        for _ in range(8):
            s.sendto(w, ("127.0.0.1", srv.port))
            try:
                s.recv(4096)
                got += 1
            except socket.timeout:
                pass
        assert got == 5 and srv.stats["ratelimited"] == 3
        clock.t += 10                          # a full bucket again
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as c:
            codes = []
            for _ in range(7):
                c.sendall(struct.pack("!H", len(w)) + w)
                n = struct.unpack("!H", c.recv(2, socket.MSG_WAITALL))[0]
                codes.append(dns.message.from_wire(c.recv(n, socket.MSG_WAITALL)).rcode())
        assert codes == [dns.rcode.NOERROR] * 5 + [dns.rcode.REFUSED] * 2
    finally:
        srv.close()


def test_not_an_open_resolver(tmp_path):
    srv = hardened(tmp_path, allowed_sources=["10.0.0.0/8", "192.168.50.0/24"])
    # outside: zone answers yes, recursion no
    r = dns.message.from_wire(srv.handle(query("web.default.svc.cluster.local")[1], "203.0.113.5"))
    assert rdatas(r) == ["10.96.100.100"]
    r = dns.message.from_wire(srv.handle(query("www.example.com")[1], "203.0.113.5"))
    assert r.rcode() == dns.rcode.REFUSED and not r.flags & dns.flags.RA
    r = dns.message.from_wire(srv.handle(query("ext.default.svc.cluster.local")[1], "203.0.113.5"))
    assert answers(r) == [("ext.default.svc.cluster.local.", "CNAME", "www.example.org.")]   # no upstream half
    r = dns.message.from_wire(srv.handle(query("1.2.0.192.in-addr.arpa", "PTR")[1], "203.0.113.5"))
    assert r.rcode() == dns.rcode.REFUSED                      # foreign reverse names are recursion too
    assert srv.forwarded_to == [] and srv.stats["forwarded"] == 0
    # inside: forwarded
    r = dns.message.from_wire(srv.handle(query("www.example.com")[1], "10.244.1.2"))
    assert rdatas(r) == ["192.0.2.80"] and srv.forwarded_to == ["www.example.com."]
    r = dns.message.from_wire(srv.handle(query("www.example.com")[1], "192.168.50.2"))
    assert r.rcode() == dns.rcode.NOERROR
    assert not srv.allowed("not an address")


def test_allowed_sources_from_the_dns_config(tmp_path):
    cfg = load(tmp_path, CLUSTER)
    cfg.engine.dns.allowed_sources = ["10.0.0.0/8"]
    cfg.engine.dns.rate_limit = 7
    srv = DNSServer(cfg.engine.dns, "127.0.0.1", port=0)
    assert srv.allowed("10.1.2.3") and not srv.allowed("192.0.2.1")
    assert srv.limiter.rate == 7.0
    srv = DNSServer(cfg.engine.dns, "127.0.0.1", port=0, allowed_sources=["192.0.2.0/24"])
    assert srv.allowed("192.0.2.1") and not srv.allowed("10.1.2.3")         # the argument wins


def test_udp_limit():
    q = dns.message.make_query("a.example", "A")
    assert udp_limit(q) == 512 and udp_limit(q, validated=True) == 512      # no EDNS: 512
    q = dns.message.make_query("a.example", "A", use_edns=0, payload=4096)
    assert udp_limit(q) == 1232                               # not validated: our payload at most
    assert udp_limit(q, validated=True) == 4096
    q = dns.message.make_query("a.example", "A", use_edns=0, payload=65000)
    assert udp_limit(q, validated=True) == 4096               # never more than 4096
    q = dns.message.make_query("a.example", "A", use_edns=0, payload=100)
    assert udp_limit(q) == 512                                # less than 512 means 512


def test_answer_size_bounded_until_the_source_returns_a_valid_cookie(tmp_path):
    srv = hardened(tmp_path, clock=Clock(), rrl_rate=0, amplification_limit=0)
    big = "many.default.svc.cluster.local"                     # 100 A records, ~1.7 kB
    r = srv.handle(query(big)[1], "198.51.100.9")
    assert len(r) <= 512 and dns.message.from_wire(r).flags & dns.flags.TC
    r = srv.handle(query(big, use_edns=0, payload=4096)[1], "198.51.100.9")
    assert len(r) <= 1232 and dns.message.from_wire(r).flags & dns.flags.TC
    full = srv.handle(query(big)[1], "198.51.100.9", tcp=True)
    assert len(rdatas(dns.message.from_wire(full))) == 100
    # a client cookie alone proves nothing; the server cookie comes back with it
    first = dns.message.from_wire(srv.handle(query(big, use_edns=0, payload=4096, options=[
        dns.edns.GenericOption(10, CLIENT_COOKIE)])[1], "198.51.100.9"))
    cookie = cookie_of(first)
    assert first.flags & dns.flags.TC and cookie[:8] == CLIENT_COOKIE and len(cookie) == 24
    ask_with = query(big, use_edns=0, payload=4096, options=[dns.edns.GenericOption(10, cookie)])[1]
    r = srv.handle(ask_with, "198.51.100.9")
    m = dns.message.from_wire(r)
    assert 1232 < len(r) <= 4096 and not m.flags & dns.flags.TC and len(rdatas(m)) == 100
    assert cookie_of(m)[:8] == CLIENT_COOKIE and srv.stats["cookie_valid"] == 1
    # the same cookie from another address (a spoofer replaying it) is not valid there
    assert dns.message.from_wire(srv.handle(ask_with, "198.51.100.10")).flags & dns.flags.TC
    r = srv.handle(query("_http._tcp.many.default.svc.cluster.local", "SRV", use_edns=0, payload=65000,
                         options=[dns.edns.GenericOption(10, cookie)])[1], "198.51.100.9")
    assert len(r) <= 4096 and dns.message.from_wire(r).flags & dns.flags.TC
    srv.cookies.clock = lambda: time.time() + 3700              # the server cookie expires after an hour
    assert len(srv.handle(ask_with, "198.51.100.9")) <= 1232
    # a malformed cookie option: FORMERR (RFC 7873)
    bad = srv.handle(query(big, use_edns=0, options=[dns.edns.GenericOption(10, b"short")])[1], "198.51.100.9")
    assert dns.message.from_wire(bad).rcode() == dns.rcode.FORMERR


def test_cookie_over_sockets(tmp_path):
    srv = start_server(tmp_path, None)
    try:
        r = udp(srv, "many.default.svc.cluster.local", use_edns=0, payload=4096)
        assert r.flags & dns.flags.TC and len(r.to_wire()) <= 1232
        tcp(srv, "web.default.svc.cluster.local")              # TCP no longer proves anything for UDP
        r = udp(srv, "many.default.svc.cluster.local", use_edns=0, payload=4096)
        assert r.flags & dns.flags.TC
        r = udp_with_cookie(srv, "many.default.svc.cluster.local")
        assert not r.flags & dns.flags.TC and len(rdatas(r)) == 100
    finally:
        srv.close()


def test_any_outside_the_zone_is_synthesized_not_forwarded(tmp_path):
    srv = hardened(tmp_path)
    q, w = query("example.com", "ANY")
    r = dns.message.from_wire(srv.handle(w, "10.0.0.1"))
    assert q.is_response(r) and r.rcode() == dns.rcode.NOERROR
    assert answers(r) == [("example.com.", "HINFO", '"RFC8482" ""')]
    assert srv.forwarded_to == [] and srv.stats["any_minimal"] == 1
    r = dns.message.from_wire(srv.handle(w, "10.0.0.1", tcp=True))       # over TCP too
    assert [a[1] for a in answers(r)] == ["HINFO"]
    r = dns.message.from_wire(srv.handle(query("web.default.svc.cluster.local", "ANY")[1], "10.0.0.1"))
    assert answers(r) == [("web.default.svc.cluster.local.", "A", "10.96.100.100")]


def test_no_amplification(tmp_path):
    """From a source without a valid cookie, no UDP answer is larger than 3
    times its query (TC=1 instead): the worst the server can be made to
    reflect; with the bound off, still 512 bytes (1232 with EDNS)."""
    srv = hardened(tmp_path, rate_limit=0, rrl_rate=0)
    assert srv.amplification_limit == 3                        # the default
    names = [("many.default.svc.cluster.local", "A"), ("many.default.svc.cluster.local", "ANY"),
             ("_http._tcp.many.default.svc.cluster.local", "SRV"), ("cluster.local", "ANY"),
             ("many.default.svc.cluster.local", "SRV"), ("example.com", "ANY"), ("example.com", "TXT"),
             ("96.10.in-addr.arpa", "SOA"), ("x", "A")]
    for name, t in names:
        for kw in ({}, {"use_edns": 0, "payload": 65535},
                   {"use_edns": 0, "options": [dns.edns.GenericOption(10, CLIENT_COOKIE)]}):
            q, w = query(name, t, **kw)
            out = srv.handle(w, "203.0.113.77")
            assert out is not None and len(out) <= 3 * len(w), (name, t, kw, len(out), len(w))
    srv = hardened(tmp_path, rate_limit=0, rrl_rate=0, amplification_limit=0)
    names = [("many.default.svc.cluster.local", "A"), ("many.default.svc.cluster.local", "ANY"),
             ("_http._tcp.many.default.svc.cluster.local", "SRV"), ("cluster.local", "ANY"),
             ("many.default.svc.cluster.local", "SRV"), ("example.com", "ANY"), ("example.com", "TXT")]
    for name, t in names:
        for kw, cap in (({}, 512), ({"use_edns": 0, "payload": 65535}, 1232)):
            q, w = query(name, t, **kw)
            out = srv.handle(w, "203.0.113.77")
            assert out is not None and len(out) <= cap, (name, t, kw, len(out))


# -- floods: a global budget for new sources, RRL with slip, TCP caps and deadlines ----

def test_new_source_gate_keeps_known_sources():
    from engine.dnsguard import NewSourceGate
    clock = Clock()
    gate = NewSourceGate(50)
    rl = RateLimiter(rate=100, burst=100, max_keys=1000, clock=clock, gate=gate)
    assert rl.allow("192.168.50.2")                          # a known client, before the flood
    admitted = sum(rl.allow(f"198.18.{i // 256}.{i % 256}") for i in range(20000))   # spoofed, one each
    assert admitted == 49                                    # the budget (50), less the known one's token
    assert len(rl) <= 50 and gate.turned_away == 20000 - 49
    assert rl.allow("192.168.50.2")                          # the known client is not affected
    for i in range(10):                                      # a second, and another 20,000
        clock.t += 0.1
        for j in range(2000):
            rl.allow(f"198.19.{j // 256}.{(i * 2000 + j) % 256}")
        assert rl.allow("192.168.50.2")
    assert len(rl) <= 101                                    # the table grows at the budget's pace
    assert not rl.allow("192.168.50.3")                      # a newcomer during the flood may wait...
    assert rl.allow("192.168.50.3", verified=True)           # ...but TCP (a handshake) needs no budget
    assert rl.allow("192.168.50.3")                          # and then it is known


def test_rrl_per_network_and_answer_with_slip():
    from engine.dnsguard import ResponseRateLimiter
    clock = Clock()
    rrl = ResponseRateLimiter(10, slip=2, clock=clock)
    v = [rrl.check("198.51.100.7", ("web", 1, 0)) for _ in range(30)]
    assert v[:10] == ["ok"] * 10 and v[10:].count("slip") == 10 and v[10:].count("drop") == 10
    assert rrl.check("198.51.100.99", ("web", 1, 0)) == "slip" or True     # the same /24 shares the budget
    assert rrl.check("198.51.100.200", ("other", 1, 0)) == "ok"            # another answer has its own
    assert rrl.check("198.51.101.7", ("web", 1, 0)) == "ok"                # another /24 too
    clock.t += 1
    assert rrl.check("198.51.100.7", ("web", 1, 0)) == "ok"
    assert ResponseRateLimiter(0).check("1.2.3.4", "x") == "ok"            # 0: off


def test_rrl_in_the_server(tmp_path):
    clock = Clock()
    srv = hardened(tmp_path, rate_limit=0, rrl_rate=20, rrl_slip=2, clock=clock)
    q, w = query("web.default.svc.cluster.local")
    outs = [srv.handle(w, f"198.51.100.{i % 200 + 1}") for i in range(120)]     # one /24, one answer
    full = [o for o in outs if o is not None and not dns.message.from_wire(o).flags & dns.flags.TC]
    slipped = [o for o in outs if o is not None and dns.message.from_wire(o).flags & dns.flags.TC]
    assert len(full) == 20 and len(slipped) == 50 and outs.count(None) == 50
    assert all(len(o) <= len(w) for o in slipped) and not dns.message.from_wire(slipped[0]).answer
    assert srv.stats["rrl_dropped"] == 50 and srv.stats["rrl_slipped"] == 50
    # NXDOMAINs count per zone: random names do not get a budget each
    nx = [srv.handle(query(f"r{i}.default.svc.cluster.local")[1], "198.51.100.1") for i in range(60)]
    assert sum(o is not None and dns.message.from_wire(o).rcode() == dns.rcode.NXDOMAIN
               and not dns.message.from_wire(o).flags & dns.flags.TC for o in nx) == 20
    # TCP is never rate limited by RRL
    assert all(dns.message.from_wire(srv.handle(w, "198.51.100.1", tcp=True)).answer for _ in range(50))


def test_tcp_per_source_cap_and_total_deadline(tmp_path):
    cfg = load(tmp_path, CLUSTER, name="t.yaml")
    d = cfg.engine.dns
    d.upstream, d.tcp_per_source, d.tcp_connection_deadline, d.tcp_query_deadline = [], 3, 2, 1
    srv = DNSServer(d, "127.0.0.1", port=0)
    srv.update(servicemap.build(cfg))
    srv.start()
    held = []
    try:
        for _ in range(5):                            # five from one source: three are kept
            s = socket.create_connection(("127.0.0.1", srv.port))
            held.append(s)
        time.sleep(0.3)
        closed = 0
        for s in held:
            s.settimeout(0.5)
            try:
                closed += s.recv(1) == b""
            except socket.timeout:
                pass
            except OSError:
                closed += 1
        assert closed == 2 and srv.stats["tcp_refused"] == 2
        # another source is still served (127.0.0.2 is loopback too)
        r = dns.query.tcp(dns.message.make_query("web.default.svc.cluster.local", "A"), "127.0.0.1",
                          port=srv.port, timeout=3, source="127.0.0.2")
        assert rdatas(r) == ["10.96.100.100"]
        # a trickle (one byte of a query every 0.3 s) does not keep a connection: the query deadline
        s = held[0]
        t0 = time.monotonic()
        wire = struct.pack("!H", 40) + b"x" * 40
        gone = None
        for b in wire:
            try:
                s.send(bytes([b]))
            except OSError:
                gone = time.monotonic() - t0
                break
            time.sleep(0.3)
            s.settimeout(0.01)
            try:
                if s.recv(1) == b"":
                    gone = time.monotonic() - t0
                    break
            except socket.timeout:
                pass
        assert gone is not None and gone < 2.5, gone
        # a busy connection, query after query, still ends at the connection deadline
        s = socket.create_connection(("127.0.0.1", srv.port))
        q = dns.message.make_query("web.default.svc.cluster.local", "A").to_wire()
        t0 = time.monotonic()
        answered = 0
        try:
            while time.monotonic() - t0 < 5:
                s.sendall(struct.pack("!H", len(q)) + q)
                s.settimeout(1)
                if len(s.recv(2)) < 2:
                    break
                s.recv(65535)
                answered += 1
                time.sleep(0.05)
        except OSError:
            pass
        assert answered > 5 and 1.8 < time.monotonic() - t0 < 3.0
        assert srv.stats["tcp_deadline"] >= 2
    finally:
        for s in held:
            s.close()
        srv.close()


# -- the answer table's parser, fuzzed -------------------------------------------------

def test_answer_table_serves_what_the_zone_answered(tmp_path):
    srv = hardened(tmp_path, rate_limit=0, rrl_rate=0)
    q, w = query("WEB.default.svc.cluster.local")
    assert srv.fast_answer(w, "10.0.0.1") is None             # not asked yet: the dnspython way...
    slow = srv.handle(w, "10.0.0.1")
    fast = srv.fast_answer(w, "10.0.0.1")                      # ...which filled the table
    assert fast == slow and srv.stats["fast"] == 1
    r = dns.message.from_wire(fast)
    assert q.is_response(r) and r.question[0].name.to_text() == "WEB.default.svc.cluster.local."
    # EDNS without options: our OPT comes back; another source gets no RA
    q2, w2 = query("web.default.svc.cluster.local", use_edns=0, payload=1232)
    r2 = dns.message.from_wire(srv.fast_answer(w2, "203.0.113.5"))
    assert r2.edns == 0 and r2.payload == 1232 and rdatas(r2) == ["10.96.100.100"]
    assert not r2.flags & dns.flags.RA and r2.flags & dns.flags.AA
    # NODATA (the SOA) too, and TC/cookies/DO go the dnspython way
    srv.handle(query("web.default.svc.cluster.local", "AAAA")[1], "10.0.0.1")
    assert is_nodata(dns.message.from_wire(srv.fast_answer(query("web.default.svc.cluster.local", "AAAA")[1],
                                                           "10.0.0.1")))
    assert srv.fast_answer(query("web.default.svc.cluster.local", use_edns=0, want_dnssec=True)[1], "1.2.3.4") is None
    # a new zone starts with an empty table
    srv.update(servicemap.ServiceMap(services={}))
    assert srv.fast_answer(w, "10.0.0.1") is None


def test_fuzzed_queries_never_crash_or_exceed_the_limits(tmp_path):
    """Random and mutated queries through the table parser and the full
    handler: no exception, nothing larger than the limits (3x the query over
    UDP without a cookie, never over 4096 on UDP)."""
    import random
    from hypothesis import HealthCheck, given, settings, strategies as st
    srv = hardened(tmp_path, rate_limit=0, rrl_rate=0)
    seeds = [query(n, t, **kw)[1] for n, t, kw in (
        ("web.default.svc.cluster.local", "A", {}), ("many.default.svc.cluster.local", "A", {"use_edns": 0}),
        ("_http._tcp.many.default.svc.cluster.local", "SRV", {}), ("100.100.96.10.in-addr.arpa", "PTR", {}),
        ("example.com", "ANY", {"use_edns": 0, "payload": 4096}))]
    for w in seeds:                                            # fill the table
        srv.handle(w, "10.0.0.1")

    def check(w):
        out = srv.fast_answer(w, "10.0.0.1")
        if out:
            assert len(out) <= 3 * len(w) and len(out) <= 1232
        out = srv.handle(w, "10.0.0.1")
        if out is not None:
            assert len(out) <= max(3 * len(w), 12 + 11 + 28 + len(w)) and len(out) <= 4096
        srv.handle(w, "10.0.0.1", tcp=True)

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=300))
    def random_bytes(b):
        check(b)

    @settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(seeds), st.lists(st.tuples(st.integers(0, 299), st.integers(0, 255)), max_size=6),
           st.integers(0, 40))
    def mutated(w, flips, cut):
        b = bytearray(w)
        for i, v in flips:
            if i < len(b):
                b[i] = v
        check(bytes(b[:len(b) - cut] if cut < len(b) else b))

    random_bytes()
    mutated()
    rng = random.Random(5)
    for _ in range(3000):                                      # and plain random mutations, quickly
        b = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        check(bytes(b))


# -- the cache of upstream answers, stub domains ------------------------------------

class Upstream:
    """A programmable forward(): answers from `table` {name: (rdtype text, [rdata], ttl)}, NXDOMAIN
    with an SOA for the rest; `down` makes it fail; records every question with the servers asked."""

    def __init__(self, table=None, soa_ttl=300, soa_min=60):
        self.table = table or {}
        self.down = False
        self.calls = []
        self.soa = (soa_ttl, soa_min)

    def __call__(self, q, servers=None):
        name = q.question[0].name.to_text().lower()
        self.calls.append((name, tuple(servers or ())))
        if self.down:
            return None
        r = dns.message.make_response(q)
        if name in self.table:
            t, rds, ttl = self.table[name]
            r.answer.append(dns.rrset.from_text_list(q.question[0].name, ttl, "IN", t, rds))
        else:
            r.set_rcode(dns.rcode.NXDOMAIN)
            r.authority.append(dns.rrset.from_text("example.", self.soa[0], "IN", "SOA",
                                                   f"ns.example. h.example. 1 2 3 4 {self.soa[1]}"))
        return r


def cached_server(tmp_path, table, extra="", **kw):
    clock = Clock()
    cfg = load(tmp_path, CLUSTER.replace("upstream: [192.0.2.53]", "upstream: [192.0.2.53]" + extra), name="c2.yaml")
    srv = DNSServer(cfg.engine.dns, "127.0.0.1", port=0, rate_limit=0, rrl_rate=0, clock=clock, **kw)
    srv.update(servicemap.build(cfg))
    srv.forward = Upstream(table)
    return srv, clock


def ask_srv(srv, name, rdtype="A", src="10.0.0.1"):
    return dns.message.from_wire(srv.handle(query(name, rdtype)[1], src))


def test_cache_positive_hit_counts_ttl_down(tmp_path):
    srv, clock = cached_server(tmp_path, {"www.example.com.": ("A", ["192.0.2.80"], 120)})
    r = ask_srv(srv, "www.example.com")
    assert rdatas(r) == ["192.0.2.80"] and r.answer[0].ttl == 120
    clock.t += 50
    r = ask_srv(srv, "WWW.example.com")                          # case does not matter
    assert rdatas(r) == ["192.0.2.80"] and r.answer[0].ttl == 70
    assert r.question[0].name.to_text() == "WWW.example.com."    # the client's spelling
    assert len(srv.forward.calls) == 1 and srv.cache.stats["hits_success"] == 1
    clock.t += 71                                                # expired: asked again
    assert rdatas(ask_srv(srv, "www.example.com")) == ["192.0.2.80"] and len(srv.forward.calls) == 2


def test_cache_negative_per_rfc2308(tmp_path):
    srv, clock = cached_server(tmp_path, {})
    r = ask_srv(srv, "nothere.example.com")
    assert r.rcode() == dns.rcode.NXDOMAIN
    clock.t += 59                                               # min(SOA TTL 300, minimum 60)
    r = ask_srv(srv, "nothere.example.com")
    assert r.rcode() == dns.rcode.NXDOMAIN and r.authority[0].ttl == 300 - 59
    assert len(srv.forward.calls) == 1 and srv.cache.stats["hits_denial"] == 1
    clock.t += 2
    ask_srv(srv, "nothere.example.com")
    assert len(srv.forward.calls) == 2
    # NODATA (NOERROR, no answer, SOA) is negative too; no SOA: not kept
    assert srv.cache.ttl_of(dns.message.make_response(query("x.example")[0])) is None


def test_cache_ttl_caps(tmp_path):
    srv, clock = cached_server(tmp_path, {"long.example.": ("A", ["192.0.2.1"], 86400),
                                          "short.example.": ("A", ["192.0.2.2"], 1)},
                               extra=", cache: {maxTTL: 600, minTTL: 10, negativeMaxTTL: 30}")
    ask_srv(srv, "long.example")
    clock.t += 599
    ask_srv(srv, "long.example")
    assert len(srv.forward.calls) == 1
    clock.t += 2
    ask_srv(srv, "long.example")
    assert len(srv.forward.calls) == 2                          # 600 s at most
    ask_srv(srv, "short.example")
    clock.t += 9
    ask_srv(srv, "short.example")
    assert len(srv.forward.calls) == 3                          # 10 s at least
    srv.forward.soa = (3600, 3600)
    ask_srv(srv, "nx.example")
    clock.t += 31
    ask_srv(srv, "nx.example")
    assert len(srv.forward.calls) == 5                          # negative: 30 s at most


def test_cache_serve_stale_while_upstream_is_down(tmp_path):
    srv, clock = cached_server(tmp_path, {"www.example.com.": ("A", ["192.0.2.80"], 60)},
                               extra=", cache: {serveStale: 120s}")
    ask_srv(srv, "www.example.com")
    srv.forward.down = True
    clock.t += 100                                              # expired 40 s ago, upstream down
    r = ask_srv(srv, "www.example.com")
    assert rdatas(r) == ["192.0.2.80"] and r.answer[0].ttl == 30   # RFC 8767's stale TTL
    assert srv.stats["served_stale"] == 1 and len(srv.forward.calls) == 2   # the upstream was tried first
    assert ask_srv(srv, "other.example.com").rcode() == dns.rcode.SERVFAIL  # never cached: nothing to serve
    clock.t += 81                                               # past the bound (60 + 120 s)
    assert ask_srv(srv, "www.example.com").rcode() == dns.rcode.SERVFAIL
    srv.forward.down = False                                    # back: a fresh answer again
    assert ask_srv(srv, "www.example.com").answer[0].ttl == 60


def test_cache_prefetch_of_popular_names(tmp_path):
    srv, clock = cached_server(tmp_path, {"hot.example.": ("A", ["192.0.2.7"], 100),
                                          "cold.example.": ("A", ["192.0.2.8"], 100)},
                               extra=", cache: {prefetch: 3}")
    ask_srv(srv, "hot.example")
    ask_srv(srv, "cold.example")
    for _ in range(3):                                          # popular: 3 hits without a minute's gap
        clock.t += 20
        ask_srv(srv, "hot.example")
    clock.t += 31                                               # 91 s of 100: under 10% left
    ask_srv(srv, "hot.example")
    ask_srv(srv, "cold.example")                                # asked once: not popular, no prefetch
    assert [c[0] for c in srv.forward.calls] == ["hot.example.", "cold.example.", "hot.example."]
    assert srv.cache.stats["prefetch"] == 1
    clock.t += 50                                               # past the old expiry: still cached
    r = ask_srv(srv, "hot.example")
    assert r.answer[0].ttl == 50 and len(srv.forward.calls) == 3


def test_cache_bounded_and_off(tmp_path):
    table = {f"n{i}.example.": ("A", ["192.0.2.1"], 300) for i in range(50)}
    srv, _ = cached_server(tmp_path, table, extra=", cache: {maxEntries: 10}")
    for i in range(50):
        ask_srv(srv, f"n{i}.example")
    assert len(srv.cache) == 10 and srv.cache.stats["evictions"] == 40
    srv, _ = cached_server(tmp_path, table, extra=", cache: {maxEntries: 0}")
    ask_srv(srv, "n1.example")
    ask_srv(srv, "n1.example")
    assert len(srv.forward.calls) == 2 and len(srv.cache) == 0


def test_stub_domains(tmp_path):
    table = {"db.corp.example.": ("A", ["10.0.0.9"], 60), "x.lab.corp.example.": ("A", ["10.0.0.10"], 60),
             "www.example.com.": ("A", ["192.0.2.80"], 60)}
    srv, _ = cached_server(tmp_path, table, extra=", stubDomains: {corp.example: [10.0.0.53, '10.0.0.54:5353'], "
                                                   "lab.corp.example: [10.0.1.53]}")
    assert srv.cfg.stub_domains["corp.example"] == [("10.0.0.53", 53), ("10.0.0.54", 5353)]
    assert rdatas(ask_srv(srv, "db.corp.example")) == ["10.0.0.9"]
    assert rdatas(ask_srv(srv, "X.Lab.corp.example")) == ["10.0.0.10"]
    assert rdatas(ask_srv(srv, "www.example.com")) == ["192.0.2.80"]
    ask_srv(srv, "notcorp.example")
    assert [c[1] for c in srv.forward.calls] == [(("10.0.0.53", 53), ("10.0.0.54", 5353)), (("10.0.1.53", 53),),
                                                 (("192.0.2.53", 53),), (("192.0.2.53", 53),)]
    # a stub domain is recursion too: not for sources outside allowedSources
    assert ask_srv(srv, "db.corp.example", src="203.0.113.9").rcode() == dns.rcode.REFUSED
    for bad in ("{corp.example: []}", "{'bad domain!': [10.0.0.1]}", "{corp.example: [nope]}"):
        with pytest.raises(config.ConfigError, match="dns.stubDomains"):
            cached_server(tmp_path, table, extra=f", stubDomains: {bad}")


# -- metrics under CoreDNS's names ---------------------------------------------------

def test_coredns_metrics(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families
    from engine.dnsmetrics import metrics_text
    srv, clock = cached_server(tmp_path, {"www.example.com.": ("A", ["192.0.2.80"], 120)})
    for _ in range(3):
        srv.handle(query("web.default.svc.cluster.local")[1], "10.0.0.1")     # 1 the dnspython way...
    srv.fast_answer(query("web.default.svc.cluster.local")[1], "10.0.0.1")   # ...then the table
    srv.handle(query("nope.default.svc.cluster.local", "AAAA")[1], "10.0.0.1", tcp=True)
    srv.handle(query("www.example.com")[1], "10.0.0.1")                       # a cache miss
    srv.handle(query("www.example.com")[1], "10.0.0.1")                       # a hit
    srv.handle(query("nx.example.com")[1], "10.0.0.1")                        # a miss, then kept negative
    srv.handle(query("nx.example.com")[1], "10.0.0.1")                        # a denial hit
    fams = {f.name: f for f in text_string_to_metric_families(metrics_text(srv))}

    def value(fam, sample_name, **labels):
        return sum(s.value for s in fams[fam].samples if s.name == sample_name
                   and all(s.labels.get(k) == v for k, v in labels.items()))
    assert value("coredns_dns_requests", "coredns_dns_requests_total", proto="udp", type="A") == 8
    assert value("coredns_dns_requests", "coredns_dns_requests_total", proto="tcp", type="AAAA") == 1
    assert value("coredns_dns_responses", "coredns_dns_responses_total", rcode="NOERROR") == 6
    assert value("coredns_dns_responses", "coredns_dns_responses_total", rcode="NXDOMAIN") == 3
    assert value("coredns_dns_request_duration_seconds", "coredns_dns_request_duration_seconds_count", type="A") == 8
    assert value("coredns_dns_request_duration_seconds", "coredns_dns_request_duration_seconds_bucket",
                 type="A", le="+Inf") == 8
    assert value("coredns_cache_hits", "coredns_cache_hits_total", type="success") == 1
    assert value("coredns_cache_hits", "coredns_cache_hits_total", type="denial") == 1
    assert value("coredns_cache_misses", "coredns_cache_misses_total") == 2
    assert value("coredns_cache_entries", "coredns_cache_entries", type="success") == 1
    assert value("coredns_cache_entries", "coredns_cache_entries", type="denial") == 1
    assert all(s.labels["server"] == "dns://:53" for s in fams["coredns_dns_requests"].samples)


def test_cached_upstream_answers_from_the_answer_table(tmp_path):
    srv, clock = cached_server(tmp_path, {"www.example.com.": ("A", ["192.0.2.80", "192.0.2.81"], 100)},
                               extra=", cache: {prefetch: 2}")
    q, w = query("WWW.Example.com")
    assert srv.fast_answer(w, "10.0.0.1") is None                 # not cached yet
    srv.handle(w, "10.0.0.1")
    clock.t += 30
    r = dns.message.from_wire(srv.fast_answer(w, "10.0.0.1"))
    assert q.is_response(r) and rdatas(r) == ["192.0.2.80", "192.0.2.81"] and r.answer[0].ttl == 70
    assert r.question[0].name.to_text() == "WWW.Example.com." and not r.flags & dns.flags.AA
    assert r.flags & dns.flags.RA and srv.cache.stats["hits_success"] == 1
    assert srv.fast_answer(w, "203.0.113.9") is None              # may not recurse: REFUSED the slow way
    nx = query("nothere.example.com")[1]                          # negative answers too
    srv.handle(nx, "10.0.0.1")
    assert dns.message.from_wire(srv.fast_answer(nx, "10.0.0.1")).rcode() == dns.rcode.NXDOMAIN
    clock.t += 31
    assert srv.fast_answer(w, "10.0.0.1") is not None             # hit 2: popular now
    clock.t += 31                                                 # 92 of 100 s: the last 10% go the slow way...
    assert srv.fast_answer(w, "10.0.0.1") is None
    srv.handle(w, "10.0.0.1")                                     # ...where the popular name is prefetched
    assert srv.cache.stats["prefetch"] == 1 and len(srv.forward.calls) == 3
    assert dns.message.from_wire(srv.fast_answer(w, "10.0.0.1")).answer[0].ttl == 100
    # a new zone (it might answer the name now) empties the table; the slow way fills it again
    srv.update(servicemap.ServiceMap(services={}))
    assert srv.fast_answer(w, "10.0.0.1") is None
    srv.handle(w, "10.0.0.1")
    assert srv.fast_answer(w, "10.0.0.1") is not None


def test_batch_io_recvmmsg_sendmmsg():
    """engine._dnsio: datagrams in and out in batches, with their addresses."""
    from engine._dnsio import BatchIO
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        io = BatchIO(srv.fileno(), 2, 512)
        for i, c in enumerate(clients):
            c.bind(("127.0.0.1", 0))
            c.sendto(b"q%d" % i + b"x" * (600 if i == 2 else 0), srv.getsockname())
        time.sleep(0.1)
        got = io.recv() + io.recv()                             # a batch of 2, then the rest
        assert [g[0][:2] for g in got] == [b"q0", b"q1", b"q2"]
        assert len(got[2][0]) == 512                            # cut to the buffer
        assert [g[1] for g in got] == [c.getsockname() for c in clients]
        sent = io.send([(b"a%d" % i, c.getsockname()) for i, c in enumerate(clients)]
                       + [(b"bad", ("not-an-ip", 53))])
        assert sent == 3
        for i, c in enumerate(clients):
            c.settimeout(2)
            assert c.recvfrom(100) == (b"a%d" % i, srv.getsockname())
        with pytest.raises(ValueError):
            BatchIO(srv.fileno(), 0, 512)
    finally:
        srv.close()
        for c in clients:
            c.close()
