# Header views for the fast path: named offsets (RFC 791, 793, 768, 792) and
# unaligned loads/stores. Values are kept in network byte order exactly as
# they sit in the packet ("raw"); one's-complement checksum arithmetic does not
# care about byte order, so raw values can be summed and hashed directly.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

# IPv4 header
cdef enum:
    IP_VER_IHL = 0
    IP_TOS = 1
    IP_TOTLEN = 2
    IP_ID = 4
    IP_FRAG = 6
    IP_TTL = 8
    IP_PROTO = 9
    IP_CSUM = 10
    IP_SRC = 12
    IP_DST = 16
    IP_MIN_HLEN = 20

# TCP / UDP / ICMP headers, offsets from the start of the L4 header
cdef enum:
    L4_SPORT = 0
    L4_DPORT = 2
    TCP_FLAGS = 13
    TCP_DOFF = 12
    TCP_CSUM = 16
    TCP_MIN_HLEN = 20
    UDP_LEN = 4
    UDP_CSUM = 6
    UDP_HLEN = 8
    ICMP_TYPE = 0
    ICMP_CODE = 1
    ICMP_CSUM = 2
    ICMP_ID = 4
    ICMP_HLEN = 8

cdef enum:
    PROTO_ICMP = 1
    PROTO_TCP = 6
    PROTO_UDP = 17

cdef enum:
    TH_FIN = 0x01
    TH_SYN = 0x02
    TH_RST = 0x04
    TH_ACK = 0x10


cdef inline uint16_t ld16(const uint8_t *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v

cdef inline uint32_t ld32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v

cdef inline void st16(uint8_t *p, uint16_t v) noexcept nogil:
    memcpy(p, &v, 2)

cdef inline void st32(uint8_t *p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)

# Big-endian reads for the few fields we interpret numerically.
cdef inline uint16_t be16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]
