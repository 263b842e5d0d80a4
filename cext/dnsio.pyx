# cython: language_level=3
"""engine._dnsio: batched UDP I/O for the cluster DNS (recvmmsg/sendmmsg).

The DNS's receive loop spends as much on one recvfrom() and one sendto()
per query as on answering it from its table. Here one recvmmsg() takes up to
`batch` datagrams (blocking for the first, MSG_WAITFORONE) and one sendmmsg()
sends the answers, both with the GIL released. No DNS parsing happens here:
the Python side does that (and its parser is the bounds-checked one).
IPv4 only, as the DNS server's socket.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport errno, EINTR, EAGAIN
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from libc.stdint cimport uint16_t, uint32_t


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct iovec:
        void *iov_base
        size_t iov_len
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int recvmmsg(int fd, mmsghdr *msgs, unsigned int vlen, int flags, void *timeout)
    int sendmmsg(int fd, mmsghdr *msgs, unsigned int vlen, int flags)
    int MSG_WAITFORONE
    int MSG_TRUNC
    int MSG_DONTWAIT

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr
    struct sockaddr_in:
        uint16_t sin_family
        uint16_t sin_port
        in_addr sin_addr
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)
    int AF_INET

cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)
    int inet_pton(int af, const char *src, void *dst)


cdef class BatchIO:
    """recv() -> [(datagram, (ip, port))]; send([(data, (ip, port))]) -> sent."""
    cdef int fd
    cdef unsigned int batch
    cdef size_t bufsize
    cdef mmsghdr *msgs
    cdef iovec *iovs
    cdef sockaddr_in *addrs
    cdef char *bufs

    def __cinit__(self, int fd, unsigned int batch=32, size_t bufsize=4096):
        if batch < 1 or batch > 1024 or bufsize < 512 or bufsize > 65536:
            raise ValueError("batch 1..1024, bufsize 512..65536")
        self.fd = fd
        self.batch = batch
        self.bufsize = bufsize
        self.msgs = <mmsghdr *>calloc(batch, sizeof(mmsghdr))
        self.iovs = <iovec *>calloc(batch, sizeof(iovec))
        self.addrs = <sockaddr_in *>calloc(batch, sizeof(sockaddr_in))
        self.bufs = <char *>calloc(batch, bufsize)
        if not self.msgs or not self.iovs or not self.addrs or not self.bufs:
            raise MemoryError()

    def __dealloc__(self):
        free(self.msgs)
        free(self.iovs)
        free(self.addrs)
        free(self.bufs)

    def recv(self):
        """Up to `batch` datagrams, waiting for the first. A datagram longer
        than bufsize comes cut to bufsize (the caller's parser refuses it).
        [] when the socket was shut down; OSError on other errors."""
        cdef unsigned int i
        cdef int n
        cdef int err = 0
        for i in range(self.batch):
            self.iovs[i].iov_base = self.bufs + i * self.bufsize
            self.iovs[i].iov_len = self.bufsize
            memset(&self.msgs[i], 0, sizeof(mmsghdr))
            self.msgs[i].msg_hdr.msg_name = &self.addrs[i]
            self.msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
            self.msgs[i].msg_hdr.msg_iov = &self.iovs[i]
            self.msgs[i].msg_hdr.msg_iovlen = 1
        while True:
            with nogil:
                n = recvmmsg(self.fd, self.msgs, self.batch, MSG_WAITFORONE, NULL)
                if n < 0:
                    err = errno
            if n >= 0 or err != EINTR:
                break
        if n < 0:
            raise OSError(err, "recvmmsg")
        cdef char ip[16]
        cdef list out = []
        cdef unsigned int ln
        for i in range(<unsigned int>n):
            ln = self.msgs[i].msg_len
            if ln > self.bufsize:
                ln = <unsigned int>self.bufsize
            if self.msgs[i].msg_hdr.msg_namelen < sizeof(sockaddr_in) or self.addrs[i].sin_family != AF_INET:
                continue
            inet_ntop(AF_INET, &self.addrs[i].sin_addr, ip, 16)
            out.append((PyBytes_FromStringAndSize(self.bufs + i * self.bufsize, ln),
                        ((<bytes>ip).decode("ascii"), ntohs(self.addrs[i].sin_port))))
        return out

    def send(self, list items):
        """Send each (data, (ip, port)) of items, `batch` at a time; the
        number sent (a datagram the kernel refuses, e.g. to an unreachable
        address, is skipped, not retried)."""
        cdef Py_ssize_t total = len(items), pos = 0, sent = 0
        cdef unsigned int m, j
        cdef int n, err
        cdef bytes data
        cdef sockaddr_in *a
        while pos < total:
            m = 0
            while pos < total and m < self.batch:
                data, (host, port) = items[pos]
                pos += 1
                a = &self.addrs[m]
                memset(a, 0, sizeof(sockaddr_in))
                a.sin_family = AF_INET
                a.sin_port = htons(<uint16_t>port)
                if inet_pton(AF_INET, (<str>host).encode("ascii"), &a.sin_addr) != 1:
                    continue
                self.iovs[m].iov_base = PyBytes_AS_STRING(data)      # `items` keeps data alive
                self.iovs[m].iov_len = PyBytes_GET_SIZE(data)
                memset(&self.msgs[m], 0, sizeof(mmsghdr))
                self.msgs[m].msg_hdr.msg_name = a
                self.msgs[m].msg_hdr.msg_namelen = sizeof(sockaddr_in)
                self.msgs[m].msg_hdr.msg_iov = &self.iovs[m]
                self.msgs[m].msg_hdr.msg_iovlen = 1
                m += 1
            j = 0
            while j < m:
                err = 0
                with nogil:
                    n = sendmmsg(self.fd, self.msgs + j, m - j, MSG_DONTWAIT)
                    if n < 0:
                        err = errno
                if n < 0 and err == EINTR:
                    continue
                if n <= 0:
                    j += 1                     # this one failed: skip it
                else:
                    j += <unsigned int>n
                    sent += n
        return sent
