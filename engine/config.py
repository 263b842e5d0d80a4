"""Configuration: the EngineConfiguration document plus Kubernetes objects.

load(path) reads one multi-document YAML stream (and the files or folders
named by `manifests:`), validates every object, and returns a Config. Every
error names the file, the object and the field, as a ConfigError.
"""
from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import os
import re
import reprlib
import socket
from dataclasses import dataclass, field
from typing import Optional

import yaml

from .model import (PROTOCOLS, SCHEDULER_ANNOTATION, SCHEDULERS, SERVICE_TYPES, Endpoint, EndpointSlice,
                    Pod, Service, ServicePort, Source, cidr, cidr_text)

log = logging.getLogger("engine.config")

# libyaml's safe loader where PyYAML has it: about 8x faster. It builds
# nested collections recursively in C and overflows the C stack on hostile
# nesting (100,000 levels), so deep input goes to the pure-Python loader,
# whose recursion limit gives a clean error instead.
def _construct_mapping(self, node, deep=False):
    """Refuse a key given twice in one mapping, as Kubernetes does ("mapping
    key already defined"); PyYAML would silently keep the last."""
    seen = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_short(key_node.value)}: mapping key already defined", key_node.start_mark)
            seen.add(key_node.value)
    return yaml.SafeLoader.construct_mapping(self, node, deep)


class StrictSafeLoader(yaml.SafeLoader):
    construct_mapping = _construct_mapping


_TAG = "tag:yaml.org,2002:"
_STR, _INT, _NULL, _BOOL, _MAP, _SEQ, _MERGE = (_TAG + t for t in ("str", "int", "null", "bool", "map", "seq", "merge"))


def _fast_document(self, node):
    """The document as plain Python objects, built straight from libyaml's
    nodes: strings, plain integers, null, bools, mappings and lists (what
    Kubernetes objects are made of) without PyYAML's generic constructor
    machinery, 3-4x faster; any other tag, and a mapping with a merge key
    or a non-scalar key, goes to the strict SafeConstructor. An alias is
    built once (memo), as PyYAML does: no alias bomb."""
    memo = {}
    fallback = self.construct_object
    ScalarNode, MappingNode, SequenceNode = yaml.ScalarNode, yaml.MappingNode, yaml.SequenceNode

    def conv(n):
        cls = n.__class__
        if cls is ScalarNode:
            t = n.tag
            if t == _STR:
                return n.value
            if t == _INT:
                v = n.value
                if v.isdigit() and (v[0] != "0" or v == "0"):
                    return int(v)
            elif t == _NULL:
                return None
            return fallback(n, deep=True)
        got = memo.get(id(n))
        if got is not None:
            return got
        if cls is MappingNode and n.tag == _MAP:
            d = memo[id(n)] = {}
            seen = set()
            for kn, vn in n.value:
                if kn.__class__ is not ScalarNode or kn.tag == _MERGE:
                    del memo[id(n)]
                    return fallback(n, deep=True)
                if kn.value in seen:        # as written: 1 and "1" are one key to Kubernetes
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_short(kn.value)}: mapping key already defined", kn.start_mark)
                seen.add(kn.value)
                d[conv(kn)] = conv(vn)
            return d
        if cls is SequenceNode and n.tag == _SEQ:
            lst = memo[id(n)] = []
            for x in n.value:
                lst.append(conv(x))
            return lst
        return fallback(n, deep=True)

    try:
        return conv(node)
    finally:
        self.constructed_objects = {}
        self.recursive_objects = {}


if hasattr(yaml, "CSafeLoader"):
    class CSafeLoader(yaml.CSafeLoader):
        construct_mapping = _construct_mapping
        construct_document = _fast_document
else:
    CSafeLoader = None

MAX_FAST_DEPTH = 1000      # deeper: the pure-Python loader, whose recursion limit gives a clean error
MAX_DEPTH = 10 * MAX_FAST_DEPTH
# Block indicators ("- ", "? ", ": ") in a row on one line open that many
# nested collections. A regex asking for N of them in a row backtracks at
# every start inside a shorter run (17 s for 1.5 MB of "- - - ... x" lines,
# the GIL held throughout), so the text is classed byte by byte instead
# (indicator i, blank s, other o), blank runs squeezed to one, and N "is"
# pairs looked for as a substring: a few linear passes in C.
_BLOCK_CLASS = bytes(ord("i") if c in b"-?:" else ord("s") if c in b" \t" else ord("o") for c in range(256))
_DEEP_RUN = b"is" * MAX_FAST_DEPTH
# The running engine parses text larger than this in a child process
# (engine.yamlchild); `engine run` turns it on, one-shot commands need not.
ISOLATE_BYTES = 256 * 1024
PARSE_IN_CHILD = False


def _deep_block(text):
    """True when a line of text opens more than MAX_FAST_DEPTH block
    collections (an over-estimate, as _flow_depth)."""
    classes = text.encode("utf-8", "surrogatepass").translate(_BLOCK_CLASS)
    while b"ss" in classes:
        classes = classes.replace(b"ss", b"s")
    return _DEEP_RUN in classes


def _yaml_docs(text, name, isolate=True):
    """All documents of a YAML stream (or of JSON: a JSON document is YAML,
    and json.loads reads it ~30x faster), as plain Python objects; a
    ConfigError naming `name` (and the line) when it is not YAML. In the
    running engine, text over ISOLATE_BYTES is parsed in a child process,
    bounded in time and memory."""
    if isolate and PARSE_IN_CHILD and len(text) > ISOLATE_BYTES:
        from . import yamlchild
        try:
            return yamlchild.parse(text, str(name))
        except ValueError as e:
            raise ConfigError(name, "", str(e)) from None
    if text[:1] in ("{", "[") or text.lstrip()[:1] in ("{", "["):
        docs = _json_docs(text)
        if docs is not None:
            return docs
    loader = StrictSafeLoader
    depth = _flow_depth(text)
    if depth > MAX_DEPTH:      # no manifest nests so deep: refused before any parser recurses
        raise ConfigError(name, "", "invalid YAML: nested too deeply")
    if CSafeLoader is not None and depth <= MAX_FAST_DEPTH and not _deep_block(text):
        loader = CSafeLoader
    try:
        return [d for d in yaml.load_all(text, Loader=loader) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(name, "", f"invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise ConfigError(name, "", "invalid YAML: nested too deeply") from None


def _refuse_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {_short(k)}: mapping key already defined")
            seen.add(k)
    return d


def _json_docs(text):
    """A JSON document (an object, a List of objects), or None when text is
    not JSON (YAML that starts with a flow collection): YAML then reads it."""
    try:
        doc = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except RecursionError:
        return None
    except ValueError:
        return None
    return [doc] if doc is not None else []


_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _flow_depth(text):
    """How deep text's flow collections ([ and {) nest at most (an
    over-estimate: brackets inside strings count too)."""
    brackets = _NOT_BRACKET.sub("", text)
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)

MAX_FILE_BYTES = 16 * 1024 * 1024     # a manifest larger than this is refused
DNS_POD_MODES = ("insecure", "verified", "disabled")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUB = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 60, 60


def _short(v):
    """A bounded repr for messages: a hostile value (an alias bomb) must not
    be expanded into the error that refuses it."""
    return _REPR.repr(v)


class ConfigError(Exception):
    """A configuration problem, with where it is."""

    def __init__(self, where, field_, msg):
        self.where = str(where)
        self.field = field_
        self.msg = msg
        super().__init__(f"{self.where}: {field_}: {msg}" if field_ else f"{self.where}: {msg}")


@dataclass
class DNSConfig:
    cluster_ip: Optional[str] = "10.96.0.10"
    domain: str = "cluster.local"
    upstream: list = field(default_factory=list)
    ttl: int = 5
    port: int = 53
    # who may have names outside the cluster resolved (not an open resolver);
    # cluster names are answered for everyone
    allowed_sources: list = field(default_factory=lambda: [
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16"])
    rate_limit: int = 100       # queries per second per source (0: no limit)
    rate_burst: int = 200
    service_cidr: Optional[str] = None      # set from serviceCIDR: a reverse zone answered with authority
    pod_cidr: list = field(default_factory=list)   # the pod network's reverse zones (dns.podCIDR)
    # CoreDNS's `pods` mode. insecure (kube-dns's behaviour and kubeadm's
    # Corefile): any a-b-c-d.<ns>.pod answers, so what pods rely on keeps
    # working; verified: only an IP of a pod in that namespace
    pods: str = "insecure"
    stub_domains: dict = field(default_factory=dict)   # zone -> [(ip, port)]
    # the cache of upstream answers (CoreDNS's cache plugin defaults)
    cache_max_entries: int = 9984
    cache_max_ttl: int = 3600
    cache_min_ttl: int = 5
    cache_negative_max_ttl: int = 1800
    cache_prefetch: int = 10       # hits within a minute that make a name popular (0: no prefetch)
    cache_serve_stale: int = 300   # seconds past expiry an answer may be served while upstreams fail
    tcp_max_connections: int = 256
    tcp_per_source: int = 16
    tcp_connection_deadline: int = 30  # seconds a TCP connection lives, however busy
    tcp_query_deadline: int = 5        # seconds from a query's first byte to its last
    new_source_rate: int = 1000    # sources not seen before, admitted per second (all together)
    rrl_rate: int = 100            # identical answers per second per client /24 (0: off)
    rrl_slip: int = 2              # every Nth answer dropped by RRL goes out truncated (0: none)
    amplification_limit: int = 3   # UDP answer / query size for a source without a DNS cookie (0: off)


@dataclass
class ConntrackConfig:
    max: int = 262144
    tcp_established_timeout: int = 86400
    tcp_close_wait_timeout: int = 3600
    udp_timeout: int = 30
    udp_stream_timeout: int = 120
    # seconds between flow snapshots to stateFile while running (0: only on
    # SIGTERM/SIGINT); what a crash (SIGKILL) loses is the flows newer than it
    snapshot_interval: int = 10


@dataclass
class EngineConfig:
    tun_name: str = "kube-tun0"
    service_cidr: str = "10.96.0.0/12"
    node_port_range: tuple = (30000, 32767)
    node_port_addresses: list = field(default_factory=list)
    masquerade_ip: str = "169.254.100.1"
    load_balancer_cidr: Optional[str] = None
    scheduler: str = "random"
    dns: DNSConfig = field(default_factory=DNSConfig)
    conntrack: ConntrackConfig = field(default_factory=ConntrackConfig)
    metrics_bind_address: Optional[str] = "127.0.0.1:10249"
    healthz_bind_address: Optional[str] = "127.0.0.1:10256"
    control_socket: str = "/run/engine/engine.sock"
    state_file: Optional[str] = None       # conntrack handed to the next start; default /run/engine/<tunName>.flows
    manifests: list = field(default_factory=list)
    kubeconfig: Optional[str] = None        # clientConnection.kubeconfig: follow this API server
    hostname_override: Optional[str] = None  # this node's name; default: the hostname
    config_sync_period: int = 900           # resync of the API watch (configSyncPeriod, 15m)


@dataclass
class Config:
    engine: EngineConfig
    services: list
    pods: list
    slices: list
    path: Optional[str] = None
    files: list = field(default_factory=list)     # every file read, for watching
    notes: list = field(default_factory=list)     # ignored kinds and the like


# -- small typed readers ---------------------------------------------------

def _duration(where, fld, v):
    """86400, "86400s", "1h30m", "10m" -> seconds (int)."""
    if isinstance(v, bool):
        raise ConfigError(where, fld, f"expected a duration, got {_short(v)}")
    if isinstance(v, int):
        secs = v
    elif isinstance(v, str) and re.fullmatch(r"(\d+h)?(\d+m)?(\d+s)?", v.strip()) and v.strip():
        m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", v.strip())
        h, mi, s = (int(x) if x else 0 for x in m.groups())
        secs = h * 3600 + mi * 60 + s
    else:
        raise ConfigError(where, fld, f"expected a duration like 30s, 10m or 24h, got {_short(v)}")
    if secs <= 0 or secs > 10 * 365 * 86400:
        raise ConfigError(where, fld, f"duration out of range: {_short(v)}")
    return secs


def _int(where, fld, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(where, fld, f"expected an integer, got {_short(v)}")
    if not lo <= v <= hi:
        raise ConfigError(where, fld, f"{v} is out of range {lo}-{hi}")
    return v


def _str(where, fld, v):
    if not isinstance(v, str):
        raise ConfigError(where, fld, f"expected a string, got {_short(v)}")
    return v


def _ipv4(where, fld, v):
    if v.__class__ is str:
        try:        # the common case, ~20x cheaper than ipaddress: a canonical dotted quad
            if socket.inet_ntoa(socket.inet_aton(v)) == v:
                return v
        except OSError:
            pass
    try:
        return str(ipaddress.IPv4Address(_str(where, fld, v)))
    except ipaddress.AddressValueError:
        raise ConfigError(where, fld, f"not an IPv4 address: {_short(v)}") from None


def _cidr(where, fld, v):
    try:
        return cidr_text(cidr(_str(where, fld, v)))
    except ValueError:
        raise ConfigError(where, fld, f"not an IPv4 CIDR: {_short(v)}") from None


def _hostport(where, fld, v):
    if v in (None, ""):
        return None
    s = _str(where, fld, v)
    host, sep, port = s.rpartition(":")
    if not sep:
        raise ConfigError(where, fld, f"expected ADDRESS:PORT, got {_short(v)}")
    _ipv4(where, fld, host)
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(where, fld, f"bad port in {_short(v)}")
    return s


def _map(where, fld, v):
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(where, fld, f"expected a mapping, got {type(v).__name__}")
    return v


def _str_map(where, fld, v):
    """Labels, selectors, annotations: strings to strings, as Kubernetes'
    map[string]string (a number or a list there is an error, not a string)."""
    out = {}
    for k, x in _map(where, fld, v).items():
        if not isinstance(k, str):
            raise ConfigError(where, fld, f"keys must be strings, got {_short(k)}")
        if not isinstance(x, str):
            raise ConfigError(where, f"{fld}.{k}", f"must be a string, got {_short(x)} (quote it)")
        out[k] = x
    return out


def _list(where, fld, v):
    if v is None:
        return []
    if not isinstance(v, list):
        raise ConfigError(where, fld, f"expected a list, got {type(v).__name__}")
    return v


def _check_keys(where, fld, d, allowed):
    for k in d:
        if k not in allowed:
            raise ConfigError(where, f"{fld}.{k}" if fld else k, "unknown field")


# -- EngineConfiguration ------------------------------------------------------

_ENGINE_KEYS = {"apiVersion", "kind", "tunName", "serviceCIDR", "nodePortRange",
                "nodePortAddresses", "masqueradeIP", "loadBalancerCIDR", "scheduler",
                "dns", "conntrack", "metricsBindAddress", "healthzBindAddress",
                "controlSocket", "stateFile", "manifests", "clientConnection", "hostnameOverride",
                "configSyncPeriod"}


def parse_engine(doc, where):
    _check_keys(where, "", doc, _ENGINE_KEYS)
    c = EngineConfig()
    if "tunName" in doc:
        c.tun_name = _str(where, "tunName", doc["tunName"])
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", c.tun_name):
            raise ConfigError(where, "tunName", f"not a valid interface name: {_short(c.tun_name)}")
    if "serviceCIDR" in doc:
        c.service_cidr = _cidr(where, "serviceCIDR", doc["serviceCIDR"])
    if "nodePortRange" in doc:
        v = doc["nodePortRange"]
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", str(v)) if isinstance(v, (str, int)) else None
        if not m:
            raise ConfigError(where, "nodePortRange", f"expected FIRST-LAST, got {_short(v)}")
        lo, hi = int(m.group(1)), int(m.group(2))
        if not 1 <= lo <= hi <= 65535:
            raise ConfigError(where, "nodePortRange", f"bad range {_short(v)}")
        c.node_port_range = (lo, hi)
    if "nodePortAddresses" in doc:
        c.node_port_addresses = [_cidr(where, f"nodePortAddresses[{i}]", a)
                                 for i, a in enumerate(_list(where, "nodePortAddresses", doc["nodePortAddresses"]))]
    if "masqueradeIP" in doc:
        c.masquerade_ip = _ipv4(where, "masqueradeIP", doc["masqueradeIP"])
    if doc.get("loadBalancerCIDR") is not None:
        c.load_balancer_cidr = _cidr(where, "loadBalancerCIDR", doc["loadBalancerCIDR"])
    if "scheduler" in doc:
        c.scheduler = _str(where, "scheduler", doc["scheduler"])
        if c.scheduler not in SCHEDULERS:
            raise ConfigError(where, "scheduler", f"unknown scheduler {_short(c.scheduler)} (one of {', '.join(SCHEDULERS)})")
    if "dns" in doc:
        _dns_section(where, doc["dns"], c.dns)
    if "conntrack" in doc:
        d = _map(where, "conntrack", doc["conntrack"])
        _check_keys(where, "conntrack", d, {"max", "tcpEstablishedTimeout", "tcpCloseWaitTimeout",
                                            "udpTimeout", "udpStreamTimeout", "snapshotInterval"})
        if "max" in d:
            c.conntrack.max = _int(where, "conntrack.max", d["max"], 16, 1 << 26)
        for key, attr in (("tcpEstablishedTimeout", "tcp_established_timeout"),
                          ("tcpCloseWaitTimeout", "tcp_close_wait_timeout"),
                          ("udpTimeout", "udp_timeout"), ("udpStreamTimeout", "udp_stream_timeout")):
            if key in d:
                setattr(c.conntrack, attr, _duration(where, f"conntrack.{key}", d[key]))
        if "snapshotInterval" in d:
            v = d["snapshotInterval"]
            off = v in ("0", "0s") or (type(v) is int and v == 0)
            c.conntrack.snapshot_interval = 0 if off else _duration(where, "conntrack.snapshotInterval", v)
    if "metricsBindAddress" in doc:
        c.metrics_bind_address = _hostport(where, "metricsBindAddress", doc["metricsBindAddress"])
    if "healthzBindAddress" in doc:
        c.healthz_bind_address = _hostport(where, "healthzBindAddress", doc["healthzBindAddress"])
    if "controlSocket" in doc:
        c.control_socket = _str(where, "controlSocket", doc["controlSocket"])
    if doc.get("stateFile"):
        c.state_file = _str(where, "stateFile", doc["stateFile"])
    if "manifests" in doc:
        c.manifests = [_str(where, f"manifests[{i}]", m) for i, m in enumerate(_list(where, "manifests", doc["manifests"]))]
    if "clientConnection" in doc:
        # KubeProxyConfiguration's ClientConnectionConfiguration; only the
        # kubeconfig matters to us (qps/burst/content types are accepted)
        d = _map(where, "clientConnection", doc["clientConnection"])
        _check_keys(where, "clientConnection", d, {"kubeconfig", "qps", "burst", "contentType", "acceptContentTypes"})
        if d.get("kubeconfig"):
            c.kubeconfig = _str(where, "clientConnection.kubeconfig", d["kubeconfig"])
    if doc.get("hostnameOverride"):
        c.hostname_override = _str(where, "hostnameOverride", doc["hostnameOverride"]).strip().lower()
        if not DNS1123_SUB.match(c.hostname_override):
            raise ConfigError(where, "hostnameOverride", f"not a node name: {_short(doc['hostnameOverride'])}")
    if "configSyncPeriod" in doc:
        c.config_sync_period = _duration(where, "configSyncPeriod", doc["configSyncPeriod"])
    masq = ipaddress.IPv4Address(c.masquerade_ip)
    if masq in ipaddress.IPv4Network(c.service_cidr):
        raise ConfigError(where, "masqueradeIP", f"{masq} lies inside serviceCIDR {c.service_cidr}")
    if c.dns.cluster_ip and ipaddress.IPv4Address(c.dns.cluster_ip) not in ipaddress.IPv4Network(c.service_cidr):
        raise ConfigError(where, "dns.clusterIP", f"{c.dns.cluster_ip} is not in serviceCIDR {c.service_cidr}")
    c.dns.service_cidr = c.service_cidr        # its reverse zone is answered with authority
    return c


def _dns_section(where, v, dc):
    """The `dns:` section into DNSConfig dc."""
    d = _map(where, "dns", v)
    _check_keys(where, "dns", d, {"clusterIP", "domain", "upstream", "ttl", "port", "allowedSources",
                                  "rateLimit", "rateBurst", "podCIDR", "pods", "stubDomains", "cache",
                                  "tcp", "newSourceRate", "responseRateLimit", "amplificationLimit"})
    if "allowedSources" in d:
        dc.allowed_sources = [_cidr(where, f"dns.allowedSources[{i}]", a)
                              for i, a in enumerate(_list(where, "dns.allowedSources", d["allowedSources"]))]
    if "rateLimit" in d:
        dc.rate_limit = _int(where, "dns.rateLimit", d["rateLimit"], 0, 1_000_000)
    if "rateBurst" in d:
        dc.rate_burst = _int(where, "dns.rateBurst", d["rateBurst"], 1, 1_000_000)
    if "clusterIP" in d:
        dc.cluster_ip = None if d["clusterIP"] in (None, "", "None") else _ipv4(where, "dns.clusterIP", d["clusterIP"])
    if "domain" in d:
        dc.domain = _str(where, "dns.domain", d["domain"]).strip(".").lower()
        if not DNS1123_SUB.match(dc.domain):
            raise ConfigError(where, "dns.domain", f"not a DNS domain: {_short(d['domain'])}")
    if "upstream" in d:
        ups = d["upstream"] if isinstance(d["upstream"], list) else [d["upstream"]]
        dc.upstream = [_upstream(where, f"dns.upstream[{i}]", u) for i, u in enumerate(ups)]
    if "ttl" in d:
        dc.ttl = _int(where, "dns.ttl", d["ttl"], 0, 86400)
    if "port" in d:
        dc.port = _int(where, "dns.port", d["port"], 1, 65535)
    if d.get("podCIDR") not in (None, ""):
        dc.pod_cidr = _any_cidrs(where, "dns.podCIDR", d["podCIDR"])
    if "pods" in d:
        dc.pods = _str(where, "dns.pods", d["pods"]).lower()
        if dc.pods not in DNS_POD_MODES:
            raise ConfigError(where, "dns.pods", f"unknown mode {_short(d['pods'])} (one of {', '.join(DNS_POD_MODES)})")
    if "stubDomains" in d:
        stubs = {}
        for zone, servers in _map(where, "dns.stubDomains", d["stubDomains"]).items():
            fld = f"dns.stubDomains[{_short(zone)}]"
            z = _str(where, fld, zone).strip(".").lower()
            if not DNS1123_SUB.match(z):
                raise ConfigError(where, fld, f"not a DNS domain: {_short(zone)}")
            servers = servers if isinstance(servers, list) else [servers]
            if not servers:
                raise ConfigError(where, fld, "needs at least one server")
            stubs[z] = [_upstream(where, f"{fld}[{i}]", u) for i, u in enumerate(servers)]
        dc.stub_domains = stubs
    if "cache" in d:
        cd = _map(where, "dns.cache", d["cache"])
        _check_keys(where, "dns.cache", cd, {"maxEntries", "maxTTL", "minTTL", "negativeMaxTTL",
                                             "prefetch", "serveStale"})
        if "maxEntries" in cd:
            dc.cache_max_entries = _int(where, "dns.cache.maxEntries", cd["maxEntries"], 0, 10_000_000)
        for key, attr in (("maxTTL", "cache_max_ttl"), ("minTTL", "cache_min_ttl"),
                          ("negativeMaxTTL", "cache_negative_max_ttl")):
            if key in cd:
                setattr(dc, attr, _duration(where, f"dns.cache.{key}", cd[key]))
        if "prefetch" in cd:
            dc.cache_prefetch = _int(where, "dns.cache.prefetch", cd["prefetch"], 0, 1_000_000)
        if "serveStale" in cd:
            v = cd["serveStale"]
            off = v in ("0", "0s") or (type(v) is int and v == 0)
            dc.cache_serve_stale = 0 if off else _duration(where, "dns.cache.serveStale", v)
    if "tcp" in d:
        td = _map(where, "dns.tcp", d["tcp"])
        _check_keys(where, "dns.tcp", td, {"maxConnections", "perSource", "connectionDeadline", "queryDeadline"})
        if "maxConnections" in td:
            dc.tcp_max_connections = _int(where, "dns.tcp.maxConnections", td["maxConnections"], 1, 65536)
        if "perSource" in td:
            dc.tcp_per_source = _int(where, "dns.tcp.perSource", td["perSource"], 1, 65536)
        if "connectionDeadline" in td:
            dc.tcp_connection_deadline = _duration(where, "dns.tcp.connectionDeadline", td["connectionDeadline"])
        if "queryDeadline" in td:
            dc.tcp_query_deadline = _duration(where, "dns.tcp.queryDeadline", td["queryDeadline"])
    if "newSourceRate" in d:
        dc.new_source_rate = _int(where, "dns.newSourceRate", d["newSourceRate"], 0, 10_000_000)
    if "responseRateLimit" in d:
        rd = _map(where, "dns.responseRateLimit", d["responseRateLimit"])
        _check_keys(where, "dns.responseRateLimit", rd, {"responsesPerSecond", "slip"})
        if "responsesPerSecond" in rd:
            dc.rrl_rate = _int(where, "dns.responseRateLimit.responsesPerSecond", rd["responsesPerSecond"], 0, 1_000_000)
        if "slip" in rd:
            dc.rrl_slip = _int(where, "dns.responseRateLimit.slip", rd["slip"], 0, 10)
    if "amplificationLimit" in d:
        dc.amplification_limit = _int(where, "dns.amplificationLimit", d["amplificationLimit"], 0, 100)


def _any_cidrs(where, fld, v):
    """"10.244.0.0/16" or "10.244.0.0/16,fd00:10:244::/56" (or a list) -> [str], v4 or v6."""
    items = v if isinstance(v, list) else _str(where, fld, v).split(",")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(str(ipaddress.ip_network(_str(where, fld, item).strip(), strict=False)))
        except ValueError:
            raise ConfigError(where, fld, f"not a CIDR: {_short(item)}") from None
    if not out or len(out) > 2:
        raise ConfigError(where, fld, "expected one CIDR or a v4,v6 pair")
    return out


def _upstream(where, fld, v):
    s = str(v) if isinstance(v, (str, int)) else None
    if s is None:
        raise ConfigError(where, fld, f"expected ADDRESS or ADDRESS:PORT, got {_short(v)}")
    host, _, port = s.partition(":")
    _ipv4(where, fld, host)
    if port and (not port.isdigit() or not 1 <= int(port) <= 65535):
        raise ConfigError(where, fld, f"bad port in {_short(v)}")
    return (host, int(port) if port else 53)


# -- Kubernetes objects -------------------------------------------------------

def _meta(doc, file, kind):
    where0 = Source(file, kind, "", "?")
    meta = _map(where0, "metadata", doc.get("metadata"))
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(where0, "metadata.name", "is required")
    ns = meta.get("namespace", "default")
    if not isinstance(ns, str) or not DNS1123_LABEL.match(ns):
        raise ConfigError(Source(file, kind, "", name), "metadata.namespace", f"not a valid namespace: {_short(ns)}")
    return meta, Source(file, kind, ns, name)


def parse_service(doc, file):
    meta, src = _meta(doc, file, "Service")
    if not DNS1035.match(src.name) or len(src.name) > 63:
        raise ConfigError(src, "metadata.name", "must be a DNS-1035 label (lowercase letters, digits, '-')")
    spec = _map(src, "spec", doc.get("spec"))
    typ = spec.get("type", "ClusterIP")
    if typ not in SERVICE_TYPES:
        raise ConfigError(src, "spec.type", f"unsupported value {_short(typ)} (one of {', '.join(SERVICE_TYPES)})")
    svc = Service(namespace=src.namespace, name=src.name, type=typ, cluster_ip=None,
                  selector=None, ports=[], source=src,
                  annotations=_str_map(src, "metadata.annotations", meta.get("annotations")))
    sched = svc.annotations.get(SCHEDULER_ANNOTATION)
    if sched is not None and sched not in SCHEDULERS:
        raise ConfigError(src, 'metadata.annotations["engine.io/scheduler"]',
                          f"unknown scheduler {_short(sched)} (one of {', '.join(SCHEDULERS)})")
    if typ == "ExternalName":
        en = spec.get("externalName")
        if not isinstance(en, str) or not en:
            raise ConfigError(src, "spec.externalName", "is required for type ExternalName")
        en = en.rstrip(".").lower()
        if not DNS1123_SUB.match(en) or len(en) > 253:
            raise ConfigError(src, "spec.externalName", f"not a DNS name: {_short(spec['externalName'])}")
        svc.external_name = en
    cip = spec.get("clusterIP")
    if cip not in (None, ""):
        if cip == "None":
            svc.cluster_ip = "None"
        elif typ != "ExternalName":
            svc.cluster_ip = _ipv4(src, "spec.clusterIP", cip)
    if svc.headless and typ in ("NodePort", "LoadBalancer"):
        raise ConfigError(src, "spec.clusterIP", f"may not be None for type {typ}")
    sel = spec.get("selector")
    if sel is not None:
        sel = _map(src, "spec.selector", sel)
        svc.selector = _str_map(src, "spec.selector", sel)
    ports = _list(src, "spec.ports", spec.get("ports"))
    if not ports and typ not in ("ExternalName",) and not svc.headless:
        raise ConfigError(src, "spec.ports", "at least one port is required")
    seen_names, seen_ports = set(), set()
    for i, p in enumerate(ports):
        f = f"spec.ports[{i}]"
        p = _map(src, f, p)
        _check_keys(src, f, p, {"name", "protocol", "port", "targetPort", "nodePort", "appProtocol"})
        name = p.get("name", "")
        if not isinstance(name, str) or (name and not DNS1123_LABEL.match(name)):
            raise ConfigError(src, f"{f}.name", f"not a valid port name: {_short(name)}")
        if len(ports) > 1 and not name:
            raise ConfigError(src, f"{f}.name", "is required when a service has more than one port")
        if name in seen_names:
            raise ConfigError(src, f"{f}.name", f"duplicate port name {_short(name)}")
        seen_names.add(name)
        proto = p.get("protocol", "TCP")
        if proto == "SCTP":
            raise ConfigError(src, f"{f}.protocol", "SCTP is not supported by this engine")
        if proto not in PROTOCOLS:
            raise ConfigError(src, f"{f}.protocol", f"unsupported value {_short(proto)} (TCP or UDP)")
        port = _int(src, f"{f}.port", p.get("port"), 1, 65535)
        if (port, proto) in seen_ports:
            raise ConfigError(src, f"{f}.port", f"duplicate port {port}/{proto}")
        seen_ports.add((port, proto))
        tp = p.get("targetPort", port)
        if isinstance(tp, str) and tp.isdigit():
            tp = int(tp)
        if isinstance(tp, str):
            if not IANA_SVC_NAME.match(tp) or not re.search(r"[a-z]", tp):
                raise ConfigError(src, f"{f}.targetPort", f"not a port number or name: {_short(tp)}")
        else:
            tp = _int(src, f"{f}.targetPort", tp, 1, 65535)
        np_ = p.get("nodePort")
        if np_ is not None:
            np_ = _int(src, f"{f}.nodePort", np_, 1, 65535)
            if typ not in ("NodePort", "LoadBalancer"):
                raise ConfigError(src, f"{f}.nodePort", f"may not be set for type {typ}")
        svc.ports.append(ServicePort(name=name, protocol=proto, port=port, target_port=tp, node_port=np_))
    if spec.get("loadBalancerIP") not in (None, ""):
        svc.load_balancer_ip = _ipv4(src, "spec.loadBalancerIP", spec["loadBalancerIP"])
    svc.load_balancer_source_ranges = [
        _cidr(src, f"spec.loadBalancerSourceRanges[{i}]", r)
        for i, r in enumerate(_list(src, "spec.loadBalancerSourceRanges", spec.get("loadBalancerSourceRanges")))]
    svc.external_ips = [_ipv4(src, f"spec.externalIPs[{i}]", a)
                        for i, a in enumerate(_list(src, "spec.externalIPs", spec.get("externalIPs")))]
    aff = spec.get("sessionAffinity", "None")
    if aff not in ("None", "ClientIP"):
        raise ConfigError(src, "spec.sessionAffinity", f"unsupported value {_short(aff)} (None or ClientIP)")
    svc.session_affinity = aff
    sac = _map(src, "spec.sessionAffinityConfig", spec.get("sessionAffinityConfig"))
    cip_cfg = _map(src, "spec.sessionAffinityConfig.clientIP", sac.get("clientIP"))
    if "timeoutSeconds" in cip_cfg:
        svc.affinity_timeout = _int(src, "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                                    cip_cfg["timeoutSeconds"], 1, 86400)
    svc.publish_not_ready = bool(spec.get("publishNotReadyAddresses", False))
    return svc


def parse_pod(doc, file):
    meta, src = _meta(doc, file, "Pod")
    labels = _str_map(src, "metadata.labels", meta.get("labels"))
    spec = _map(src, "spec", doc.get("spec"))
    status = _map(src, "status", doc.get("status"))
    ip = status.get("podIP")
    if ip not in (None, ""):
        ip = _ipv4(src, "status.podIP", ip)
    else:
        ip = None
    ready = False
    for i, cond in enumerate(_list(src, "status.conditions", status.get("conditions"))):
        cond = _map(src, f"status.conditions[{i}]", cond)
        if cond.get("type") == "Ready":
            ready = str(cond.get("status")) == "True"
    if "conditions" not in status and ip:
        ready = True        # a hand-written pod with an IP and no status conditions counts as ready
    cports = {}
    for ci, c in enumerate(_list(src, "spec.containers", spec.get("containers"))):
        c = _map(src, f"spec.containers[{ci}]", c)
        for pi, p in enumerate(_list(src, f"spec.containers[{ci}].ports", c.get("ports"))):
            f = f"spec.containers[{ci}].ports[{pi}]"
            p = _map(src, f, p)
            port = _int(src, f"{f}.containerPort", p.get("containerPort"), 1, 65535)
            if p.get("name"):
                cports[str(p["name"])] = (port, p.get("protocol", "TCP"))
    return Pod(namespace=src.namespace, name=src.name, labels=labels, ip=ip, ready=ready,
               terminating=bool(meta.get("deletionTimestamp")), hostname=spec.get("hostname"),
               container_ports=cports, source=src)


def parse_endpointslice(doc, file):
    meta, src = _meta(doc, file, "EndpointSlice")
    labels = _map(src, "metadata.labels", meta.get("labels"))
    svc_name = labels.get("kubernetes.io/service-name")
    if not svc_name:
        raise ConfigError(src, "metadata.labels", "kubernetes.io/service-name is required")
    if doc.get("addressType", "IPv4") != "IPv4":
        raise ConfigError(src, "addressType", f"unsupported value {_short(doc.get('addressType'))} (IPv4)")
    ports = []
    for i, p in enumerate(_list(src, "ports", doc.get("ports"))):
        p = _map(src, f"ports[{i}]", p)
        proto = p.get("protocol", "TCP")
        if proto not in PROTOCOLS:
            raise ConfigError(src, f"ports[{i}].protocol", f"unsupported value {_short(proto)}")
        ports.append((p.get("name", "") or "", _int(src, f"ports[{i}].port", p.get("port"), 1, 65535), proto))
    eps = []
    for i, e in enumerate(_list(src, "endpoints", doc.get("endpoints"))):
        e = _map(src, f"endpoints[{i}]", e)
        cond = _map(src, f"endpoints[{i}].conditions", e.get("conditions"))
        ready = cond.get("ready", True) is not False
        serving = cond.get("serving", ready) is not False
        terminating = cond.get("terminating", False) is True
        tref = _map(src, f"endpoints[{i}].targetRef", e.get("targetRef"))
        for j, a in enumerate(_list(src, f"endpoints[{i}].addresses", e.get("addresses"))):
            eps.append(Endpoint(ip=_ipv4(src, f"endpoints[{i}].addresses[{j}]", a), port=0,
                                ready=ready and not terminating, serving=serving,
                                terminating=terminating, pod=tref.get("name"),
                                hostname=e.get("hostname")))
    return EndpointSlice(namespace=src.namespace, name=src.name, service_name=svc_name,
                         ports=ports, endpoints=eps, source=src)


def parse_endpoints(doc, file):
    """Legacy v1 Endpoints: each subset becomes one slice of the service."""
    meta, src = _meta(doc, file, "Endpoints")
    slices = []
    for si, sub in enumerate(_list(src, "subsets", doc.get("subsets"))):
        f = f"subsets[{si}]"
        sub = _map(src, f, sub)
        ports = []
        for i, p in enumerate(_list(src, f"{f}.ports", sub.get("ports"))):
            p = _map(src, f"{f}.ports[{i}]", p)
            proto = p.get("protocol", "TCP")
            if proto not in PROTOCOLS:
                raise ConfigError(src, f"{f}.ports[{i}].protocol", f"unsupported value {_short(proto)}")
            ports.append((p.get("name", "") or "", _int(src, f"{f}.ports[{i}].port", p.get("port"), 1, 65535), proto))
        eps = []
        for key, ready in (("addresses", True), ("notReadyAddresses", False)):
            for i, a in enumerate(_list(src, f"{f}.{key}", sub.get(key))):
                a = _map(src, f"{f}.{key}[{i}]", a)
                tref = _map(src, f"{f}.{key}[{i}].targetRef", a.get("targetRef"))
                eps.append(Endpoint(ip=_ipv4(src, f"{f}.{key}[{i}].ip", a.get("ip")), port=0,
                                    ready=ready, serving=ready, pod=tref.get("name"),
                                    hostname=a.get("hostname")))
        slices.append(EndpointSlice(namespace=src.namespace, name=f"{src.name}-{si}",
                                    service_name=src.name, ports=ports, endpoints=eps, source=src))
    return slices


# -- files ---------------------------------------------------------------------

def _read_docs(path):
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise ConfigError(path, "", f"file is {size} bytes, larger than the {MAX_FILE_BYTES} allowed")
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 text: {e}") from None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror}") from None
    return _yaml_docs(text, path)


def _manifest_files(base_dir, entry, where):
    p = entry if os.path.isabs(entry) else os.path.join(base_dir, entry)
    p = os.path.normpath(p)
    if os.path.isdir(p):
        return sorted(os.path.join(p, f) for f in os.listdir(p)
                      if f.endswith((".yaml", ".yml", ".json")) and not f.startswith("."))
    if os.path.isfile(p):
        return [p]
    raise ConfigError(where, "manifests", f"no such file or folder: {_short(entry)}")


def _objects(doc, file, cfg, engine_docs):
    where = Source(file, str(doc.get("kind", "?")) if isinstance(doc, dict) else "?", "", "?")
    if not isinstance(doc, dict):
        raise ConfigError(file, "", f"a document must be a mapping, got {type(doc).__name__}")
    kind = doc.get("kind")
    if not isinstance(kind, str):
        raise ConfigError(where, "kind", "is required")
    if kind == "EngineConfiguration":
        engine_docs.append(doc)
    elif kind == "List" or (kind.endswith("List") and isinstance(doc.get("items"), list)):
        for item in _list(where, "items", doc.get("items")):
            _objects(item, file, cfg, engine_docs)
    elif kind == "Service":
        cfg.services.append(parse_service(doc, file))
    elif kind == "Pod":
        cfg.pods.append(parse_pod(doc, file))
    elif kind == "EndpointSlice":
        cfg.slices.append(parse_endpointslice(doc, file))
    elif kind == "Endpoints":
        cfg.slices.extend(parse_endpoints(doc, file))
    else:
        name = (doc.get("metadata") or {}).get("name", "?") if isinstance(doc.get("metadata"), dict) else "?"
        cfg.notes.append(f"{file}: {kind} {name}: ignored (the engine routes Services, Pods, EndpointSlices and Endpoints)")


def parse_object(doc, name):
    """One Kubernetes object (a dict, as an API watch hands it over) as the
    model objects it becomes: [Service], [Pod], [EndpointSlice], the slices
    of an Endpoints object, or [] for a kind the engine does not route."""
    cfg = Config(engine=None, services=[], pods=[], slices=[])
    inner = []
    _objects(doc, name, cfg, inner)
    if inner:
        raise ConfigError(name, "", "EngineConfiguration can only change in the configuration file")
    return cfg.services + cfg.pods + cfg.slices


def parse_text(text, name):
    """Objects of a YAML stream that is not the configuration file (engine
    apply/delete): a Config holding only them."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(name, "", f"{len(text)} bytes, larger than the {MAX_FILE_BYTES} allowed")
    docs = _yaml_docs(text, name)
    cfg = Config(engine=EngineConfig(), services=[], pods=[], slices=[])
    inner = []
    for doc in docs:
        _objects(doc, name, cfg, inner)
    if inner:
        raise ConfigError(name, "", "EngineConfiguration can only change in the configuration file")
    _check_duplicates(cfg)
    return cfg


def object_key(o):
    """(kind, namespace, name) of a parsed object; slices of one Endpoints
    object share the Endpoints' key."""
    kind = o.source.kind if o.source else type(o).__name__
    name = o.source.name if o.source else o.name
    return (kind, o.namespace, name)


def objects_by_key(cfg):
    """The objects of cfg by (kind, namespace, name): {key: [objects]} (the
    slices of one Endpoints object share its key)."""
    out = {}
    for o in cfg.services + cfg.pods + cfg.slices:
        out.setdefault(object_key(o), []).append(o)
    return out


def from_objects(base, objects):
    """A Config with base's settings holding objects ({key: [objects]})."""
    out = Config(engine=base.engine, services=[], pods=[], slices=[], path=base.path, files=base.files,
                 notes=base.notes)
    lists = {"Service": out.services, "Pod": out.pods}
    for (kind, _, _), objs in objects.items():
        lists.get(kind, out.slices).extend(objs)
    return out


class FileCache:
    """Parsed objects per file, reused while the file's stat (mtime, size,
    inode) is the same: a reload reads only the files that changed."""

    def __init__(self):
        self.entries = {}           # path -> (stat key, fragment Config, engine docs)
        self.read = []              # the files the last load read (parsed anew)

    def get(self, path):
        try:
            st = os.stat(path)
            key = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
        except OSError:
            key = None
        hit = self.entries.get(path)
        if hit is not None and key is not None and hit[0] == key:
            return hit[1], hit[2]
        frag, engine_docs = _fragment(_read_docs(path), path)
        self.read.append(path)
        if key is not None:
            self.entries[path] = (key, frag, engine_docs)
        return frag, engine_docs

    def keep_only(self, paths):
        for p in [p for p in self.entries if p not in paths]:
            del self.entries[p]


def _fragment(docs, name):
    """The objects of one file's documents: (Config of them, EngineConfiguration documents)."""
    frag = Config(engine=None, services=[], pods=[], slices=[])
    engine_docs = []
    for doc in docs:
        _objects(doc, name, frag, engine_docs)
    _check_duplicates(frag)         # (across files: load, or the engine's per-file reload)
    return frag, engine_docs


def load(path=None, extra_files=(), *, text=None, objects=None, cache=None):
    """The configuration (and the objects of its manifests) as a Config,
    from one of: path (a file), text (a YAML or JSON stream) or objects
    (documents as Python dicts). Relative manifests are relative to the
    file's folder (the working directory for text and objects). cache: a
    FileCache, so that only changed files are read again."""
    if (path is None) + (text is None) + (objects is None) != 2:
        raise TypeError("config.load takes one of path, text or objects")
    cache = cache if cache is not None else FileCache()
    cache.read = []
    if path is not None:
        path = os.path.abspath(path)
        name, base_dir = path, os.path.dirname(path)
        main, engine_docs = cache.get(path)
    else:
        name, base_dir = ("<text>", os.getcwd()) if text is not None else ("<objects>", os.getcwd())
        if text is not None and len(text) > MAX_FILE_BYTES:
            raise ConfigError(name, "", f"{len(text)} bytes, larger than the {MAX_FILE_BYTES} allowed")
        main, engine_docs = _fragment(_yaml_docs(text, name) if text is not None else list(objects), name)
    cfg = Config(engine=EngineConfig(), services=list(main.services), pods=list(main.pods),
                 slices=list(main.slices), path=path, notes=list(main.notes))
    if path:
        cfg.files.append(path)
    if len(engine_docs) > 1:
        raise ConfigError(name, "", "more than one EngineConfiguration document")
    if engine_docs:
        meta = engine_docs[0].get("metadata")
        cfg.engine = parse_engine(engine_docs[0], Source(name, "EngineConfiguration", "",
                                                         meta.get("name", "engine") if isinstance(meta, dict) else "engine"))
    files = []
    for entry in cfg.engine.manifests:
        files.extend(_manifest_files(base_dir, entry, name))
    files.extend(os.path.abspath(f) for f in extra_files)
    for f in files:
        if f == path:
            continue
        cfg.files.append(f)
        frag, inner = cache.get(f)
        if inner:
            raise ConfigError(f, "", "EngineConfiguration belongs in the main configuration file")
        cfg.services += frag.services
        cfg.pods += frag.pods
        cfg.slices += frag.slices
        cfg.notes += frag.notes
    cache.keep_only(set(cfg.files))
    _check_duplicates(cfg)
    return cfg


def _check_duplicates(cfg):
    seen = {}
    for kind, objs in (("Service", cfg.services), ("Pod", cfg.pods)):
        for o in objs:
            key = (kind, o.namespace, o.name)
            if key in seen:
                raise ConfigError(o.source, "metadata.name", f"duplicate {kind} {o.namespace}/{o.name} (also in {seen[key].file})")
            seen[key] = o.source
