# Flow table: one preallocated array of entries, each holding both tuples of a
# flow (original: client -> VIP, reply: backend -> masquerade address), and one
# open-addressing index (linear probing, backward-shift delete, <= 50% load)
# in which each entry appears twice, once per direction. A slot holds the
# entry reference and 32 bits of the key's hash, so a mismatching probe rarely
# touches the entry. Expiry is lazy on lookup plus an incremental clock sweep.

cdef inline bint key_eq(const flow_key_t *a, const flow_key_t *b) noexcept nogil:
    return (a.saddr == b.saddr and a.daddr == b.daddr and a.sport == b.sport
            and a.dport == b.dport and a.proto == b.proto)

cdef inline bint state_unestablished(uint8_t st) noexcept nogil:
    return st == CT_SYN_SENT or st == CT_SYN_RECV or st == CT_UDP_UNREPLIED or st == CT_CLOSE


cdef void *big_alloc(size_t n) noexcept nogil:
    """Zeroed memory for a big table, on transparent huge pages where the
    kernel gives them: a lookup that misses the caches should not also miss
    the TLB (at a million flows the index and entries span ~80 MB)."""
    cdef void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if p == MAP_FAILED:
        return NULL
    if n >= (2 << 20):
        madvise(p, n, MADV_HUGEPAGE)
    return p


cdef int ct_init(conntrack_t *ct, uint32_t maxflows, uint32_t maxbackends) except -1:
    cdef uint64_t size = 16
    cdef uint32_t i
    while size < 4 * <uint64_t>maxflows:
        size <<= 1
    ct.max = maxflows              # set first: ct_free needs the sizes to unmap
    ct.mask = size - 1
    ct.entries = <ct_entry_t *>big_alloc(<size_t>maxflows * sizeof(ct_entry_t))
    ct.free_ids = <uint32_t *>malloc(maxflows * sizeof(uint32_t))
    ct.slots = <uint64_t *>big_alloc(size * sizeof(uint64_t))
    ct.active = <uint32_t *>big_alloc(<size_t>maxbackends * sizeof(uint32_t))
    ct.nactive = maxbackends
    if not ct.entries or not ct.free_ids or not ct.slots or not ct.active:
        raise MemoryError()
    ct.count = 0
    ct.hand = 0
    # lowest ids on top of the stack: allocation order is predictable in tests
    for i in range(maxflows):
        ct.free_ids[i] = maxflows - 1 - i
    ct.nfree = maxflows
    return 0

cdef void ct_free(conntrack_t *ct) noexcept nogil:
    if ct.entries != NULL:
        munmap(ct.entries, <size_t>ct.max * sizeof(ct_entry_t))
    free(ct.free_ids)
    if ct.slots != NULL:
        munmap(ct.slots, (ct.mask + 1) * sizeof(uint64_t))
    if ct.active != NULL:
        munmap(ct.active, <size_t>ct.nactive * sizeof(uint32_t))
    ct.active = NULL
    ct.entries = NULL
    ct.free_ids = NULL
    ct.slots = NULL


# Returns id*2 + dir of the matching entry, or -1.
cdef inline int64_t ct_find(conntrack_t *ct, const flow_key_t *k) noexcept nogil:
    return ct_find_h(ct, k, flow_hash(k))

# ct_find with the key's flow_hash already known (pkt_parse computes it)
cdef inline int64_t ct_find_h(conntrack_t *ct, const flow_key_t *k, uint64_t h) noexcept nogil:
    cdef uint64_t i = h & ct.mask
    cdef uint64_t tag = (h >> 32) << 32
    cdef uint64_t s
    cdef uint32_t ref
    while True:
        s = ct.slots[i]
        if s == 0:
            return -1
        if (s & 0xffffffff00000000ULL) == tag:
            ref = <uint32_t>(s & 0xffffffffU) - 1
            if key_eq(&ct.entries[ref >> 1].key[ref & 1], k):
                return ref
        i = (i + 1) & ct.mask

# Batch-staged lookup (as DPDK's bulk hash lookups do): with a million flows
# a lookup is two cache misses in a row, slot then entry. Hashing a whole
# batch first and prefetching its slots, then its entries, lets the misses of
# one batch overlap instead of queueing one after another. Hints only: a
# slot that is not the packet's flow's costs a wasted prefetch, never a
# wrong answer.
cdef inline void ct_prefetch_slot(conntrack_t *ct, uint64_t h) noexcept nogil:
    """Stage 1, no lock needed: the home slot of a flow hash."""
    prefetch(&ct.slots[h & ct.mask])

cdef inline void ct_prefetch_entries(conntrack_t *ct, const pkt_t *pkts, int n) noexcept nogil:
    """Stage 2, under the lock: the entry named by a home slot whose tag fits."""
    cdef int i
    cdef uint64_t s, h
    cdef ct_entry_t *e
    for i in range(n):
        h = pkts[i].hash
        if h:
            s = ct.slots[h & ct.mask]
            if s != 0 and (s >> 32) == (h >> 32):
                e = &ct.entries[(<uint32_t>(s & 0xffffffffU) - 1) >> 1]
                prefetch_w(e)
                prefetch_w(<uint8_t *>e + sizeof(ct_entry_t) - 1)    # 48-byte entries straddle lines

cdef inline void ct_index_add(conntrack_t *ct, uint32_t ref) noexcept nogil:
    cdef uint64_t h = flow_hash(&ct.entries[ref >> 1].key[ref & 1])
    cdef uint64_t i = h & ct.mask
    while ct.slots[i] != 0:
        i = (i + 1) & ct.mask
    ct.slots[i] = ((h >> 32) << 32) | (<uint64_t>ref + 1)

cdef inline void ct_index_flow(conntrack_t *ct, uint32_t id) noexcept nogil:
    """Indexes entry id (both keys set): both directions find it."""
    ct_index_add(ct, id * 2)
    ct_index_add(ct, id * 2 + 1)

cdef inline void ct_index_del(conntrack_t *ct, uint32_t ref) noexcept nogil:
    cdef uint64_t h = flow_hash(&ct.entries[ref >> 1].key[ref & 1])
    cdef uint64_t i = h & ct.mask
    cdef uint64_t j, home, s
    while ct.slots[i] != 0 and <uint32_t>(ct.slots[i] & 0xffffffffU) != ref + 1:
        i = (i + 1) & ct.mask
    if ct.slots[i] == 0:
        return
    # backward-shift deletion keeps probe chains intact without tombstones
    j = i
    while True:
        j = (j + 1) & ct.mask
        s = ct.slots[j]
        if s == 0:
            break
        home = flow_hash(&ct.entries[(<uint32_t>(s & 0xffffffffU) - 1) >> 1].key[(<uint32_t>(s & 0xffffffffU) - 1) & 1]) & ct.mask
        # slot j may move to i only if its home is not cyclically within (i, j]
        if i <= j:
            if i < home <= j:
                continue
        else:
            if home > i or home <= j:
                continue
        ct.slots[i] = s
        i = j
    ct.slots[i] = 0

cdef inline void ct_deactivate(conntrack_t *ct, ct_entry_t *e) noexcept nogil:
    if (e.flags & CTF_ACTIVE) and e.backend < ct.nactive and ct.active[e.backend]:
        ct.active[e.backend] -= 1
    e.flags &= ~CTF_ACTIVE

cdef inline void ct_remove(conntrack_t *ct, uint32_t id) noexcept nogil:
    ct_index_del(ct, id * 2)
    ct_index_del(ct, id * 2 + 1)
    ct_deactivate(ct, &ct.entries[id])
    ct.entries[id].state = CT_FREE
    ct.free_ids[ct.nfree] = id
    ct.nfree += 1
    ct.count -= 1

# Takes a free entry; when none is left, evicts (expired first, then an
# unestablished flow) within a bounded scan. Returns -1 when nothing can go.
cdef inline int64_t ct_alloc(conntrack_t *ct, uint32_t now, uint64_t *evicted) noexcept nogil:
    cdef uint32_t n, id, victim = 0xffffffffU
    cdef ct_entry_t *e
    if ct.nfree == 0:
        for n in range(min(ct.max, 256)):
            id = ct.hand
            ct.hand = (ct.hand + 1) % ct.max
            e = &ct.entries[id]
            if e.expires <= now:
                victim = id
                break
            if victim == 0xffffffffU and state_unestablished(e.state):
                victim = id
        if victim == 0xffffffffU:
            return -1
        ct_remove(ct, victim)
        evicted[0] += 1
    ct.nfree -= 1
    id = ct.free_ids[ct.nfree]
    ct.count += 1
    return id

# Sweeps up to `budget` entries from the clock hand, removing expired ones.
cdef inline uint32_t ct_sweep(conntrack_t *ct, uint32_t now, uint32_t budget) noexcept nogil:
    cdef uint32_t n, id, removed = 0
    if ct.count == 0:
        return 0
    for n in range(min(budget, ct.max)):
        id = ct.hand
        ct.hand = (ct.hand + 1) % ct.max
        if ct.entries[id].state != CT_FREE and ct.entries[id].expires <= now:
            ct_remove(ct, id)
            removed += 1
    return removed


cdef inline uint8_t tcp_next_state(uint8_t st, uint8_t *fl, int dir, uint8_t th) noexcept nogil:
    """The TCP state after a packet with flags th in direction dir; FINs seen
    are kept in *fl."""
    if th & TH_RST:
        return CT_CLOSE
    if th & TH_FIN:
        fl[0] |= CTF_FIN_ORIG if dir == DIR_ORIG else CTF_FIN_REPLY
    if st == CT_SYN_SENT:
        if dir == DIR_REPLY and (th & (TH_SYN | TH_ACK)) == (TH_SYN | TH_ACK):
            return CT_SYN_RECV
        return st
    if st == CT_SYN_RECV:
        if dir == DIR_ORIG and (th & TH_ACK) and not (th & TH_SYN):
            st = CT_ESTABLISHED     # and go on: the ACK may carry a FIN
        else:
            return st
    if st == CT_CLOSE:
        return st
    if (fl[0] & (CTF_FIN_ORIG | CTF_FIN_REPLY)) == (CTF_FIN_ORIG | CTF_FIN_REPLY):
        return CT_TIME_WAIT
    if fl[0] & CTF_FIN_ORIG:
        return CT_FIN_WAIT
    if fl[0] & CTF_FIN_REPLY:
        return CT_CLOSE_WAIT
    return st
