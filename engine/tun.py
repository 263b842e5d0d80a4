"""The TUN device and the routes that bring service traffic into it.

Everything added is recorded and removed again by Tun.close(), in reverse
order, also after a partial setup.
"""
from __future__ import annotations

import fcntl
import logging
import os

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pytun import IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TUN, IFF_VNET_HDR, TunTapDevice

log = logging.getLogger("engine.tun")

TXQUEUELEN = 10000      # the kernel->user ring; the default 500 tail-drops bursts
LOCAL_TABLE = 255
NODEPORT_TABLE = 2004   # holds one route: default dev <tun>
PRIO_FROM_TUN = 90      # iif <tun> lookup local: what the engine writes is never routed back in
PRIO_NODEPORT = 91      # to <node addr> ipproto tcp|udp dport <range> lookup NODEPORT_TABLE
PRIO_LOCAL = 100        # where the kernel's priority-0 local rule moves (as Cilium does)

# linux/if_tun.h: offloads the kernel may hand us (and take back) when the
# device has IFF_VNET_HDR: partial checksums and TCP/UDP segmentation, so one
# read/write moves a 64 KB "super packet" instead of 44 segments.
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
TUN_F_USO4, TUN_F_USO6 = 0x20, 0x40


def _write_sysctl(path, value):
    with open(path, "w") as f:
        f.write(str(value))


def _read_sysctl(path):
    with open(path) as f:
        return f.read().strip()


class Tun:
    def __init__(self, name):
        self.name = name
        self.dev = None
        self.ipr = IPRoute()
        self.index = None
        self._undo = []         # callables, run in reverse on close

    def open(self, mtu=1500, queues=1, vnet=True):
        """Create the device with `queues` queues (one fd each). With vnet,
        every packet carries a virtio-net header and offloads are on."""
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0) | (IFF_MULTI_QUEUE if queues > 1 else 0)
        self.vnet = vnet
        self.queues = []
        for _ in range(queues):
            q = TunTapDevice(name=self.name, flags=flags)
            self.queues.append(q)
            self._undo.append(q.close)      # a non-persistent TUN vanishes with its last fd
            fl = fcntl.fcntl(q.fileno(), fcntl.F_GETFL)
            fcntl.fcntl(q.fileno(), fcntl.F_SETFL, fl | os.O_NONBLOCK)
        self.dev = self.queues[0]
        self.dev.mtu = mtu
        if vnet:
            base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
            try:        # UDP segmentation where the kernel has it (6.2+)
                fcntl.ioctl(self.dev.fileno(), TUNSETOFFLOAD, base | TUN_F_USO4 | TUN_F_USO6)
            except OSError:
                fcntl.ioctl(self.dev.fileno(), TUNSETOFFLOAD, base)
        self.index = self.ipr.link_lookup(ifname=self.name)[0]
        self.ipr.link("set", index=self.index, txqlen=TXQUEUELEN)
        # accept_local: un-NATed replies of node-port flows come out of the TUN
        # with a node address as their source
        for path, value in ((f"/proc/sys/net/ipv6/conf/{self.name}/disable_ipv6", 1),
                            (f"/proc/sys/net/ipv4/conf/{self.name}/rp_filter", 0),
                            (f"/proc/sys/net/ipv4/conf/{self.name}/accept_local", 1)):
            try:
                _write_sysctl(path, value)
            except OSError:
                pass
        self.dev.up()
        return self

    def fileno(self, queue=0):
        return self.queues[queue].fileno()

    def enable_forwarding(self):
        path = "/proc/sys/net/ipv4/ip_forward"
        old = _read_sysctl(path)
        if old != "1":
            _write_sysctl(path, 1)
            self._undo.append(lambda: _write_sysctl(path, old))

    def add_route(self, cidr):
        """Route cidr into the TUN (replacing nothing the node already had)."""
        try:
            self.ipr.route("add", dst=cidr, oif=self.index)
        except NetlinkError as e:
            if e.code != 17:        # EEXIST
                raise
            log.warning("route %s already exists; leaving it", cidr)
            return
        self._undo.append(lambda: self._del_route(cidr))

    def _del_route(self, cidr):
        try:
            self.ipr.route("del", dst=cidr, oif=self.index)
        except NetlinkError:
            pass

    def add_address(self, ip):
        """A /32 of the engine's own on the TUN (the cluster DNS listens there:
        packets the fast path DNATs to it are delivered locally)."""
        self.ipr.addr("add", index=self.index, address=ip, prefixlen=32)
        self._undo.append(lambda: self._quiet(self.ipr.addr, "del", index=self.index, address=ip, prefixlen=32))

    def set_routes(self, cidrs):
        """Keep exactly these extra routes into the TUN (LoadBalancer and
        external IPs outside the routed ranges); diff against the last call."""
        want = set(cidrs)
        have = getattr(self, "_extra_routes", set())
        for c in have - want:
            self._del_route(c)
        for c in sorted(want - have):
            try:
                self.ipr.route("replace", dst=c, oif=self.index)
            except NetlinkError as e:
                log.warning("route %s: %s", c, e)
        self._extra_routes = want
        if not getattr(self, "_extra_undo", False):
            self._extra_undo = True
            self._undo.append(lambda: [self._del_route(c) for c in self._extra_routes])

    def route_node_ports(self, addresses, port_range):
        """Policy routing for node ports, no netfilter: packets to a node
        address on a port in port_range go to NODEPORT_TABLE, whose only
        route leads into the TUN. The local rule moves from priority 0 to
        PRIO_LOCAL so that ours can come first."""
        lo, hi = port_range
        if not getattr(self, "_np_setup", False):
            self._np_setup = True
            self._np_rules = set()
            self.ipr.route("replace", dst="0.0.0.0/0", oif=self.index, table=NODEPORT_TABLE)
            self._undo.append(lambda: self._quiet(self.ipr.route, "del", dst="0.0.0.0/0", oif=self.index,
                                                  table=NODEPORT_TABLE))
            self._rule_add(priority=PRIO_FROM_TUN, iifname=self.name, table=LOCAL_TABLE)
            self._undo.append(lambda: self._quiet(self.ipr.rule, "del", priority=PRIO_FROM_TUN,
                                                  iifname=self.name, table=LOCAL_TABLE))
            # (a killed engine may have moved it already: then it is ours to move back)
            if not self._has_rule(PRIO_LOCAL, LOCAL_TABLE):
                self.ipr.rule("add", priority=PRIO_LOCAL, table=LOCAL_TABLE)
            if self._has_rule(0, LOCAL_TABLE):
                self.ipr.rule("del", priority=0, table=LOCAL_TABLE)
            self._undo.append(self._restore_local_rule)
            self._reserve_ports(lo, hi)
            self._undo.append(lambda: [self._del_np_rule(r) for r in list(self._np_rules)])
        want = {(a, proto, lo, hi) for a in addresses for proto in (6, 17)}
        for r in self._np_rules - want:
            self._del_np_rule(r)
        for r in sorted(want - self._np_rules):
            a, proto, lo_, hi_ = r
            self._rule_add(priority=PRIO_NODEPORT, dst=a, dst_len=32, ip_proto=proto,
                           dport_range=f"{lo_}:{hi_}", table=NODEPORT_TABLE)
            self._np_rules.add(r)

    def _restore_local_rule(self):
        if not self._has_rule(0, LOCAL_TABLE):
            self._quiet(self.ipr.rule, "add", priority=0, table=LOCAL_TABLE)
        if self._has_rule(PRIO_LOCAL, LOCAL_TABLE):
            self._quiet(self.ipr.rule, "del", priority=PRIO_LOCAL, table=LOCAL_TABLE)

    def _rule_add(self, **kw):
        """Add a rule; one left by an engine that was killed is taken over."""
        try:
            self.ipr.rule("add", **kw)
        except NetlinkError as e:
            if e.code != 17:        # EEXIST
                raise

    def _del_np_rule(self, r):
        a, proto, lo, hi = r
        self._quiet(self.ipr.rule, "del", priority=PRIO_NODEPORT, dst=a, dst_len=32, ip_proto=proto,
                    dport_range=f"{lo}:{hi}", table=NODEPORT_TABLE)
        self._np_rules.discard(r)

    def _has_rule(self, prio, table):
        return any(r.get_attr("FRA_PRIORITY", 0) == prio and r.get_attr("FRA_TABLE") == table
                   and not r.get_attr("FRA_IIFNAME") and not r.get_attr("FRA_DST")
                   for r in self.ipr.get_rules(family=2))

    def _reserve_ports(self, lo, hi):
        """Keep the node's own ephemeral ports out of the node-port range
        (ip_local_reserved_ports, as Cilium does)."""
        path = "/proc/sys/net/ipv4/ip_local_reserved_ports"
        try:
            old = _read_sysctl(path)
            _write_sysctl(path, ",".join(x for x in (old, f"{lo}-{hi}") if x))
            self._undo.append(lambda: _write_sysctl(path, old))
        except OSError as e:
            log.warning("cannot reserve node ports: %s", e)

    @staticmethod
    def _quiet(fn, *a, **kw):
        try:
            fn(*a, **kw)
        except NetlinkError:
            pass

    def node_addresses(self):
        """IPv4 addresses of this namespace, but loopback and the TUN's."""
        out = []
        for a in self.ipr.get_addr(family=2):
            ip = a.get_attr("IFA_ADDRESS")
            if ip and not ip.startswith("127.") and a["index"] != self.index:
                out.append(ip)
        return out

    def close(self):
        while self._undo:
            fn = self._undo.pop()
            try:
                fn()
            except Exception as e:      # keep undoing the rest
                log.warning("cleanup step failed: %s", e)
        self.ipr.close()
