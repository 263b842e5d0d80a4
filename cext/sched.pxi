# Schedulers: which backend a new flow of a service port goes to (IPVS names:
# SCHEDULER_IDS), and sessionAffinity: ClientIP on top of any of them.

cdef inline backend_t *schedule(Dataplane dp, Tables t, svcport_t *sv, const flow_key_t *k,
                                uint32_t now) noexcept nogil:
    """The backend for a new flow of sv (backend_count > 0)."""
    cdef uint32_t n = sv.backend_count, i, j, start, idx = 0xffffffffU
    cdef backend_t *bs = t.backends + sv.backend_start
    cdef aff_t *a = NULL
    cdef uint32_t *act = dp.ct.active
    if sv.flags & SVCPORT_F_AFFINITY:
        a = aff_slot(dp, sv.id, k.saddr, now)
        if a.svcport == sv.id + 1 and a.client == k.saddr:
            for i in range(n):
                if bs[i].addr == a.addr and bs[i].port == a.port:
                    idx = i
                    break
    if idx == 0xffffffffU:
        if sv.scheduler == SCHED_RR:
            idx = sv.rr % n
            sv.rr += 1
        elif sv.scheduler == SCHED_LC:
            # fewest flows, ties broken from a random start
            start = xorshift32(&dp.rng) % n
            idx = start
            for j in range(1, n):
                i = (start + j) % n
                if act[bs[i].id] < act[bs[idx].id]:
                    idx = i
        elif sv.scheduler == SCHED_SH:
            idx = mix64(k.saddr) % n
        elif sv.scheduler == SCHED_MH:
            idx = t.mh[sv.mh_start + mix64((<uint64_t>k.saddr << 16) | k.sport) % sv.mh_size]
        else:
            idx = xorshift32(&dp.rng) % n
    if a != NULL:
        a.svcport = sv.id + 1
        a.client = k.saddr
        a.addr = bs[idx].addr
        a.port = bs[idx].port
        a.expires = now + sv.affinity_timeout
    return &bs[idx]


cdef inline aff_t *aff_slot(Dataplane dp, uint32_t svcport, uint32_t client, uint32_t now) noexcept nogil:
    """The live affinity slot of (service port, client), else the slot to take
    for it: the first empty or expired one within AFF_PROBE (empty preferred),
    else the live one that expires first."""
    cdef uint64_t h = mix64((<uint64_t>svcport << 32) | client) & dp.aff_mask
    cdef aff_t *a
    cdef aff_t *victim = NULL
    cdef uint32_t i
    for i in range(AFF_PROBE):
        a = &dp.aff[(h + i) & dp.aff_mask]
        if a.svcport == svcport + 1 and a.client == client:
            if a.expires > now:
                return a
            a.svcport = 0               # expired: as good as empty
        if a.svcport == 0 or a.expires <= now:
            if victim == NULL or victim.svcport != 0:
                victim = a
        elif victim == NULL or (victim.svcport != 0 and a.expires < victim.expires):
            victim = a
    victim.svcport = 0
    return victim


cdef int maglev_fill(uint16_t *ring, uint32_t M, backend_t *bs, uint32_t n) except -1:
    """Maglev lookup table (Eisenbud et al., NSDI'16, section 3.4): each
    backend walks its own permutation of the M slots and claims the next free
    one in turn, so each gets ~M/n slots and losing one backend moves only
    the slots it held."""
    cdef uint32_t *offset = <uint32_t *>malloc(n * sizeof(uint32_t))
    cdef uint32_t *skip = <uint32_t *>malloc(n * sizeof(uint32_t))
    cdef uint32_t *nxt = <uint32_t *>calloc(n, sizeof(uint32_t))
    cdef uint32_t i, filled = 0, c
    cdef uint64_t key
    if not offset or not skip or not nxt:
        free(offset); free(skip); free(nxt)
        raise MemoryError()
    for i in range(n):
        key = (<uint64_t>ntohl(bs[i].addr) << 16) | ntohs(bs[i].port)
        offset[i] = mix64(key ^ 0x6d61676c6576ULL) % M
        skip[i] = mix64(key ^ 0x736b6970ULL) % (M - 1) + 1
    for i in range(M):
        ring[i] = 0xffff
    while True:
        for i in range(n):
            c = (offset[i] + <uint64_t>nxt[i] * skip[i]) % M
            while ring[c] != 0xffff:
                nxt[i] += 1
                c = (offset[i] + <uint64_t>nxt[i] * skip[i]) % M
            ring[c] = <uint16_t>i
            nxt[i] += 1
            filled += 1
            if filled == M:
                free(offset); free(skip); free(nxt)
                return 0


def maglev_table(backends, uint32_t size=MAGLEV_SLOTS):
    """The Maglev ring for [(addr int, port)] as a list of backend indexes
    (for tests and the reference path)."""
    cdef uint32_t n = len(backends), i
    if n == 0 or n > 65535:
        raise ValueError("1..65535 backends")
    if size < 2 or any(size % d == 0 for d in range(2, int(size ** 0.5) + 1)):
        raise ValueError("the Maglev table size must be a prime")
    cdef backend_t *bs = <backend_t *>calloc(n, sizeof(backend_t))
    cdef uint16_t *ring = <uint16_t *>malloc(size * sizeof(uint16_t))
    try:
        for i, (addr, port) in enumerate(backends):
            bs[i].addr = htonl(addr)
            bs[i].port = htons(port)
        maglev_fill(ring, size, bs, n)
        return [ring[i] for i in range(size)]
    finally:
        free(bs)
        free(ring)


