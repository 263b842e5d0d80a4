# Batched TUN I/O, one IOWorker per queue (IFF_MULTI_QUEUE: one fd each).
# Each worker owns its buffers; the Dataplane's conntrack is shared and
# guarded by its lock, held only while packets are processed, not during the
# read and write syscalls that dominate the cost.

cdef enum:
    DRAIN_BATCHES = 8           # full batches handled per call before Python sees one
    VNET_HDR_LEN = 10           # struct virtio_net_hdr (linux/virtio_net.h)
    VNET_F_NEEDS_CSUM = 1       # flags: L4 checksum is partial (CHECKSUM_PARTIAL)


cdef class IOWorker:

    def __cinit__(self):
        self.bufs = NULL
        self.lens = NULL
        self.verdicts = NULL
        self.pkts = NULL
        self.rows = NULL

    def __init__(self, Dataplane dp not None, bint vnet=False, int batch=0):
        self.dp = dp
        self.batch = batch or dp.batch
        self.hdr = VNET_HDR_LEN if vnet else 0
        self.bufs = <uint8_t *>malloc(<size_t>self.batch * IO_SLOT)
        self.lens = <Py_ssize_t *>calloc(self.batch, sizeof(Py_ssize_t))
        self.verdicts = <uint8_t *>calloc(self.batch, 1)
        self.pkts = <pkt_t *>calloc(self.batch, sizeof(pkt_t))
        self.rows = <uint64_t *>calloc(self.batch, sizeof(uint64_t))
        if not self.bufs or not self.lens or not self.verdicts or not self.pkts or not self.rows:
            raise MemoryError()
        self.tx[0] = self.tx[1] = self.tx[2] = 0
        self.rx_packets = 0
        dp._workers.append(self)

    def __dealloc__(self):
        free(self.bufs)
        free(self.lens)
        free(self.verdicts)
        free(self.pkts)
        free(self.rows)

    def run(self, int fd, int timeout_ms=100):
        """Wait for fd, then batches: read up to `batch` packets, process
        them under the conntrack lock, write back what goes on; while batches
        come full, go on (up to DRAIN_BATCHES) without returning to Python.
        Returns the number of packets read."""
        cdef Dataplane dp = self.dp
        cdef Tables t
        cdef pollfd pfd
        cdef int n, i, r, v, rnd, total = 0, hdr = self.hdr
        cdef Py_ssize_t got, outlen
        cdef timespec ts
        cdef uint32_t now
        cdef uint8_t *slot
        cdef bint partial
        pfd.fd = fd
        pfd.events = POLLIN
        with nogil:
            r = poll(&pfd, 1, timeout_ms)
        if r <= 0:
            return 0
        # the generation current when the packets are read (taken after
        # poll: a worker may wait long in poll); a few batches share it
        t = dp.tables
        with nogil:
            for rnd in range(DRAIN_BATCHES):
                n = 0
                while n < self.batch:
                    got = read(fd, self.bufs + <size_t>n * IO_SLOT, IO_SLOT)
                    if got <= hdr:
                        break
                    self.lens[n] = got
                    n += 1
                if n == 0:
                    break
                clock_gettime(CLOCK_MONOTONIC, &ts)
                now = <uint32_t>ts.tv_sec
                # a full batch: packets are waiting, the engine is behind
                dp.overloaded = n == self.batch
                stage_parse(dp, t, self.bufs, IO_SLOT, self.lens, n, hdr, self.pkts, self.rows)
                PyThread_acquire_lock(dp.lock, WAIT_LOCK)
                if dp.batch_prefetch:
                    stage_entries(dp, t, self.pkts, self.rows, n)
                for i in range(n):
                    slot = self.bufs + <size_t>i * IO_SLOT
                    partial = hdr != 0 and (slot[0] & VNET_F_NEEDS_CSUM) != 0
                    outlen = 0
                    v = process_one(dp, t, &self.pkts[i], now, &outlen, partial) & 0xff
                    if v == V_REPLY and hdr:
                        memset(slot, 0, hdr)     # our own packet: no offload asked
                    self.verdicts[i] = v
                    self.lens[i] = outlen + hdr
                dp.cnt[C_FLOWS_EXPIRED] += ct_sweep(&dp.ct, now, 64)
                PyThread_release_lock(dp.lock)
                for i in range(n):
                    if self.verdicts[i] != V_DROP:
                        if write(fd, self.bufs + <size_t>i * IO_SLOT, self.lens[i]) == self.lens[i]:
                            self.tx[0] += 1
                            self.tx[1] += self.lens[i] - hdr
                        else:
                            self.tx[2] += 1
                total += n
                self.rx_packets += n
                if n < self.batch:
                    break
        return total
