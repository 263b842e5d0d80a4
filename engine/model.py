"""The objects the control plane works with, validated and typed.

Kubernetes objects from the configuration become these; everything after
config.py reads only these, never raw YAML.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from typing import Optional, Union

# The engine's vocabulary, listed once (the C enums are asserted against these).
PROTOCOLS = {"TCP": 6, "UDP": 17}              # Service protocols the fast path takes
PROTO_ICMP = 1
PROTO_NAMES = {PROTO_ICMP: "icmp", 6: "tcp", 17: "udp"}
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
# New-flow schedulers, by the ids the fast path knows them by: random as
# kube-proxy's iptables/nftables modes, the rest IPVS's names.
SCHEDULERS = ("random", "rr", "lc", "sh", "mh")
SCHEDULER_IDS = {name: i for i, name in enumerate(SCHEDULERS)}
SCHEDULER_ANNOTATION = "engine.io/scheduler"   # per service, as kube-router's


def ip_int(ip, _unpack=struct.Struct("!I").unpack, _aton=socket.inet_aton):
    """Dotted IPv4 -> host-order int (inet_aton is ~10x ipaddress; the
    address was validated when its object was parsed)."""
    return _unpack(_aton(ip))[0]


def cidr(text):
    """"10.96.0.0/12" -> (network int, prefix length), host bits cleared.
    ValueError when it is not an IPv4 CIDR."""
    n = ipaddress.IPv4Network(text, strict=False)     # AddressValueError etc. are ValueErrors
    return int(n.network_address), n.prefixlen


def cidr_text(c):
    """(network int, prefix length) -> "10.96.0.0/12"."""
    return f"{socket.inet_ntoa(struct.pack('!I', c[0]))}/{c[1]}"


@dataclass(frozen=True)
class Source:
    """Where an object came from, for error messages."""
    file: str
    kind: str
    namespace: str
    name: str

    def __str__(self):
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{self.file}: {self.kind} {ns}{self.name}"


@dataclass(frozen=True)
class ServicePort:
    name: str
    protocol: str                 # TCP | UDP
    port: int
    target_port: Union[int, str]  # number, or a container port name
    node_port: Optional[int]      # requested; allocated later when None


@dataclass
class Service:
    namespace: str
    name: str
    type: str
    cluster_ip: Optional[str]     # None: allocate; "None": headless
    selector: Optional[dict]
    ports: list
    external_name: Optional[str] = None
    load_balancer_ip: Optional[str] = None
    load_balancer_source_ranges: list = field(default_factory=list)
    external_ips: list = field(default_factory=list)
    session_affinity: str = "None"
    affinity_timeout: int = 10800
    annotations: dict = field(default_factory=dict)
    publish_not_ready: bool = False
    source: Optional[Source] = field(default=None, compare=False)   # where it was read: not part of its state

    @property
    def key(self):
        return f"{self.namespace}/{self.name}"

    @property
    def headless(self):
        return self.cluster_ip == "None"


@dataclass
class Pod:
    namespace: str
    name: str
    labels: dict
    ip: Optional[str]
    ready: bool
    terminating: bool
    hostname: Optional[str]
    container_ports: dict         # name -> (port, protocol)
    source: Optional[Source] = field(default=None, compare=False)   # where it was read: not part of its state


@dataclass(frozen=True)
class Endpoint:
    """One backend address of one service port."""
    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    pod: Optional[str] = None     # pod name, or endpoint hostname
    hostname: Optional[str] = None


@dataclass
class EndpointSlice:
    """EndpointSlice, or legacy Endpoints converted to one."""
    namespace: str
    name: str
    service_name: str
    ports: list                   # [(name, port, protocol)]
    endpoints: list               # [Endpoint] with port 0: ports come from .ports
    source: Optional[Source] = field(default=None, compare=False)   # where it was read: not part of its state
