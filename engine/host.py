"""Host plumbing behind one interface: the TUN device, routes and rules that
bring service traffic into it, sysctls, the node's addresses.

LinuxHost does it with a real TUN (python-pytun) and netlink (pyroute2);
FakeHost keeps it in memory, so the whole control plane, with either fast
path (engine._fastpath or engine.refpath), runs in unit tests without root,
netlink or pytun.
"""
from __future__ import annotations

import ipaddress


class Host:
    """What the engine asks of the node. Everything added is removed again
    by close(), also after a partial setup."""

    vnet = False            # packets carry a virtio-net header

    def open(self, queues):
        """Create the TUN device with `queues` queues."""
        raise NotImplementedError

    def filenos(self):
        """One fd per queue; empty when no packets flow (a fake)."""
        raise NotImplementedError

    def attach_flow_steering(self, masq_ip):
        """Both directions of a flow on one queue (engine/steering.py);
        OSError when the kernel cannot."""
        raise NotImplementedError

    def enable_forwarding(self):
        raise NotImplementedError

    def add_address(self, ip):
        """A /32 of the engine's own on the TUN (the cluster DNS address)."""
        raise NotImplementedError

    def add_route(self, cidr):
        """Route cidr into the TUN, for as long as the engine runs."""
        raise NotImplementedError

    def set_routes(self, cidrs):
        """Keep exactly these extra routes into the TUN (LoadBalancer and
        external IPs outside the routed ranges)."""
        raise NotImplementedError

    def route_node_ports(self, addresses, port_range):
        """Node-port traffic to these node addresses into the TUN."""
        raise NotImplementedError

    def node_addresses(self):
        """The node's IPv4 addresses, but loopback and the TUN's."""
        raise NotImplementedError

    def close(self):
        raise NotImplementedError


class LinuxHost(Host):
    """The real node: engine.tun (pytun and pyroute2, imported only here)."""

    def __init__(self, tun_name, node_addresses=None):
        self.tun_name = tun_name
        self.tun = None
        self._given = list(node_addresses) if node_addresses is not None else None

    def open(self, queues):
        from .tun import Tun
        self.tun = Tun(self.tun_name)
        self.tun.open(queues=queues, vnet=True)
        self.vnet = self.tun.vnet

    def filenos(self):
        return [q.fileno() for q in self.tun.queues] if self.tun else []

    def attach_flow_steering(self, masq_ip):
        from . import steering
        steering.attach(self.tun.fileno(0), int(ipaddress.IPv4Address(masq_ip)))

    def enable_forwarding(self):
        self.tun.enable_forwarding()

    def add_address(self, ip):
        self.tun.add_address(ip)

    def add_route(self, cidr):
        self.tun.add_route(cidr)

    def set_routes(self, cidrs):
        self.tun.set_routes(cidrs)

    def route_node_ports(self, addresses, port_range):
        self.tun.route_node_ports(addresses, port_range)

    def node_addresses(self):
        if self._given is not None:
            return list(self._given)
        return self.tun.node_addresses() if self.tun else []

    def close(self):
        if self.tun:
            self.tun.close()
            self.tun = None


class FakeHost(Host):
    """The node in memory: records what the engine asked for."""

    def __init__(self, node_addresses=()):
        self.addresses = list(node_addresses)
        self.opened = False
        self.closed = False
        self.forwarding = False
        self.local = set()          # addresses added to the TUN
        self.routes = set()         # add_route
        self.extra_routes = set()   # set_routes
        self.node_port_routing = None      # (addresses, port range)

    def open(self, queues):
        self.opened = True

    def filenos(self):
        return []

    def attach_flow_steering(self, masq_ip):
        raise OSError("no TUN queues in a fake host")

    def enable_forwarding(self):
        self.forwarding = True

    def add_address(self, ip):
        self.local.add(ip)

    def add_route(self, cidr):
        self.routes.add(cidr)

    def set_routes(self, cidrs):
        self.extra_routes = set(cidrs)

    def route_node_ports(self, addresses, port_range):
        self.node_port_routing = (sorted(addresses), tuple(port_range))

    def node_addresses(self):
        return list(self.addresses)

    def close(self):
        self.closed = True
