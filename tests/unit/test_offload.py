"""CHECKSUM_PARTIAL packets (virtio-net NEEDS_CSUM): the L4 checksum field
holds the folded pseudo-header sum, not complemented. NAT must adjust it for
the address change only, and the receiver's completed checksum must verify."""
import ipaddress
import struct

from scapy.all import IP, TCP, UDP, raw

from engine import _fastpath
from engine.lab.packets import pseudo_sum

ip = lambda s: int(ipaddress.IPv4Address(s))


def partial(pkt):
    """The packet as the kernel hands it over with NEEDS_CSUM."""
    b = bytearray(raw(pkt))
    ihl = (b[0] & 15) * 4
    l4len = len(b) - ihl
    off = 16 if b[9] == 6 else 6
    struct.pack_into("!H", b, ihl + off, pseudo_sum(ip(pkt[IP].src), ip(pkt[IP].dst), b[9], l4len))
    return bytes(b), ihl, off


def dataplane():
    t = _fastpath.Tables([dict(name="s", vip=ip("10.96.0.1"), port=80, proto=6, backends=[(ip("10.244.1.2"), 8080)]),
                          dict(name="u", vip=ip("10.96.0.1"), port=53, proto=17, backends=[(ip("10.244.1.2"), 5353)])],
                         vips=[ip("10.96.0.1")])
    return _fastpath.Dataplane(ip("169.254.100.1"), tables=t, max_flows=64)


def test_partial_checksum_tracks_addresses_only():
    dp = dataplane()
    for pkt in (IP(src="192.168.50.2", dst="10.96.0.1") / TCP(sport=40000, dport=80, flags="S") / (b"x" * 1000),
                IP(src="192.168.50.2", dst="10.96.0.1") / UDP(sport=40000, dport=53) / (b"q" * 77)):
        b, ihl, off = partial(pkt)
        verdict, _, out = dp.process(b, 1, partial=True)
        assert verdict == "forward"
        o = IP(out)
        got = struct.unpack_from("!H", out, ihl + off)[0]
        assert got == pseudo_sum(ip(o.src), ip(o.dst), o.proto, len(out) - ihl)
        # what the kernel then completes is a valid checksum
        full = IP(out)
        l4 = full[TCP] if full.proto == 6 else full[UDP]
        mine = l4.chksum
        del l4.chksum
        assert IP(raw(full)).chksum == o.chksum
        assert mine != 0


def test_ip_header_checksum_always_full():
    dp = dataplane()
    b, _, _ = partial(IP(src="192.168.50.2", dst="10.96.0.1") / TCP(sport=40001, dport=80, flags="S"))
    _, _, out = dp.process(b, 1, partial=True)
    o = IP(out)
    c = o.chksum
    del o.chksum
    assert IP(raw(o)).chksum == c
