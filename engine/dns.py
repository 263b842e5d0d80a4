"""Cluster DNS: the Kubernetes DNS specification, answered from the service map.

ClusterZone is pure: built from a ServiceMap and a DNSConfig, it answers one
parsed query (no sockets), or returns None for "forward this upstream".
DNSServer owns the sockets (UDP + TCP), the upstream forwarding and the
counters; update(smap) swaps a freshly built ClusterZone in with one attribute
assignment, so queries in flight keep the zone they started with.

Names (as CoreDNS's kubernetes plugin):
  svc.ns.svc.<domain>                      A: cluster IP; headless: one A per ready endpoint
  <hostname|a-b-c-d>.svc.ns.svc.<domain>   A: that ready endpoint (every service)
  _port._proto.svc.ns.svc.<domain>         SRV per named port (+ A in additional)
  svc.ns.svc.<domain> (ExternalName)       CNAME externalName, then the target's records
  a-b-c-d.ns.pod.<domain>                  A a.b.c.d (dns.pods: insecure | verified | disabled)
  d.c.b.a.in-addr.arpa                     PTR for cluster IPs and ready endpoints
  dns-version.<domain>                     TXT "1.1.0"
Unknown names under the domain: NXDOMAIN; existing names without the type
(a known namespace too): NODATA (NOERROR + SOA). The reverse zones of
serviceCIDR and dns.podCIDR are ours as well: NXDOMAIN + that zone's SOA for
an address without a PTR. Everything else is forwarded.

Hardening (the server binds a node address and sees clients' real sources):
  - not an open resolver: only sources in `allowed_sources` get recursion
    (forwarding, the upstream half of ExternalName answers); names in the
    cluster zone are answered for everyone;
  - per-source rate limit, a token bucket (100 queries/s, burst 200 by
    default): excess UDP is dropped silently, excess TCP answered REFUSED,
    both counted ("ratelimited"); beside it a global budget for sources
    never seen before (a spoofed flood), see engine/dnsguard.py;
  - response-rate limiting per (client /24, answer) with slip, as BIND's RRL;
  - bounded answers, no amplification: UDP gets 512 bytes, or the client's
    EDNS payload size but at most 1232 (our own advertised size), and at
    most 3x the query, until the source returns a valid DNS cookie (RFC
    7873); never more than 4096; more is truncated (TC) and the client
    comes back over TCP;
  - TCP: connections capped per source and in total, with total deadlines
    per connection and per query;
  - ANY is answered minimally (RFC 8482): one RRset of the name inside the
    zone, a synthesized HINFO "RFC8482" outside it (never forwarded).

Speed: the answer table (plain_query, fast_answer) serves what the zone
answered once, and fresh cached upstream answers (engine/dnscache.py), from
wire bytes; engine._dnsio moves datagrams in batches.
"""
from __future__ import annotations

import collections
import concurrent.futures
import errno
import ipaddress
import logging
import re
import socket
import struct
import threading
import time

import dns.edns
import dns.entropy
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.HINFO
import dns.rdtypes.ANY.NS
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.SOA
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdtypes.IN.SRV

from .dnscache import PREFETCH_GAP, DNSCache
from .dnsmetrics import DNSCollector, DNSMetrics, qtype_of
from .dnsguard import (COOKIE_OPTION, RATE_BURST, RATE_LIMIT, ConnectionCounter, Cookies, NewSourceGate,
                       RateLimiter, ResponseRateLimiter)
from .servicemap import DNS_SERVICE_KEY, ServiceMap, dns_service_info, usable as usable_endpoints

log = logging.getLogger("engine.dns")

IN = dns.rdataclass.IN
A, AAAA, CNAME, PTR, SRV, SOA, NS, TXT, ANY, HINFO = (
    dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.CNAME, dns.rdatatype.PTR,
    dns.rdatatype.SRV, dns.rdatatype.SOA, dns.rdatatype.NS, dns.rdatatype.TXT,
    dns.rdatatype.ANY, dns.rdatatype.HINFO)
NO_QUESTION_TYPES = {dns.rdatatype.OPT, dns.rdatatype.TSIG, dns.rdatatype.TKEY}
TRANSFER_TYPES = {dns.rdatatype.AXFR, dns.rdatatype.IXFR}

MAX_CHAIN = 8                 # CNAME links followed for ExternalName chains
DNS_VERSION = "1.1.0"         # kubernetes/dns specification version
OUR_PAYLOAD = 1232            # EDNS payload we advertise (DNS flag day 2020)
UDP_MIN = 512                 # RFC 1035 UDP limit without EDNS
UDP_MAX_UNVALIDATED = OUR_PAYLOAD   # EDNS payload honoured for sources without a valid DNS cookie
UDP_MAX = 4096                # no UDP response is ever larger
ANY_TTL = 3600                # TTL of the synthesized RFC 8482 HINFO
# ANY inside the zone: the one RRset answered, by preference (RFC 8482 4.1)
ANY_PREFERENCE = (A, AAAA, CNAME, PTR, SRV, TXT, SOA, NS)
FORWARD_BUDGET = 2.0          # seconds for all upstream attempts of one query
TCP_IDLE = 10.0               # seconds a TCP client may stay silent between queries
UDP_RECV = 4096               # the largest query read over UDP (a longer one is cut: FORMERR)
UDP_BATCH = 32                # datagrams per recvmmsg()/sendmmsg()
UDP_RCVBUF = 4 << 20          # receive buffer: a burst waits in the kernel, not dropped there
UDP_WORKERS = 32              # threads answering UDP queries
UDP_MAX_PENDING = 2048        # queued UDP queries beyond this are dropped
HOSTNAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _dashed(ip):
    """An endpoint's name from its address, as CoreDNS: 10-244-1-2, fd00--1."""
    return ip.replace(".", "-").replace(":", "-")


def _addr_type(ip):
    return AAAA if ":" in ip else A


def _undashed(label):
    """'10-244-1-2' -> '10.244.1.2', or None."""
    parts = label.split("-")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 and int(p) <= 255 for p in parts):
        return None
    return ".".join(str(int(p)) for p in parts)


def _reverse_key(ip):
    return ipaddress.ip_address(ip).reverse_pointer + "."


def reverse_zones(cidr):
    """The reverse zones (absolute text) covering exactly `cidr`: its prefix
    rounded up to a whole label (8 bits for IPv4, a nibble for IPv6), e.g.
    10.96.0.0/12 -> 96.10.in-addr.arpa. ... 111.10.in-addr.arpa. (16 zones)."""
    net = ipaddress.ip_network(cidr, strict=False)
    step = 8 if net.version == 4 else 4
    plen = -(-net.prefixlen // step) * step
    out = []
    for sub in (net.subnets(new_prefix=plen) if plen > net.prefixlen else [net]):
        labels = sub.network_address.reverse_pointer.split(".")   # address labels, then in-addr.arpa / ip6.arpa
        keep = plen // step
        nlab = len(labels) - 2
        out.append(".".join(labels[nlab - keep:]) + ".")
    return out


def udp_limit(query, validated=False, unvalidated_max=UDP_MAX_UNVALIDATED, udp_max=UDP_MAX):
    """Largest UDP response for this query: 512, or the client's EDNS payload
    size, but at most unvalidated_max for a source that has not shown (with
    a valid DNS cookie) that its address is its own, never more than udp_max."""
    if query is not None and query.edns >= 0:
        cap = udp_max if validated else min(unvalidated_max, udp_max)
        return max(UDP_MIN, min(query.payload, cap))
    return UDP_MIN


def _wire_within(msg, limit):
    """msg's wire form if it takes at most `limit` bytes, else None.
    (dnspython's own max_size never goes below 512.)"""
    try:
        w = msg.to_wire(max_size=max(512, limit))
    except dns.exception.TooBig:
        return None
    return w if len(w) <= limit else None


def to_wire_limited(resp, limit):
    """Render resp in at most `limit` bytes: (wire, truncated). When it does
    not fit, keep as many answer records as fit, drop the other sections
    (EDNS stays) and set TC, as CoreDNS does. limit 0: no records at all
    (RRL's slip)."""
    if limit > 0:
        w = _wire_within(resp, limit)
        if w is not None:
            return w, False
    recs = [(rr.name, rr.rdclass, rr.rdtype, rr.ttl, rd) for rr in resp.answer for rd in rr]

    def build(k):
        t = dns.message.Message(id=resp.id)
        t.flags = resp.flags | dns.flags.TC
        t.question = list(resp.question)
        if resp.edns >= 0:
            t.use_edns(resp.edns, resp.ednsflags, resp.payload, options=resp.options)
        t.set_rcode(resp.rcode())
        for name, rdclass, rdtype, ttl, rd in recs[:k]:
            rrset = t.find_rrset(t.answer, name, rdclass, rdtype, create=True)
            rrset.add(rd, ttl)
        return t

    if limit <= 0:
        return build(0).to_wire(), True
    # a record takes at least 11 bytes
    lo, hi = 0, min(len(recs), limit // 11)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _wire_within(build(mid), limit) is not None:
            lo = mid
        else:
            hi = mid - 1
    w = _wire_within(build(lo), limit)
    if w is None:                     # a question too long for the limit: header (and EDNS) only
        t = build(0)
        t.question = []
        w = t.to_wire()
    return w, True


# The answer table: what the zone answered once is answered again from
# bytes. A plain query (one question, class IN, no EDNS or an EDNS 0 OPT
# without options or DO) is parsed by hand, its lowercased name and type looked
# up in the zone's table of wire answers, and the answer spliced from the
# query's own header and question (the client's spelling) and the stored
# sections. Anything else goes the dnspython way, which fills the table.
OPT_OURS = b"\x00\x00\x29" + struct.pack("!H", OUR_PAYLOAD) + b"\x00" * 6   # our OPT RR, no options
ANSWER_TABLE_MAX = 200000     # entries per zone (the names that exist bound it anyway)
QR_AA = 0x8400


def plain_query(wire):
    """(qname wire, lowercased, qtype, end of question, EDNS payload or 0)
    of a plain query, or None for anything else (bounds-checked)."""
    n = len(wire)
    if n < 17 or n > 512 or wire[2] & 0xF8 or wire[4:10] != b"\x00\x01\x00\x00\x00\x00":
        return None                       # a response, another opcode, counts other than 1/0/0
    i = 12
    while True:
        if i >= n:
            return None
        ln = wire[i]
        if ln == 0:
            break
        if ln > 63:                       # compression or extended labels: not in a plain question
            return None
        i += ln + 1
    qend = i + 5
    if qend > n or wire[i + 3:i + 5] != b"\x00\x01":
        return None
    qtype = (wire[i + 1] << 8) | wire[i + 2]
    arcount = (wire[10] << 8) | wire[11]
    payload = 0
    if arcount == 0:
        if qend != n:
            return None
    elif arcount == 1:
        # root owner, type OPT, payload, ext-rcode 0, version 0, no DO, no options
        if n - qend != 11 or wire[qend:qend + 3] != b"\x00\x00\x29" or wire[qend + 5:n] != b"\x00" * 6:
            return None
        payload = max(UDP_MIN, (wire[qend + 3] << 8) | wire[qend + 4])
    else:
        return None
    return wire[12:i + 1], wire[12:i + 1].lower(), qtype, qend, payload


def error_from_header(wire, rcode):
    """A bare response (no sections) built from the first 12 bytes of a query
    that dnspython could not parse; None when even the header is missing or
    the packet is itself a response."""
    if len(wire) < 12:
        return None
    qid, flags = struct.unpack("!HH", wire[:4])
    if flags & dns.flags.QR:
        return None
    flags = dns.flags.QR | (flags & (0x7800 | dns.flags.RD)) | (rcode & 0xF)   # keep opcode and RD
    return struct.pack("!HHHHHH", qid, flags, 0, 0, 0, 0)


def _response(query, rcode=dns.rcode.NOERROR, aa=False, ra=True):
    r = dns.message.make_response(query, recursion_available=ra, our_payload=OUR_PAYLOAD)
    if aa:
        r.flags |= dns.flags.AA
    r.set_rcode(rcode)
    return r


class ClusterZone:
    """The cluster domain (and the reverse names of cluster IPs) built from a
    ServiceMap, as dicts keyed by lowercase absolute name (bytes,
    b"web.default.svc.cluster.local."). Values are kept raw (an IP, an SRV
    tuple, a target key) and become dnspython rdata when first answered, so
    building 10,000 services stays cheap.

    resolver(name, rdtype) -> [RRset] | None looks a name up outside the zone
    (the server's upstream); it is used to complete ExternalName answers.
    pods=True answers a-b-c-d.<ns>.pod.<domain> (CoreDNS `pods insecure`).
    """

    def __init__(self, smap, cfg, resolver=None, pods=None, serial=None):
        self.cfg = cfg
        self.ttl = int(cfg.ttl)
        domain = cfg.domain.strip(".").lower() or "cluster.local"
        self.origin = dns.name.from_text(domain)
        self.okey = (domain + ".").encode()      # origin key
        self._osuffix = b"." + self.okey
        self.resolver = resolver
        self.pods = pods or getattr(cfg, "pods", None) or "insecure"     # insecure | verified | disabled
        self.serial = int(time.time() if serial is None else serial) & 0xFFFFFFFF
        self.records = {}      # key -> {rdtype: [raw value]}, names inside the zone
        self.cnames = {}       # key -> target key (absolute, lowercase), ExternalName services
        self.names = set()     # keys of every name that exists (with records or empty non-terminals)
        self.ptr = {}          # reverse key -> [target key], cluster IPs and endpoints
        self._cache = {}       # (key, rdtype) -> [rdata], filled on first use
        # (lowercased qname wire, qtype) -> (flags, ancount, nscount, arcount, sections after
        # the question): the answer table (see plain_query), filled as names are asked
        self.wire_answers = {}
        # reverse zones we are authoritative for (serviceCIDR, dns.podCIDR):
        # apex key -> its SOA rdata; names under them without a PTR are NXDOMAIN
        self.rzones = {}
        for cidr in [c for c in (getattr(cfg, "service_cidr", None) or "").split(",") if c] + \
                list(getattr(cfg, "pod_cidr", None) or []):
            for apex in reverse_zones(cidr):
                self.rzones[apex.encode()] = self._make_soa(apex)
        # namespaces that exist: from every object seen (CoreDNS asks for the
        # Namespace; one with objects surely exists), plus the two every cluster has
        self.namespaces = {"default", "kube-system"}
        self.namespaces.update(info.svc.namespace for info in smap.services.values())
        self.namespaces.update(ns for ns, _ in (smap.pods or {}))
        self.namespaces.update(ns for ns, _ in (getattr(smap, "slices", None) or {}))
        self.pod_ips = {(p.namespace, p.ip) for p in (smap.pods or {}).values() if p.ip}   # pods verified
        d = domain + "."
        self.soa_rdata = self._make_soa(d)
        self._add(d, SOA, self.soa_rdata)
        self._add(d, NS, "ns.dns." + d)
        if cfg.cluster_ip:
            self._add("ns.dns." + d, A, cfg.cluster_ip)
        self._add("dns-version." + d, TXT, DNS_VERSION)
        self._exist("svc." + d)
        for ns in self.namespaces:               # an existing namespace is NODATA, not NXDOMAIN
            self._exist(f"{ns}.svc.{d}".lower())
            if self.pods != "disabled":
                self._exist(f"{ns}.pod.{d}".lower())
        for info in smap.services.values():
            self._add_service(info)
        if DNS_SERVICE_KEY not in smap.services and cfg.cluster_ip:
            self._add_service(dns_service_info(cfg))     # kube-dns.kube-system, as in any cluster

    # -- building ----------------------------------------------------------

    def _make_soa(self, zone):
        """SOA of zone (absolute text), as CoreDNS: ns.dns.<zone>, hostmaster.<zone>,
        minimum = TTL = the records' TTL."""
        return dns.rdtypes.ANY.SOA.SOA(
            IN, SOA, dns.name.from_text("ns.dns." + zone), dns.name.from_text("hostmaster." + zone),
            self.serial, 7200, 1800, 86400, self.ttl)

    def _exist(self, name):
        """Mark name (str, absolute) and its ancestors down to the origin."""
        key = name.encode()
        while key not in self.names:
            self.names.add(key)
            if key == self.okey:
                return
            i = key.find(b".")
            if i < 0 or not key.endswith(self._osuffix):
                return
            key = key[i + 1:]

    def _add(self, name, rdtype, value):
        self.records.setdefault(name.encode(), {}).setdefault(rdtype, []).append(value)
        self._exist(name)

    def _add_ptr(self, ip, target):
        t = self.ptr.setdefault(_reverse_key(ip).encode(), [])
        if target not in t:
            t.append(target)

    def _add_service(self, info):
        s = info.svc
        d = self.okey.decode()
        ns = f"{s.namespace}.svc.{d}".lower()
        self._exist(ns)              # the namespace exists once it holds a service
        name = f"{s.name}.{ns}".lower()
        if s.type == "ExternalName":
            if s.external_name:
                self.cnames[name.encode()] = s.external_name.rstrip(".").lower() + "."
                self._exist(name)
            return
        if not info.cluster_ip:
            return
        # every service's ready endpoints get a name, <hostname or a-b-c-d>.<svc>,
        # and a PTR to it (CoreDNS's endpointHostname)
        groups = [(pi.port, pi.usable) for pi in info.ports] or [(None, usable_endpoints(info.addresses))]
        ep_names = {}                 # ip -> its name under the service
        for _, eps in groups:
            for e in eps:
                if e.ip in ep_names:
                    continue
                label = e.hostname.lower() if e.hostname and HOSTNAME.match(e.hostname.lower()) else _dashed(e.ip)
                ep_names[e.ip] = target = f"{label}.{name}"
                self._add(target, _addr_type(e.ip), e.ip)
                self._add_ptr(e.ip, target)
        if info.cluster_ip != "None":
            self._add(name, A, info.cluster_ip)
            self._add_ptr(info.cluster_ip, name)
            for pi in info.ports:
                if pi.port.name:
                    self._add(f"_{pi.port.name}._{pi.port.protocol}.{name}".lower(), SRV, (0, 100, pi.port.port, name))
            w = max(1, 100 // max(1, len(info.ports)))
            for pi in info.ports:        # SRV at the service name: every port (CoreDNS)
                self._add(name, SRV, (0, w, pi.port.port, name))
            return
        # headless: the service name answers every ready endpoint. No ready
        # endpoint: nothing is added under the name, so it does not exist (the
        # spec's NXDOMAIN).
        for ip in ep_names:
            self._add(name, _addr_type(ip), ip)
        all_srv = []
        for port, eps in groups:
            port_srv = []
            for e in eps:
                if port is not None and (ep_names[e.ip], e.port) not in port_srv:
                    port_srv.append((ep_names[e.ip], e.port))
            if port is not None and port.name and port_srv:
                pname = f"_{port.name}._{port.protocol}.{name}".lower()
                w = max(1, 100 // len(port_srv))
                for target, p in port_srv:
                    self._add(pname, SRV, (0, w, p, target))
            all_srv += [t for t in port_srv if t not in all_srv]
        w = max(1, 100 // max(1, len(all_srv)))
        for target, p in all_srv:
            self._add(name, SRV, (0, w, p, target))

    # -- answering -----------------------------------------------------------

    @staticmethod
    def key(name):
        """dns.name.Name -> lookup key (ASCII-lowercase bytes), None for names
        with a dot inside a label (never ours)."""
        labels = name.labels
        for lb in labels:
            if b"." in lb:
                return None
        return b".".join(labels).lower()

    def _in_zone(self, key):
        return key == self.okey or key.endswith(self._osuffix)

    def is_ours(self, name):
        k = self.key(name)
        return k is not None and (self._in_zone(k) or k in self.ptr or self._reverse_apex(k) is not None)

    def is_local(self, msg):
        """True when answer(msg) needs neither forwarding nor the resolver
        (the server answers those inline, the rest on worker threads)."""
        if len(msg.question) != 1:
            return True
        k = self.key(msg.question[0].name)
        return k is not None and k not in self.cnames and (
            self._in_zone(k) or k in self.ptr or self._reverse_apex(k) is not None)

    @staticmethod
    def _name(key):
        return dns.name.from_text(key.decode("ascii") if isinstance(key, bytes) else key)

    def _rdata(self, rdtype, v):
        if rdtype == A:
            return dns.rdtypes.IN.A.A(IN, A, v)
        if rdtype == AAAA:
            return dns.rdtypes.IN.AAAA.AAAA(IN, AAAA, v)
        if rdtype == SRV:
            return dns.rdtypes.IN.SRV.SRV(IN, SRV, v[0], v[1], v[2], self._name(v[3]))
        if rdtype == NS:
            return dns.rdtypes.ANY.NS.NS(IN, NS, self._name(v))
        if rdtype == PTR:
            return dns.rdtypes.ANY.PTR.PTR(IN, PTR, self._name(v))
        if rdtype == TXT:
            return dns.rdtypes.ANY.TXT.TXT(IN, TXT, [v])
        return v                                    # SOA: already rdata

    def _rdatas(self, key, rdtype, raw):
        ck = (key, rdtype)
        rds = self._cache.get(ck)
        if rds is None:                             # racing threads build the same list
            rds = self._cache[ck] = [self._rdata(rdtype, v) for v in raw]
        return rds

    def _rrset(self, owner, rdtype, rdatas):
        rr = dns.rrset.RRset(owner, IN, rdtype)
        for rd in rdatas:
            rr.add(rd, self.ttl)
        return rr

    def _soa(self):
        return self._rrset(self.origin, SOA, [self.soa_rdata])

    def _lookup(self, key):
        """key inside the zone -> (exists, {rdtype: [raw]})."""
        recs = self.records.get(key)
        if recs is not None:
            return True, recs
        if key in self.names:
            return True, {}
        if self.pods != "disabled" and key.endswith(b".pod" + self._osuffix):
            # a-b-c-d.<ns>.pod: insecure answers any address in an existing
            # namespace; verified only a pod's own (CoreDNS's findPods)
            rel = key[:-len(b".pod" + self._osuffix)].split(b".")
            if len(rel) == 2 and rel[1].decode("latin-1") in self.namespaces:
                ip = _undashed(rel[0].decode("latin-1"))
                if ip and (self.pods == "insecure" or (rel[1].decode("latin-1"), ip) in self.pod_ips):
                    return True, {A: [ip]}
        return False, {}

    def _additional(self, resp, rrsets):
        """A records of SRV/NS targets inside the zone."""
        seen = set()
        for rr in rrsets:
            if rr.rdtype not in (SRV, NS):
                continue
            for rd in rr:
                k = self.key(rd.target)
                if k in seen or not self._in_zone(k):
                    continue
                seen.add(k)
                a = self.records.get(k, {}).get(A)
                if a:
                    resp.additional.append(self._rrset(rd.target, A, self._rdatas(k, A, a)))

    def answer(self, msg, recursion=True):
        """Answer one query for the zone, or None: forward it upstream.
        recursion=False: never call the resolver (client not allowed to recurse)."""
        if msg.opcode() != dns.opcode.QUERY:
            return _response(msg, dns.rcode.NOTIMP, ra=recursion)
        if len(msg.question) != 1:
            return _response(msg, dns.rcode.FORMERR, ra=recursion)
        q = msg.question[0]
        if q.rdtype in NO_QUESTION_TYPES:
            return _response(msg, dns.rcode.FORMERR, ra=recursion)
        qname, qtype = q.name, q.rdtype
        k = self.key(qname)
        if k is None:
            return None
        if not self._in_zone(k):
            apex = self._reverse_apex(k)
            if apex is not None and q.rdclass == IN:
                return self._reverse(msg, qname, k, qtype, apex, recursion)
            if k not in self.ptr or qtype not in (PTR, ANY) or q.rdclass != IN:
                return None                     # not ours (reverse names of other IPs too)
            resp = _response(msg, aa=True, ra=recursion)
            resp.answer.append(self._rrset(qname, PTR, self._rdatas(k, PTR, self.ptr[k])))
            return resp
        if q.rdclass != IN or qtype in TRANSFER_TYPES:
            return _response(msg, dns.rcode.REFUSED, ra=recursion)
        resp = _response(msg, aa=True, ra=recursion)
        self._resolve(resp, qname, k, qtype, recursion)
        return resp

    def _reverse_apex(self, k):
        """The apex key of the reverse zone of ours holding key k, or None."""
        if not self.rzones or not (k.endswith(b".in-addr.arpa.") or k.endswith(b".ip6.arpa.")):
            return None
        while True:
            if k in self.rzones:
                return k
            i = k.find(b".")
            if i < 0 or i == len(k) - 1:
                return None
            k = k[i + 1:]

    def _reverse(self, msg, qname, k, qtype, apex, recursion):
        """A name in one of our reverse zones: a PTR where an address has one;
        SOA/NS at the apex; NXDOMAIN with the zone's SOA for the rest (CoreDNS
        answers other types on reverse names with NXDOMAIN too)."""
        resp = _response(msg, aa=True, ra=recursion)
        zname = self._name(apex)
        soa = self._rrset(zname, SOA, [self.rzones[apex]])
        if k == apex:
            if qtype in (SOA, ANY):
                resp.answer.append(soa)
            elif qtype == NS:
                resp.answer.append(self._rrset(zname, NS, [self._rdata(NS, "ns.dns." + apex.decode())]))
            else:
                resp.authority.append(soa)
            return resp
        ptrs = self.ptr.get(k)
        if ptrs and qtype in (PTR, ANY):
            resp.answer.append(self._rrset(qname, PTR, self._rdatas(k, PTR, ptrs)))
            return resp
        resp.set_rcode(dns.rcode.NXDOMAIN)
        resp.authority.append(soa)
        return resp

    def _resolve(self, resp, owner, k, qtype, recursion):
        visited = set()
        for depth in range(MAX_CHAIN + 1):
            target = self.cnames.get(k)
            if target is not None:
                tname = self._name(target)
                resp.answer.append(self._rrset(owner, CNAME, [dns.rdtypes.ANY.CNAME.CNAME(IN, CNAME, tname)]))
                visited.add(k)
                tk = target.encode()
                if qtype in (CNAME, ANY) or tk in visited or depth == MAX_CHAIN:
                    return
                if not self._in_zone(tk):
                    if recursion and self.resolver is not None:
                        try:
                            rrsets = self.resolver(tname, qtype)
                        except Exception:            # the upstream is best effort here
                            log.exception("upstream lookup of %s failed", target)
                            rrsets = None
                        if rrsets:
                            resp.answer.extend(rrsets)
                    return
                owner, k = tname, tk
                continue
            exists, recs = self._lookup(k)
            if not exists:
                if depth == 0:
                    resp.set_rcode(dns.rcode.NXDOMAIN)
                resp.authority.append(self._soa())   # in a chain: NODATA (coredns#6088)
                return
            if qtype == ANY:          # RFC 8482: one RRset, not all of them
                types = [next((t for t in ANY_PREFERENCE if recs.get(t)), None) or next(iter(recs))] if recs else []
            else:
                types = [qtype] if recs.get(qtype) else []
            if not types:
                resp.authority.append(self._soa())
                return
            found = [self._rrset(owner, t, self._rdatas(k, t, recs[t]) if k in self.records
                                 else [self._rdata(t, v) for v in recs[t]]) for t in types]
            resp.answer.extend(found)
            self._additional(resp, found)
            return


class DNSServer:
    """The cluster DNS server on bind_ip:port, UDP and TCP.

    cfg: DNSConfig (domain, ttl, upstream [(ip, port)], cluster_ip, port).
    allowed_sources: networks (ipaddress objects or "10.0.0.0/8" strings)
    allowed to recurse (forwarding and the upstream half of ExternalName
    answers); None allows everyone. Names in the cluster zone are answered
    for every client.
    rate_limit, rate_burst: per-source token bucket (queries/s, bucket size;
    rate_limit 0 turns it off). Excess UDP is dropped, excess TCP REFUSED.
    new_source_rate: the global budget of sources not seen before (a/s).
    rrl_rate, rrl_slip: response-rate limiting (see ResponseRateLimiter).
    amplification_limit: a UDP answer to a source without a valid DNS cookie
    is at most this many times the query's size (0: no such bound).
    udp_max_unvalidated, udp_max: UDP response caps (see udp_limit).
    Unset, each comes from the DNSConfig attribute of the same name when it
    has one, else from the module default.
    """

    def __init__(self, cfg, bind_ip, port=None, allowed_sources=None, rate_limit=None, rate_burst=None,
                 udp_max_unvalidated=None, udp_max=None, clock=time.monotonic, new_source_rate=None,
                 rrl_rate=None, rrl_slip=None, amplification_limit=None):
        def setting(value, name, default):
            return value if value is not None else getattr(cfg, name, None) if getattr(cfg, name, None) is not None \
                else default
        self.cfg = cfg
        self.bind_ip = bind_ip
        self.port = cfg.port if port is None else port
        allowed_sources = setting(allowed_sources, "allowed_sources", None)
        self.allowed_sources = None if allowed_sources is None else [
            ipaddress.ip_network(n, strict=False) for n in allowed_sources]
        nsr = int(setting(new_source_rate, "new_source_rate", 0))
        self.gate = NewSourceGate(nsr) if nsr > 0 else None
        self.limiter = RateLimiter(setting(rate_limit, "rate_limit", RATE_LIMIT),
                                   setting(rate_burst, "rate_burst", RATE_BURST), clock=clock, gate=self.gate)
        self.rrl = ResponseRateLimiter(int(setting(rrl_rate, "rrl_rate", 0)), int(setting(rrl_slip, "rrl_slip", 2)),
                                       clock=clock)
        self.amplification_limit = int(setting(amplification_limit, "amplification_limit", 0))
        self.cookies = Cookies()
        self.tcp_per_source = int(setting(None, "tcp_per_source", 16))
        self.tcp_max_connections = int(setting(None, "tcp_max_connections", 256))
        self.tcp_connection_deadline = float(setting(None, "tcp_connection_deadline", 30))
        self.tcp_query_deadline = float(setting(None, "tcp_query_deadline", 5))
        self.conns = ConnectionCounter(self.tcp_per_source, self.tcp_max_connections)
        self.udp_max = int(setting(udp_max, "udp_max", UDP_MAX))
        self.udp_max_unvalidated = int(setting(udp_max_unvalidated, "udp_max_unvalidated", UDP_MAX_UNVALIDATED))
        self.clock = clock
        self.upstream = [tuple(u) for u in (cfg.upstream or [])]
        # stub domains, longest zone first: (".zone.", [(ip, port)])
        self.stubs = sorted(((("." + z.strip(".").lower() + "."), [tuple(u) for u in servers])
                             for z, servers in (getattr(cfg, "stub_domains", None) or {}).items()),
                            key=lambda t: -len(t[0]))
        self.cache = DNSCache(*(getattr(cfg, a, d) for a, d in (
            ("cache_max_entries", 9984), ("cache_max_ttl", 3600), ("cache_min_ttl", 5),
            ("cache_negative_max_ttl", 1800), ("cache_prefetch", 10), ("cache_serve_stale", 300))), clock=clock)
        self.budget = FORWARD_BUDGET
        self._stats = dict.fromkeys(("queries", "udp", "tcp", "noerror", "nxdomain", "forwarded",
                                    "servfail", "refused", "formerr", "notimp", "truncated",
                                    "dropped", "upstream_errors", "other", "ratelimited",
                                    "any_minimal", "rrl_dropped", "rrl_slipped", "cookie_valid",
                                    "tcp_refused", "tcp_deadline", "fast", "served_stale"), 0)
        self._allowed_memo = {}
        self._loop_counts = collections.Counter()
        self.metrics = DNSMetrics()
        self.collector = DNSCollector(self)     # for the engine's /metrics (prometheus-client)
        self._stats_lock = threading.Lock()
        self.zone = ClusterZone(ServiceMap(services={}), cfg, resolver=self._upstream_lookup)
        self._udp = self._tcp = None
        self._threads = []
        self._closing = threading.Event()
        self._pool = None
        self._pending = 0
        self._tcp_conns = set()
        self._lock = threading.Lock()

    # -- public ----------------------------------------------------------

    def update(self, smap):
        """Build the zone of a new service map and swap it in (atomic)."""
        self.zone = ClusterZone(smap, self.cfg, resolver=self._upstream_lookup)
        self.cache.clear_fast()

    def start(self):
        """Bind UDP and TCP on bind_ip:port (port 0: the same free port for
        both, then self.port) and serve from daemon threads."""
        for attempt in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                udp.bind((self.bind_ip, self.port))
                port = udp.getsockname()[1]
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.bind_ip, port))
                tcp.listen(128)
                break
            except OSError as e:
                udp.close()
                tcp.close()
                if self.port != 0 or e.errno != errno.EADDRINUSE or attempt == 19:
                    raise
        self.port = port
        for opt in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
            try:                            # FORCE passes rmem_max (root); else what the kernel allows
                if opt is not None:
                    udp.setsockopt(socket.SOL_SOCKET, opt, UDP_RCVBUF)
                    break
            except OSError:
                continue
        tcp.settimeout(0.5)             # (UDP blocks: no poll() per packet; close() wakes it)
        self._udp, self._tcp = udp, tcp
        self._pool = concurrent.futures.ThreadPoolExecutor(UDP_WORKERS, thread_name_prefix="dns-udp")
        for target, name in ((self._udp_loop, "dns-udp-recv"), (self._tcp_loop, "dns-tcp-accept")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("cluster DNS on %s:%d (udp, tcp), domain %s, upstream %s", self.bind_ip, self.port,
                 self.cfg.domain, ", ".join(f"{h}:{p}" for h, p in self.upstream) or "none")
        return self

    def close(self):
        self._closing.set()
        if self._udp is not None:
            try:                            # wakes a recvfrom blocked on it (Linux, even unconnected)
                self._udp.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for s in (self._udp, self._tcp):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        with self._lock:
            conns = list(self._tcp_conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=2)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # -- one query ---------------------------------------------------------

    @property
    def stats(self):
        """Every counter: the locked ones and the receive loop's own."""
        with self._stats_lock:
            out = dict(self._stats)
        for k, v in dict(self._loop_counts).items():
            out[k] = out.get(k, 0) + v
        return out

    def _count(self, key, n=1):
        with self._stats_lock:
            self._stats[key] = self._stats.get(key, 0) + n

    def _count_all(self, keys):
        with self._stats_lock:
            st = self._stats
            for k in keys:
                st[k] = st.get(k, 0) + 1

    def _count_loop(self, keys):
        """Counters written by the UDP receive loop alone (and tests calling
        its parts): no lock on the answer table's path."""
        c = self._loop_counts
        for k in keys:
            c[k] += 1

    def _allowed_cached(self, src_ip):
        """allowed(), remembered per source (bounded)."""
        a = self._allowed_memo.get(src_ip)
        if a is None:
            if len(self._allowed_memo) > 65536:
                self._allowed_memo.clear()
            a = self._allowed_memo[src_ip] = self.allowed(src_ip)
        return a

    def fast_answer(self, wire, src_ip):
        """The answer to a plain UDP query from the zone's answer table:
        bytes, b"" for "send nothing" (RRL), or None when the table does not
        have it (the caller takes the dnspython way). The source's rate
        budget was already charged."""
        t0 = time.perf_counter()
        pq = plain_query(wire)
        if pq is None:
            return None
        qname, lname, qtype, qend, payload = pq
        hit = self.zone.wire_answers.get((lname, qtype))
        if hit is None:
            hit = self._fast_cached(lname, qtype, src_ip)
            if hit is None:
                return None
        flags, an, ns, ar, tail = hit
        edns = payload > 0
        limit = min(payload, self.udp_max_unvalidated, self.udp_max) if edns else UDP_MIN
        if self.amplification_limit:
            limit = min(limit, self.amplification_limit * len(wire))
        size = qend + len(tail) + (11 if edns else 0)
        if size > limit:
            return None                   # the dnspython way truncates it properly
        flags |= wire[2] << 8 & 0x0100    # RD as asked
        if self._allowed_cached(src_ip):
            flags |= 0x0080               # RA
        if self.rrl.enabled:
            verdict = self.rrl.check(src_ip, (lname, qtype, flags & 0xF))
            if verdict != "ok":
                self._count_loop(("queries", "udp", "rrl_slipped" if verdict == "slip" else "rrl_dropped"))
                if verdict == "drop":
                    self.metrics.observe_loop(qtype, None, 0.0)
                    return b""
                self.metrics.observe_loop(qtype, flags & 0xF, time.perf_counter() - t0)
                return wire[:2] + struct.pack("!HHHHH", flags | 0x0200, 1, 0, 0, 1 if edns else 0) \
                    + qname + wire[qend - 4:qend] + (OPT_OURS if edns else b"")
        self._count_loop(("queries", "udp", "noerror" if flags & 0xF == 0 else "nxdomain", "fast"))
        self.metrics.observe_loop(qtype, flags & 0xF, time.perf_counter() - t0)
        return wire[:2] + struct.pack("!HHHHH", flags, 1, an, ns, ar + edns) + qname + wire[qend - 4:qend] \
            + tail + (OPT_OURS if edns else b"")

    def _fast_cached(self, lname, qtype, src_ip):
        """A fresh cached upstream answer in the answer table's form, TTLs
        counted down; None when there is none, when it is in the last 10% of
        its life (the dnspython way then does prefetch and expiry) or when
        the source may not recurse."""
        e = self.cache.fast.get((lname, qtype))
        if e is None or not self._allowed_cached(src_ip):
            return None
        now = self.cache.clock()
        age = now - e.stored
        if age * 10 >= e.ttl * 9:
            return None
        e.hits = e.hits + 1 if now - e.last_hit < PREFETCH_GAP else 1     # popularity, for prefetch
        e.last_hit = now
        self.cache.stats["hits_denial" if e.negative else "hits_success"] += 1
        flags, an, ns, ar, tail, ttls = e.fast
        elapsed = int(age)
        patched = e.patched               # the bytes with TTLs counted down, made once a second
        if patched is not None and patched[0] == elapsed:
            return flags, an, ns, ar, patched[1]
        if ttls:
            b = bytearray(tail)
            for off, ttl in ttls:
                struct.pack_into("!I", b, off, max(0, ttl - elapsed))
            tail = bytes(b)
        e.patched = (elapsed, tail)
        return flags, an, ns, ar, tail

    def _remember(self, zone, q):
        """Put q's answer into zone's answer table when it is the zone's own
        and the same for every client (no upstream part)."""
        qq = q.question[0]
        if qq.rdclass != IN or len(zone.wire_answers) >= ANSWER_TABLE_MAX or not zone.is_local(q):
            return
        lname = qq.name.to_wire().lower()
        key = (lname, qq.rdtype)
        if key in zone.wire_answers:
            return
        canon = zone.answer(dns.message.make_query(dns.name.from_wire(lname, 0)[0], qq.rdtype), recursion=False)
        if canon is None or canon.rcode() != dns.rcode.NOERROR:
            return
        w = canon.to_wire()
        an, ns, ar = struct.unpack("!HHH", w[6:12])
        flags = QR_AA if canon.flags & dns.flags.AA else 0x8000
        zone.wire_answers[key] = (flags, an, ns, ar, w[12 + len(lname) + 4:])

    def allowed(self, src_ip):
        if self.allowed_sources is None:
            return True
        try:
            a = ipaddress.ip_address(src_ip)
        except ValueError:
            return False
        return any(a in n for n in self.allowed_sources)

    def admit(self, src_ip, verified=False):
        """One query's worth of src_ip's rate budget: False when spent, or
        when src_ip is new and the global budget of new sources is spent
        (verified: a TCP client, whose handshake proved its address)."""
        return self.limiter.allow(src_ip, verified)

    def handle(self, wire, src_ip, tcp=False, query=None, admitted=False):
        """Query bytes -> response bytes, or None (drop). Never raises.
        query: wire already parsed (by the UDP loop); admitted: the rate
        limit was already applied to this query (by the UDP loop)."""
        t0 = time.perf_counter()
        self._count_all(("queries", "tcp" if tcp else "udp"))
        try:
            if not admitted and not self.admit(src_ip, verified=tcp):
                out = self._ratelimited(wire, tcp)
            else:
                out = self._handle(wire, src_ip, tcp, query)
        except Exception:
            log.exception("answering a query from %s failed", src_ip)
            self._count("servfail")
            out = error_from_header(wire, dns.rcode.SERVFAIL)
        self.metrics.observe("tcp" if tcp else "udp", qtype_of(wire),
                             out[3] & 0xF if out is not None and len(out) >= 4 else None, time.perf_counter() - t0)
        return out

    def _ratelimited(self, wire, tcp):
        """Over the source's rate: UDP gets nothing (no reflection), TCP (a
        real, handshaken client) REFUSED."""
        self._count("ratelimited")
        if not tcp:
            return None
        try:
            q = dns.message.from_wire(wire)
        except Exception:
            return error_from_header(wire, dns.rcode.REFUSED)
        return _response(q, dns.rcode.REFUSED, ra=False).to_wire()

    def _handle(self, wire, src_ip, tcp, q):
        if q is not None:
            return self._answer(q, src_ip, tcp, len(wire))
        if len(wire) < 12:
            self._count("dropped")
            return None
        if struct.unpack("!H", wire[2:4])[0] & dns.flags.QR:
            self._count("dropped")         # a response: never answer it (no loops)
            return None
        opcode = (struct.unpack("!H", wire[2:4])[0] >> 11) & 0xF
        if opcode != dns.opcode.QUERY:
            self._count("notimp")
            return error_from_header(wire, dns.rcode.NOTIMP)
        try:
            q = dns.message.from_wire(wire)
        except Exception:                  # dns.exception.* and anything odd in rdata parsing
            self._count("formerr")
            return error_from_header(wire, dns.rcode.FORMERR)
        return self._answer(q, src_ip, tcp, len(wire))

    def _cookie(self, q, src_ip):
        """(valid, client cookie or None, malformed) of q's COOKIE option."""
        for opt in q.options if q.edns >= 0 else ():
            if opt.otype == COOKIE_OPTION:
                ok, client = self.cookies.check(opt.to_wire(), src_ip)
                return ok, client, client is None
        return False, None, False

    def _answer(self, q, src_ip, tcp, qsize):
        if q.edns > 0:                     # RFC 6891: only version 0
            r = _response(q)
            r.use_edns(0, 0, OUR_PAYLOAD)
            r.set_rcode(dns.rcode.BADVERS)
            return r.to_wire()
        verified, client_cookie, malformed = self._cookie(q, src_ip)
        if malformed:                      # RFC 7873 5.2.2
            self._count("formerr")
            return _response(q, dns.rcode.FORMERR).to_wire()
        if verified:
            self._count("cookie_valid")
        zone = self.zone
        r = self._resolve(q, src_ip, zone)
        rc = r.rcode()
        if rc == dns.rcode.NOERROR and len(q.question) == 1:
            self._remember(zone, q)
        self._count({dns.rcode.NOERROR: "noerror", dns.rcode.NXDOMAIN: "nxdomain",
                     dns.rcode.SERVFAIL: "servfail", dns.rcode.REFUSED: "refused",
                     dns.rcode.FORMERR: "formerr", dns.rcode.NOTIMP: "notimp"}.get(rc, "other"))
        if q.edns >= 0:                    # our EDNS, our cookie (never an upstream's)
            opts = [o for o in r.options if o.otype != COOKIE_OPTION] if r.edns >= 0 else []
            if client_cookie is not None:
                opts.append(dns.edns.GenericOption(COOKIE_OPTION, client_cookie + self.cookies.server_cookie(
                    client_cookie, src_ip)))
            r.use_edns(0, r.ednsflags if r.edns >= 0 else 0, OUR_PAYLOAD, options=opts)
        elif r.edns >= 0:                  # an answer kept for an EDNS client, to one without
            r.use_edns(False)
        if tcp:
            return to_wire_limited(r, 65535)[0]
        if not verified and self.rrl.enabled:
            verdict = self.rrl.check(src_ip, self._rrl_key(q, r))
            if verdict != "ok":
                self._count("rrl_" + ("slipped" if verdict == "slip" else "dropped"))
                if verdict == "drop":
                    return None
                return to_wire_limited(r, 0)[0]        # TC=1, header and question (and EDNS) only
        limit = udp_limit(q, verified, self.udp_max_unvalidated, self.udp_max)
        if not verified and self.amplification_limit:
            limit = min(limit, self.amplification_limit * qsize)
        out, truncated = to_wire_limited(r, limit)
        if truncated:
            self._count("truncated")
        return out

    @staticmethod
    def _rrl_key(q, r):
        """What counts as the same response for RRL: the name, type and rcode;
        NXDOMAINs per zone (the SOA's owner), so random names do not spread."""
        rc = r.rcode()
        qq = q.question[0] if q.question else None
        if rc == dns.rcode.NXDOMAIN and r.authority:
            return ("nx", r.authority[0].name)
        if rc not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) or qq is None:
            return ("err", rc)
        return (qq.name.to_wire().lower(), qq.rdtype, rc)

    def _resolve(self, q, src_ip, zone):
        """The response message for q: from the zone, else forwarded."""
        allowed = self._allowed_cached(src_ip)
        r = zone.answer(q, recursion=allowed)
        if r is not None:
            return r
        if not allowed:
            return _response(q, dns.rcode.REFUSED, ra=False)
        if q.question[0].rdtype == ANY:
            # RFC 8482 4.2: a synthesized HINFO, not an upstream's every record
            self._count("any_minimal")
            r = _response(q)
            r.answer.append(dns.rrset.from_rdata(q.question[0].name, ANY_TTL, dns.rdtypes.ANY.HINFO.HINFO(
                IN, HINFO, b"RFC8482", b"")))
            return r
        r = self.recurse(q)
        if r is None:
            return _response(q, dns.rcode.SERVFAIL)
        r.id = q.id
        r.question = list(q.question)     # the client's spelling (0x20)
        return r

    # -- upstream -----------------------------------------------------------

    def servers_for(self, name):
        """The servers that resolve name: its stub domain's (the longest
        zone that holds it), else the upstream."""
        if self.stubs:
            text = name.to_text().lower() if not isinstance(name, str) else name.lower()
            for suffix, servers in self.stubs:
                if text == suffix[1:] or text.endswith(suffix):
                    return servers
        return self.upstream

    def recurse(self, q):
        """q's answer from the cache, else from its servers (and then kept);
        a stale cached answer when those fail; None when nothing answers."""
        cached, state = self.cache.get(q)
        if state == "prefetch":
            self._prefetch(q)
        if state in ("fresh", "prefetch"):
            self.cache.promote(q)
            return cached
        servers = self.servers_for(q.question[0].name)
        r = None
        if servers:
            self._count("forwarded")
            r = self.forward(q, servers)
        if r is not None and r.rcode() not in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
            self.cache.put(q, r)
            self.cache.promote(q)
            return r
        if state == "stale":                  # RFC 8767: better an old answer than none
            self.cache.served_stale()
            self._count("served_stale")
            return cached
        return r

    def _prefetch(self, q):
        """Refresh a popular cached answer before it expires, off the query's path."""
        fq = dns.message.from_wire(q.to_wire())

        def refresh():
            servers = self.servers_for(fq.question[0].name)
            r = self.forward(fq, servers) if servers else None
            if r is not None and r.rcode() not in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
                self.cache.put(fq, r)
            else:
                self.cache.refresh_failed(fq)
        self._count("forwarded")
        if self._pool is None:
            refresh()
        else:
            try:
                self._pool.submit(refresh)
            except RuntimeError:
                self.cache.refresh_failed(fq)

    def forward(self, query, servers=None):
        """Send query to the servers (default: the upstream) in turn within
        the time budget: UDP, then TCP when truncated. The first useful
        answer wins; SERVFAIL and REFUSED move on to the next server (and are
        returned when nothing better comes). None when no server answers."""
        servers = self.upstream if servers is None else servers
        if not servers:
            return None
        fq = dns.message.from_wire(query.to_wire())
        fq.id = dns.entropy.random_16()
        deadline = time.monotonic() + self.budget
        last = None
        n = len(servers)
        for i, (host, port) in enumerate(servers):
            remaining = deadline - time.monotonic()
            if remaining <= 0.01:
                break
            per = remaining / (n - i)
            try:
                r = self._udp_query(fq, host, port, per)
                if r.flags & dns.flags.TC:
                    r = dns.query.tcp(fq, host, port=port,
                                      timeout=max(0.2, deadline - time.monotonic()))
            except (dns.exception.DNSException, OSError, EOFError, ValueError) as e:
                self._count("upstream_errors")
                log.debug("upstream %s:%d: %s", host, port, e)
                continue
            if r.rcode() in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
                last = r
                continue
            return r
        return last

    def _udp_query(self, q, host, port, timeout):
        # a connected, non-blocking socket: an ICMP port unreachable fails at once
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setblocking(False)
            s.connect((host, port))
            return dns.query.udp(q, host, timeout=timeout, port=port, sock=s,
                                 ignore_unexpected=True, ignore_trailing=True)
        finally:
            s.close()

    def _upstream_lookup(self, name, rdtype):
        """ClusterZone's resolver: name's answer records from the upstream
        (through the cache)."""
        q = dns.message.make_query(name, rdtype, use_edns=0, payload=OUR_PAYLOAD)
        r = self.recurse(q)
        if r is None or r.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return None
        return list(r.answer)

    # -- sockets -------------------------------------------------------------

    def _udp_loop(self):
        """Datagrams in batches (recvmmsg, engine._dnsio) when the extension
        is built, else one recvfrom() at a time; answers from the table go
        out together (sendmmsg)."""
        sock = self._udp
        try:
            from ._dnsio import BatchIO
            io = BatchIO(sock.fileno(), UDP_BATCH, UDP_RECV)
        except ImportError:
            io = None
        while not self._closing.is_set():
            try:
                if io is not None:
                    batch = io.recv()
                else:
                    wire, addr = sock.recvfrom(UDP_RECV)
                    batch = [(wire, addr)]
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.01)         # e.g. ECONNREFUSED left over from an ICMP error
                continue
            if self._closing.is_set():
                return
            replies = []
            for wire, addr in batch:
                out = self._udp_datagram(sock, wire, addr)
                if out:
                    replies.append((out, addr))
            if not replies:
                continue
            if io is not None:
                io.send(replies)
                continue
            for out, addr in replies:
                try:
                    sock.sendto(out, addr)
                except OSError as e:
                    log.debug("udp reply to %s: %s", addr, e)

    def _udp_datagram(self, sock, wire, addr):
        """One datagram of the receive loop: the answer from the table, to
        be sent with the batch; or None, when it was dropped, answered here
        the dnspython way or handed to a worker."""
        # the rate limit first: a flood costs one dict lookup per packet
        if not self.admit(addr[0]):
            self._count_loop(("queries", "udp", "ratelimited"))
            self.metrics.observe_loop(qtype_of(wire), None, 0.0)
            return None
        try:
            out = self.fast_answer(wire, addr[0])
        except Exception:
            log.exception("answer table: query from %s", addr[0])
            out = None
        if out is not None:
            return out
        # zone answers inline (microseconds); what may wait on the upstream
        # goes to the workers, so a dead upstream never delays the zone
        q = None
        if len(wire) >= 12 and not wire[2] & 0x80 and (wire[2] >> 3) & 0xF == dns.opcode.QUERY:
            try:
                q = dns.message.from_wire(wire)
            except Exception:
                q = None       # handle() answers FORMERR
        if q is None or self.zone.is_local(q):
            self._answer_udp(sock, wire, addr, q)      # in-zone: answered on this thread
            return None
        with self._lock:
            if self._pending >= UDP_MAX_PENDING:
                self._count("dropped")
                return None
            self._pending += 1
        try:
            self._pool.submit(self._udp_one, sock, wire, addr, q)
        except RuntimeError:          # pool shut down
            pass
        return None

    def _answer_udp(self, sock, wire, addr, q):
        out = self.handle(wire, addr[0], tcp=False, query=q, admitted=True)
        if out is not None:
            try:
                sock.sendto(out, addr)
            except OSError as e:
                log.debug("udp reply to %s: %s", addr, e)

    def _udp_one(self, sock, wire, addr, q):
        try:
            self._answer_udp(sock, wire, addr, q)
        finally:
            with self._lock:
                self._pending -= 1

    def _tcp_loop(self):
        lsock = self._tcp
        while not self._closing.is_set():
            try:
                conn, addr = lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.01)
                continue
            # per source and in total: one host at its cap cannot lock the others out
            why = self.conns.acquire(addr[0])
            if why != "ok":
                conn.close()
                self._count("tcp_refused")
                log.debug("tcp from %s refused: %s connection cap", addr[0], why)
                continue
            with self._lock:
                self._tcp_conns.add(conn)
            try:
                threading.Thread(target=self._tcp_conn, args=(conn, addr), name="dns-tcp", daemon=True).start()
            except RuntimeError:            # no thread to be had: give the slot back
                self._tcp_done(conn, addr)

    def _tcp_conn(self, conn, addr):
        """Queries of one TCP connection until it closes, within deadlines
        that a trickle of bytes does not extend: the connection's whole
        life, each query from its first byte to its last, and the silence
        before the next query."""
        now = time.monotonic()
        end = now + self.tcp_connection_deadline
        try:
            while not self._closing.is_set():
                now = time.monotonic()
                first = _recv_exact(conn, 1, min(end, now + TCP_IDLE))
                if first is None:
                    return
                qend = min(end, time.monotonic() + self.tcp_query_deadline)
                rest = _recv_exact(conn, 1, qend)
                if rest is None:
                    return
                (n,) = struct.unpack("!H", first + rest)
                if n == 0:
                    return
                wire = _recv_exact(conn, n, qend)
                if wire is None:
                    return
                out = self.handle(wire, addr[0], tcp=True)
                if out is None:
                    continue
                conn.settimeout(max(0.01, end - time.monotonic()))   # a client that does not read
                conn.sendall(struct.pack("!H", len(out)) + out)
        except socket.timeout:
            self._count("tcp_deadline")
        except OSError:
            pass
        finally:
            self._tcp_done(conn, addr)

    def _tcp_done(self, conn, addr):
        with self._lock:
            self._tcp_conns.discard(conn)
        self.conns.release(addr[0])
        try:
            conn.close()
        except OSError:
            pass


def _recv_exact(conn, n, deadline):
    """n bytes from conn by `deadline` (monotonic), None at EOF; raises
    socket.timeout when the deadline passes, however the bytes trickle."""
    buf = b""
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("deadline")
        conn.settimeout(left)
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf
