# Incremental Internet checksum updates (RFC 1624: HC' = ~(~HC + ~m + m')).
# All values are raw (network-order) 16/32-bit loads; see pkt.pxd.

cdef inline uint32_t csum_fold32(uint32_t s) noexcept nogil:
    s = (s & 0xffff) + (s >> 16)
    s = (s & 0xffff) + (s >> 16)
    return s

cdef inline uint16_t csum_replace2(uint16_t check, uint16_t old, uint16_t new) noexcept nogil:
    cdef uint32_t s = (<uint16_t>~check) + (<uint16_t>~old) + <uint32_t>new
    return <uint16_t>~csum_fold32(s)

cdef inline uint16_t csum_replace4(uint16_t check, uint32_t old, uint32_t new) noexcept nogil:
    cdef uint32_t s = (<uint16_t>~check)
    s += (<uint16_t>~(old & 0xffff)) + (<uint16_t>~(old >> 16))
    s += (new & 0xffff) + (new >> 16)
    return <uint16_t>~csum_fold32(s)

# Full checksum over a buffer (only for packets we build ourselves: ICMP errors).
cdef inline uint16_t csum_full(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t s = 0
    cdef Py_ssize_t i = 0
    cdef uint16_t w
    while i + 1 < n:
        memcpy(&w, p + i, 2)
        s += w
        i += 2
    if i < n:
        w = 0
        memcpy(&w, p + i, 1)
        s += w
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return <uint16_t>~s
