# NAT: the masquerade port of a new flow, and the rewrite of a packet's
# addresses and ports with incremental checksum updates (RFC 1624).

cdef inline void nat_rewrite(uint8_t *p, uint8_t *l4, uint8_t proto,
                             uint32_t nsrc, uint16_t nsport,
                             uint32_t ndst, uint16_t ndport, bint partial) noexcept nogil:
    # partial: the packet came with VIRTIO_NET_HDR_F_NEEDS_CSUM, so the L4
    # checksum field holds the folded pseudo-header sum, not complemented:
    # adjust it for the addresses only (ports are summed later by whoever
    # completes the checksum). The IPv4 header checksum is always updated.
    cdef uint32_t osrc = ld32(p + IP_SRC), odst = ld32(p + IP_DST)
    cdef uint16_t osport = ld16(l4 + L4_SPORT), odport = ld16(l4 + L4_DPORT)
    cdef uint16_t c = ld16(p + IP_CSUM)
    cdef int off = TCP_CSUM if proto == PROTO_TCP else UDP_CSUM
    c = csum_replace4(c, osrc, nsrc)
    c = csum_replace4(c, odst, ndst)
    st16(p + IP_CSUM, c)
    st32(p + IP_SRC, nsrc)
    st32(p + IP_DST, ndst)
    c = ld16(l4 + off)
    if partial:
        c = <uint16_t>~csum_replace4(<uint16_t>~c, osrc, nsrc)
        c = <uint16_t>~csum_replace4(<uint16_t>~c, odst, ndst)
        st16(l4 + off, c)
    elif not (proto == PROTO_UDP and c == 0):   # UDP checksum 0: none, keep it so
        c = csum_replace4(c, osrc, nsrc)
        c = csum_replace4(c, odst, ndst)
        c = csum_replace2(c, osport, nsport)
        c = csum_replace2(c, odport, ndport)
        if proto == PROTO_UDP and c == 0:
            c = 0xffff
        st16(l4 + off, c)
    st16(l4 + L4_SPORT, nsport)
    st16(l4 + L4_DPORT, ndport)


cdef inline bint snat_port(Dataplane dp, flow_key_t *rk, uint16_t client_port) noexcept nogil:
    """Picks rk.dport: a masquerade port no flow from rk's backend uses,
    starting at random, within PORT_TRIES. With tun_queues = q > 1 only
    the ports congruent to the client's port modulo q qualify (the steering
    program then puts both directions on one queue). False: none free."""
    cdef uint32_t q = dp.tun_queues if dp.tun_queues else 1
    cdef uint32_t first, count, start, i, port
    # the ports of the range congruent to the client's: first, first + q, ... count of them
    first = dp.port_lo + (ntohs(client_port) % q + q - dp.port_lo % q) % q
    count = (dp.port_lo + dp.port_range - 1 - first) // q + 1 if first < dp.port_lo + dp.port_range else 0
    if count == 0:
        return False
    start = xorshift32(&dp.rng) % count
    for i in range(PORT_TRIES if PORT_TRIES < count else count):
        port = first + ((start + i) % count) * q
        rk.dport = htons(<uint16_t>port)
        if ct_find(&dp.ct, rk) < 0:
            return True
    return False
