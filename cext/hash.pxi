# Hashing and the packet path's random numbers. Hashes are observable (the
# sh and mh schedulers, the Maglev ring, the affinity table): engine/refpath.py
# computes the same ones on the same raw values.

cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    # splitmix64 finalizer: cheap and spreads nearby keys over the table
    x ^= x >> 30
    x *= 0xbf58476d1ce4e5b9ULL
    x ^= x >> 27
    x *= 0x94d049bb133111ebULL
    x ^= x >> 31
    return x


cdef inline uint64_t flow_hash(const flow_key_t *k) noexcept nogil:
    cdef uint64_t a = (<uint64_t>k.saddr << 32) | k.daddr
    cdef uint64_t b = (<uint64_t>k.sport << 32) | (<uint64_t>k.dport << 16) | k.proto
    return mix64(a ^ mix64(b))


cdef inline uint64_t svcport_key(uint32_t addr, uint16_t port, uint8_t proto) noexcept nogil:
    return (<uint64_t>addr << 32) | (<uint64_t>port << 8) | proto


cdef inline uint32_t xorshift32(uint32_t *s) noexcept nogil:
    cdef uint32_t x = s[0]
    x ^= x << 13
    x ^= x >> 17
    x ^= x << 5
    s[0] = x
    return x
