"""IPv4 packets built by hand, and the Internet checksum (RFC 1071): the one
packet builder the unit tests, the fuzzer (engine/lab/fuzz.py) and the lab share.

Addresses are host-order ints, as the fast path's API takes them. Standard
library only, so a snippet the lab runs in a namespace can use it too. (The
fast path and engine/refpath.py keep checksums of their own: they are what
these check.)
"""
from __future__ import annotations

import struct
import sys

_LITTLE = sys.byteorder == "little"

PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17


# --- checksums -----------------------------------------------------------------------

def fold(s):
    """A sum of 16-bit words folded into 16 bits (end-around carry)."""
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return s


def sum16(data):
    """Folded one's complement sum of data as big-endian 16-bit words (an odd
    length is padded with a zero byte)."""
    data = bytes(data)
    if len(data) & 1:
        data += b"\0"
    s = fold(sum(memoryview(data).cast("H")))
    return ((s & 0xff) << 8) | (s >> 8) if _LITTLE else s


def csum(data):
    """The Internet checksum of data: 0 when data carries a valid one."""
    return ~sum16(data) & 0xffff


def csum_ok(data):
    return sum16(data) == 0xffff


def pseudo(src, dst, proto, length):
    """The TCP/UDP pseudo-header."""
    return struct.pack("!IIBBH", src, dst, 0, proto, length & 0xffff)


def pseudo_sum(src, dst, proto, length):
    """Folded, uncomplemented pseudo-header sum: what CHECKSUM_PARTIAL
    (virtio-net NEEDS_CSUM) leaves in the L4 checksum field."""
    return sum16(pseudo(src, dst, proto, length))


# --- builders ------------------------------------------------------------------------

def ipv4(src, dst, proto, payload, ttl=64, ident=1, frag=0x4000, tos=0, options=b""):
    """An IPv4 datagram with a valid header checksum (DF set by default)."""
    options = options + b"\0" * (-len(options) % 4)
    ihl = 5 + len(options) // 4
    hdr = bytearray(struct.pack("!BBHHHBBHII", 0x40 | ihl, tos, ihl * 4 + len(payload), ident, frag,
                                ttl, proto, 0, src, dst) + options)
    struct.pack_into("!H", hdr, 10, csum(hdr))
    return bytes(hdr) + payload


def tcp(src, dst, sport, dport, flags, seq=1000, ack=0, payload=b"", options=b"", window=64240, **ipkw):
    """IPv4 + TCP with valid checksums; flags as an int (0x02 SYN, 0x10 ACK ...)."""
    options = options + b"\1" * (-len(options) % 4)
    doff = 5 + len(options) // 4
    h = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window, 0, 0)
                  + options + payload)
    struct.pack_into("!H", h, 16, csum(pseudo(src, dst, PROTO_TCP, len(h)) + h))
    return ipv4(src, dst, PROTO_TCP, bytes(h), **ipkw)


def udp(src, dst, sport, dport, payload=b"query", zero_csum=False, **ipkw):
    """IPv4 + UDP; zero_csum: no checksum (0), else a valid one (0xffff for 0)."""
    h = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    if not zero_csum:
        c = csum(pseudo(src, dst, PROTO_UDP, len(h)) + h)
        struct.pack_into("!H", h, 6, c or 0xffff)
    return ipv4(src, dst, PROTO_UDP, bytes(h), **ipkw)


def icmp_message(typ, code, rest=b"\0\0\0\0", payload=b""):
    """An ICMP message (header + payload) with a valid checksum, no IP header:
    what a raw ICMP socket sends."""
    h = bytearray(struct.pack("!BBH", typ, code, 0) + rest + payload)
    struct.pack_into("!H", h, 2, csum(h))
    return bytes(h)


def icmp(src, dst, typ, code, rest=b"\0\0\0\0", payload=b"", **ipkw):
    """IPv4 + ICMP with valid checksums."""
    return ipv4(src, dst, PROTO_ICMP, icmp_message(typ, code, rest, payload), **ipkw)


def echo_request(ident, seq, payload=b""):
    """An ICMP echo request message (for a raw socket)."""
    return icmp_message(8, 0, struct.pack("!HH", ident, seq), payload)


# --- rewriting -----------------------------------------------------------------------

def be16(b, off):
    return (b[off] << 8) | b[off + 1]


def be32(b, off):
    return int.from_bytes(b[off:off + 4], "big")


def fix_ip_csum(b):
    """Recomputes the IPv4 header checksum of bytearray b in place, where the
    header fits."""
    if len(b) >= 20:
        ihl = (b[0] & 15) * 4
        if 20 <= ihl <= len(b):
            b[10] = b[11] = 0
            struct.pack_into("!H", b, 10, csum(b[:ihl]))


def fix_l4_csum(b):
    """Recomputes the TCP/UDP/ICMP checksum of bytearray b in place, where
    the datagram fits (a UDP checksum of 0, none, stays 0)."""
    if len(b) < 20:
        return
    ihl, tot, proto = (b[0] & 15) * 4, be16(b, 2), b[9]
    if ihl < 20 or tot > len(b) or tot < ihl:
        return
    src, dst = be32(b, 12), be32(b, 16)
    l4 = ihl
    if proto == PROTO_TCP and tot - ihl >= 20:
        b[l4 + 16] = b[l4 + 17] = 0
        struct.pack_into("!H", b, l4 + 16, csum(pseudo(src, dst, PROTO_TCP, tot - ihl) + b[l4:tot]))
    elif proto == PROTO_UDP and tot - ihl >= 8:
        ulen = be16(b, l4 + 4)
        if 8 <= ulen <= tot - ihl and be16(b, l4 + 6) != 0:
            b[l4 + 6] = b[l4 + 7] = 0
            struct.pack_into("!H", b, l4 + 6, csum(pseudo(src, dst, PROTO_UDP, ulen) + b[l4:l4 + ulen]) or 0xffff)
    elif proto == PROTO_ICMP and tot - ihl >= 4:
        b[l4 + 2] = b[l4 + 3] = 0
        struct.pack_into("!H", b, l4 + 2, csum(b[l4:tot]))


def to_partial(b, l4len=None):
    """Datagram b as the kernel hands it over with CHECKSUM_PARTIAL: the L4
    checksum field holds the pseudo-header sum over l4len bytes (default:
    the UDP length field for UDP, total length - header for TCP)."""
    b = bytearray(b)
    ihl, tot, proto = (b[0] & 15) * 4, be16(b, 2), b[9]
    if proto == PROTO_TCP:
        n = tot - ihl if l4len is None else l4len
        struct.pack_into("!H", b, ihl + 16, pseudo_sum(be32(b, 12), be32(b, 16), PROTO_TCP, n))
    elif proto == PROTO_UDP:
        n = be16(b, ihl + 4) if l4len is None else l4len
        struct.pack_into("!H", b, ihl + 6, pseudo_sum(be32(b, 12), be32(b, 16), PROTO_UDP, n))
    return bytes(b)
