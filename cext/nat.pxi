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


cdef inline int snat_try(Dataplane dp, flow_key_t *rk, uint32_t port, uint32_t now,
                         int64_t *victim, uint16_t *victim_port) noexcept nogil:
    """Whether masquerade port `port` is free for rk (1) or taken (0). A
    flow that holds it but has expired is removed (its port is free); the
    first half-open holder seen is remembered as the victim to reclaim."""
    cdef int64_t ref
    cdef ct_entry_t *e
    rk.dport = htons(<uint16_t>port)
    ref = ct_find(&dp.ct, rk)
    if ref < 0:
        return 1
    e = &dp.ct.entries[ref >> 1]
    if e.expires <= now:
        ct_remove(&dp.ct, <uint32_t>(ref >> 1))
        dp.cnt[C_FLOWS_EXPIRED] += 1
        return 1
    if victim[0] < 0 and state_unestablished(e.state):
        victim[0] = ref >> 1
        victim_port[0] = <uint16_t>port
    return 0


cdef inline bint snat_port(Dataplane dp, flow_key_t *rk, uint16_t client_port, uint16_t hint,
                           uint32_t now) noexcept nogil:
    """Picks rk.dport, a masquerade port for a new flow from rk's backend.
    A backend keeps TIME_WAIT sockets of earlier connections, and refuses a
    SYN on such a tuple unless it continues the same client connection's
    lineage. So, in order:
      1. hint, the port of the flow this one reopens (the same client tuple);
      2. the client's own port, as the kernel's plain masquerade keeps it;
      3. a search from a random start, within PORT_TRIES.
    Only ports in the range and congruent to the client's port modulo
    tun_queues = q qualify (the steering program then puts both directions
    on one queue). A holder that has expired is reclaimed at once; under
    pressure (RECLAIM_AFTER search tries taken) the first half-open holder
    seen is evicted and its port taken: a SYN flood cannot hold the port
    space. False: every port tried is held by a live, established flow."""
    cdef uint32_t q = dp.tun_queues if dp.tun_queues else 1
    cdef uint32_t first, count, start, i, port
    cdef uint32_t lo = dp.port_lo, hi = dp.port_lo + dp.port_range - 1
    cdef uint32_t cport = ntohs(client_port)
    cdef int64_t victim = -1
    cdef uint16_t victim_port = 0
    if hint >= lo and hint <= hi and (hint % q) == (cport % q):
        if snat_try(dp, rk, hint, now, &victim, &victim_port):
            return True
    if cport >= lo and cport <= hi and cport != hint:
        if snat_try(dp, rk, cport, now, &victim, &victim_port):
            return True
    # the ports of the range congruent to the client's: first, first + q, ... count of them
    first = lo + (cport % q + q - lo % q) % q
    count = (hi - first) // q + 1 if first <= hi else 0
    if count:
        start = xorshift32(&dp.rng) % count
        for i in range(PORT_TRIES if PORT_TRIES < count else count):
            port = first + ((start + i) % count) * q
            if snat_try(dp, rk, port, now, &victim, &victim_port):
                return True
            if victim >= 0 and i + 1 >= RECLAIM_AFTER:
                break
    if victim < 0:
        return False
    ct_remove(&dp.ct, <uint32_t>victim)
    dp.cnt[C_FLOWS_EVICTED] += 1
    rk.dport = htons(victim_port)
    return True
