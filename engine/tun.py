"""The TUN device and the routes that steer service traffic into it.

Everything added is recorded and removed again by Tun.close(), in reverse
order, also after a partial setup.
"""
from __future__ import annotations

import fcntl
import logging
import os

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pytun import IFF_NO_PI, IFF_TUN, TunTapDevice

log = logging.getLogger("engine.tun")

TXQUEUELEN = 10000      # the kernel->user ring; the default 500 tail-drops bursts


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

    def open(self, mtu=1500):
        self.dev = TunTapDevice(name=self.name, flags=IFF_TUN | IFF_NO_PI)
        self._undo.append(self.dev.close)      # a non-persistent TUN vanishes on close
        self.dev.mtu = mtu
        fl = fcntl.fcntl(self.dev.fileno(), fcntl.F_GETFL)
        fcntl.fcntl(self.dev.fileno(), fcntl.F_SETFL, fl | os.O_NONBLOCK)
        self.index = self.ipr.link_lookup(ifname=self.name)[0]
        self.ipr.link("set", index=self.index, txqlen=TXQUEUELEN)
        for path, value in ((f"/proc/sys/net/ipv6/conf/{self.name}/disable_ipv6", 1),
                            (f"/proc/sys/net/ipv4/conf/{self.name}/rp_filter", 0)):
            try:
                _write_sysctl(path, value)
            except OSError:
                pass
        self.dev.up()
        return self

    def fileno(self):
        return self.dev.fileno()

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
