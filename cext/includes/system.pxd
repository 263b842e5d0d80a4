# Every C library and compiler extern of the fast path, in one place.
from libc.stdint cimport uint16_t, uint32_t

cdef extern from "<arpa/inet.h>" nogil:
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int madvise(void *addr, size_t length, int advice)
    enum: PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MADV_HUGEPAGE
    void *MAP_FAILED

cdef extern from *:
    """
    #define engine_prefetch(p) __builtin_prefetch((p), 0, 3)
    #define engine_prefetch_w(p) __builtin_prefetch((p), 1, 3)
    #define ENGINE_EMPTY_SLOT 0xffffffffu
    """
    void prefetch "engine_prefetch"(const void *p) nogil        # for reading
    void prefetch_w "engine_prefetch_w"(const void *p) nogil    # for writing
    const uint32_t EMPTY "ENGINE_EMPTY_SLOT"                    # a free service-port index slot
