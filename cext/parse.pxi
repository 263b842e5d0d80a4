# Parse once: every length check of a packet, in the order that decides its
# drop reason (engine/refpath.py checks in the same order). The view it fills
# is what the batch stages and the packet path then read, freely.

cdef inline void pkt_parse(pkt_t *v, uint8_t *p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t ihl, doff
    cdef uint8_t *l4
    v.p = p
    v.n = n
    v.hash = 0
    v.th = 0
    v.reason = R_MALFORMED
    if n < IP_MIN_HLEN:
        return
    if (p[IP_VER_IHL] >> 4) != 4:
        v.reason = R_UNSUPPORTED
        return
    ihl = (p[IP_VER_IHL] & 0x0f) * 4
    v.tot = be16(p + IP_TOTLEN)
    if ihl < IP_MIN_HLEN or v.tot < ihl or v.tot > n:
        return
    if be16(p + IP_FRAG) & 0x3fff:          # MF set or offset != 0
        v.reason = R_FRAGMENT
        return
    v.proto = p[IP_PROTO]
    l4 = v.l4 = p + ihl
    v.l4len = v.tot - ihl
    if v.proto == PROTO_TCP:
        if v.l4len < TCP_MIN_HLEN:
            return
        doff = (l4[TCP_DOFF] >> 4) * 4
        if doff < TCP_MIN_HLEN or doff > v.l4len:
            return
        v.th = l4[TCP_FLAGS]
    elif v.proto == PROTO_UDP:
        if v.l4len < UDP_HLEN or be16(l4 + UDP_LEN) < UDP_HLEN or be16(l4 + UDP_LEN) > v.l4len:
            return
    elif v.proto == PROTO_ICMP:
        if v.l4len >= ICMP_HLEN:
            v.reason = R_NONE
        return
    else:
        v.reason = R_UNSUPPORTED
        return
    v.key.saddr = ld32(p + IP_SRC)
    v.key.daddr = ld32(p + IP_DST)
    v.key.sport = ld16(l4 + L4_SPORT)
    v.key.dport = ld16(l4 + L4_DPORT)
    v.key.proto = v.proto
    v.key.family = 4
    v.key.pad = 0
    v.hash = flow_hash(&v.key)
    v.reason = R_NONE


cdef inline bint pkt_may_open(const pkt_t *v) noexcept nogil:
    """A checked packet that may open a flow: a TCP SYN (no ACK), or UDP."""
    if v.reason != R_NONE:
        return False
    if v.proto == PROTO_TCP:
        return (v.th & (TH_SYN | TH_ACK)) == TH_SYN
    return v.proto == PROTO_UDP
