# ICMP: port unreachables the engine sends (rate-limited), echo replies from
# service addresses, and errors about tracked flows translated on to the
# flow's other end (RFC 5508 section 5 as NAT devices do it).

# The datagram an ICMP error quotes: checked, and the flow key it names.
ctypedef struct quote_t:
    uint8_t *ip                 # its IPv4 header
    uint8_t *l4                 # its first 8 bytes of TCP or UDP at least
    Py_ssize_t len              # bytes quoted from ip on
    Py_ssize_t ihl
    uint32_t src, dst           # raw, as quoted
    flow_key_t reply            # the reverse of the quoted packet: what a flow's tuple holds


cdef inline Py_ssize_t build_port_unreachable(uint8_t *p, Py_ssize_t tot) noexcept nogil:
    """Replaces the datagram at p (tot bytes) with an ICMP port unreachable
    from its destination to its source, quoting it; returns the new length."""
    cdef uint8_t quote[ICMP_QUOTE_MAX]
    cdef Py_ssize_t q = tot if tot < ICMP_QUOTE_MAX else ICMP_QUOTE_MAX
    cdef Py_ssize_t n = IP_MIN_HLEN + ICMP_HLEN + q
    cdef uint32_t src = ld32(p + IP_DST), dst = ld32(p + IP_SRC)
    cdef uint8_t *ic = p + IP_MIN_HLEN
    memcpy(quote, p, q)
    p[0] = 0x45
    p[1] = 0xc0
    p[2] = <uint8_t>(n >> 8)
    p[3] = <uint8_t>(n & 0xff)
    p[4] = 0; p[5] = 0; p[6] = 0; p[7] = 0
    p[IP_TTL] = 64
    p[IP_PROTO] = PROTO_ICMP
    st16(p + IP_CSUM, 0)
    st32(p + IP_SRC, src)
    st32(p + IP_DST, dst)
    ic[ICMP_TYPE] = 3               # destination unreachable
    ic[ICMP_CODE] = 3               # port unreachable
    st16(ic + ICMP_CSUM, 0)
    st32(ic + 4, 0)
    memcpy(ic + ICMP_HLEN, quote, q)
    st16(ic + ICMP_CSUM, csum_full(ic, ICMP_HLEN + q))
    st16(p + IP_CSUM, csum_full(p, IP_MIN_HLEN))
    return n


cdef inline uint32_t icmp_source_slot(uint32_t raw_src) noexcept nogil:
    """The budget slot of a source address (raw): a multiplicative hash."""
    return ((raw_src * 2654435761U) & 0xffffffffU) >> (32 - 10)      # 10 bits: ICMP_SOURCE_SLOTS


cdef inline int reject(Dataplane dp, pkt_t *v, uint32_t now, Py_ssize_t *outlen) noexcept nogil:
    """Refuses the packet with a port unreachable, as the kernel would."""
    cdef uint8_t *p = v.p
    # no ICMP error to 0/8, loopback, multicast or broadcast sources
    if p[IP_SRC] == 0 or p[IP_SRC] == 127 or p[IP_SRC] >= 224:
        return drop(dp, R_MARTIAN)
    # at most icmp_rate errors a second: refused clients still see
    # "connection refused" at once, but the engine is no reflector; and at
    # most icmp_source_rate to one source (as the kernel's icmp_ratelimit
    # works per destination host), so one flooding source cannot spend the
    # whole budget and leave the others to time out
    cdef uint32_t src = ld32(p + IP_SRC)
    cdef icmp_budget_t *b = &dp.icmp_sources[icmp_source_slot(src)]
    if b.addr != src or b.second != now:
        b.addr = src
        b.second = now
        b.tokens = dp.icmp_source_rate
    if now != dp.icmp_second:
        dp.icmp_second = now
        dp.icmp_tokens = dp.icmp_rate
    if b.tokens == 0 or dp.icmp_tokens == 0:
        return drop(dp, R_ICMP_RATE)
    b.tokens -= 1
    dp.icmp_tokens -= 1
    dp.cnt[C_REJECTS] += 1
    outlen[0] = build_port_unreachable(p, v.tot)
    return V_REPLY


cdef inline int unmatched(Dataplane dp, Tables t, uint32_t daddr) noexcept nogil:
    """Drop reason for a packet that opens nothing and matches no flow."""
    if daddr == dp.masq:
        return R_SPOOFED
    if t.in_drop_cidrs(daddr):
        return R_UNALLOCATED
    return R_NO_SERVICE


cdef inline int icmp_in(Dataplane dp, Tables t, pkt_t *v, uint32_t now, Py_ssize_t *outlen) noexcept nogil:
    """A checked ICMP message (at least its 8-byte header)."""
    cdef uint8_t typ = v.l4[ICMP_TYPE]
    if typ == 8:
        return icmp_echo(dp, t, v, outlen)
    if typ == 3 or typ == 11 or typ == 12:     # unreachable, time exceeded, parameter problem
        return icmp_error(dp, t, v, now, outlen)
    return drop(dp, R_UNSUPPORTED)


cdef inline int icmp_echo(Dataplane dp, Tables t, pkt_t *v, Py_ssize_t *outlen) noexcept nogil:
    """An echo request to a live service address is answered (as IPVS mode's
    bound VIPs are), in place."""
    cdef uint8_t *p = v.p
    cdef uint8_t *l4 = v.l4
    cdef uint32_t osrc = ld32(p + IP_SRC), odst = ld32(p + IP_DST)
    cdef uint16_t w
    if l4[ICMP_CODE] != 0 or not t.is_vip(odst):
        return drop(dp, unmatched(dp, t, odst))
    st32(p + IP_SRC, odst)              # swapping words keeps the header sum
    st32(p + IP_DST, osrc)
    w = ld16(l4 + ICMP_TYPE)
    l4[ICMP_TYPE] = 0
    st16(l4 + ICMP_CSUM, csum_replace2(ld16(l4 + ICMP_CSUM), w, ld16(l4 + ICMP_TYPE)))
    w = ld16(p + IP_TTL)
    p[IP_TTL] = 64
    st16(p + IP_CSUM, csum_replace2(ld16(p + IP_CSUM), w, ld16(p + IP_TTL)))
    outlen[0] = v.tot
    return V_REPLY


cdef inline int icmp_quote_parse(const pkt_t *v, quote_t *q) noexcept nogil:
    """Checks the quoted datagram (one we sent, so already translated) and
    fills q; returns R_NONE or the drop reason."""
    q.ip = v.l4 + ICMP_HLEN
    q.len = v.l4len - ICMP_HLEN
    if q.len < IP_MIN_HLEN or (q.ip[IP_VER_IHL] >> 4) != 4:
        return R_MALFORMED
    q.ihl = (q.ip[IP_VER_IHL] & 0x0f) * 4
    if q.ihl < IP_MIN_HLEN or q.len < q.ihl + 8:
        return R_MALFORMED
    if q.ip[IP_PROTO] != PROTO_TCP and q.ip[IP_PROTO] != PROTO_UDP:
        return R_UNSUPPORTED
    q.l4 = q.ip + q.ihl
    q.src = ld32(q.ip + IP_SRC)
    q.dst = ld32(q.ip + IP_DST)
    q.reply.saddr = q.dst
    q.reply.daddr = q.src
    q.reply.sport = ld16(q.l4 + L4_DPORT)
    q.reply.dport = ld16(q.l4 + L4_SPORT)
    q.reply.proto = q.ip[IP_PROTO]
    q.reply.family = 4
    q.reply.pad = 0
    return R_NONE


cdef inline uint16_t icmp_quote_restore(quote_t *q, const flow_key_t *K, uint16_t ic) noexcept nogil:
    """Rewrites the quoted header back to K, what its sender sent; each
    change also goes into the ICMP checksum ic (which covers the quote).
    Returns the new ICMP checksum."""
    cdef uint8_t *ip = q.ip
    cdef uint8_t *l4 = q.l4
    cdef uint8_t proto = q.reply.proto
    cdef uint16_t c, ipc = ld16(ip + IP_CSUM)
    cdef int csoff
    c = csum_replace4(csum_replace4(ipc, q.src, K.saddr), q.dst, K.daddr)
    ic = csum_replace2(ic, ipc, c)
    st16(ip + IP_CSUM, c)
    ic = csum_replace4(csum_replace4(ic, q.src, K.saddr), q.dst, K.daddr)
    st32(ip + IP_SRC, K.saddr)
    st32(ip + IP_DST, K.daddr)
    csoff = TCP_CSUM if proto == PROTO_TCP else UDP_CSUM
    if q.len >= q.ihl + csoff + 2:            # the L4 checksum is quoted
        c = ld16(l4 + csoff)
        if not (proto == PROTO_UDP and c == 0):
            c = csum_replace4(csum_replace4(c, q.src, K.saddr), q.dst, K.daddr)
            c = csum_replace2(csum_replace2(c, ld16(l4 + L4_SPORT), K.sport), ld16(l4 + L4_DPORT), K.dport)
            if proto == PROTO_UDP and c == 0:
                c = 0xffff
            ic = csum_replace2(ic, ld16(l4 + csoff), c)
            st16(l4 + csoff, c)
    ic = csum_replace2(csum_replace2(ic, ld16(l4 + L4_SPORT), K.sport), ld16(l4 + L4_DPORT), K.dport)
    st16(l4 + L4_SPORT, K.sport)
    st16(l4 + L4_DPORT, K.dport)
    return ic


cdef inline int icmp_error(Dataplane dp, Tables t, pkt_t *v, uint32_t now, Py_ssize_t *outlen) noexcept nogil:
    """An error about a tracked flow (unreachable, frag needed, time exceeded,
    parameter problem) is translated, quote included, and sent on to the
    flow's other end."""
    cdef uint8_t *p = v.p
    cdef quote_t q
    cdef int64_t ref
    cdef ct_entry_t *e
    cdef const flow_key_t *K
    cdef uint32_t osrc = ld32(p + IP_SRC), odst = ld32(p + IP_DST)
    cdef uint16_t c
    cdef int reason = icmp_quote_parse(v, &q)
    if reason != R_NONE:
        return drop(dp, reason)
    ref = ct_find(&dp.ct, &q.reply)
    # the error must be about a live flow and addressed to the quoted sender
    if ref < 0 or dp.ct.entries[ref >> 1].expires <= now or odst != q.src:
        return drop(dp, unmatched(dp, t, odst))
    e = &dp.ct.entries[ref >> 1]
    K = &e.key[1 - (ref & 1)]               # the packet as its sender sent it
    st16(v.l4 + ICMP_CSUM, icmp_quote_restore(&q, K, ld16(v.l4 + ICMP_CSUM)))
    # outer: to the sender; from the far end's public face if it was the far end
    c = ld16(p + IP_CSUM)
    if osrc == q.dst:
        c = csum_replace4(c, osrc, K.daddr)
        st32(p + IP_SRC, K.daddr)
    c = csum_replace4(c, odst, K.saddr)
    st32(p + IP_DST, K.saddr)
    st16(p + IP_CSUM, c)
    svcport_count(dp, e.svcport, v.tot)
    outlen[0] = v.tot
    return V_FORWARD
