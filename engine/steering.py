"""Queue steering for the multi-queue TUN: both directions of a flow on one
queue, so one worker (one core, one warm cache) sees the whole flow.

By default the kernel picks a TUN queue from the packet's flow hash, and the
two directions of a NATed flow are different tuples (client -> VIP, pod ->
masquerade address), so they land on different queues and every round trip
wakes both workers. With TUNSETSTEERINGEBPF the queue is what a small eBPF
program returns (modulo the queue count). This one returns

    the destination port  for a packet to the masquerade address (a reply),
    the source port       for any other (the client's side),

and the fast path picks each flow's masquerade port congruent to the client's
source port modulo the queue count (Dataplane.tun_queues): both ports give
the same queue. The program is eleven instructions of classic packet loads
(LD_ABS/LD_IND, which give host byte order and end the program on a short
packet), loaded with the bpf() syscall: no compiler, no library.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct

SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351,
           "riscv64": 280}.get(platform.machine())
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SOCKET_FILTER = 1
TUNSETSTEERINGEBPF = 0x800454E0  # _IOR('T', 224, int)

# eBPF opcodes (linux/bpf.h, linux/bpf_common.h)
_MOV64_X = 0xBF                 # dst = src
_AND64_K = 0x57                 # dst &= imm
_LSH64_K = 0x67                 # dst <<= imm
_LD_ABS_B, _LD_ABS_W = 0x30, 0x20   # r0 = packet[imm] (8, 32 bits)
_LD_IND_H = 0x48                # r0 = packet[src + imm] (16 bits)
_JEQ32_K = 0x16                 # if (u32)dst == imm: pc += off
_EXIT = 0x95

_R0, _R1, _R6, _R7 = 0, 1, 6, 7


def _insn(code, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def program(masq_ip):
    """The steering program for masquerade address masq_ip (an int)."""
    masq = masq_ip - (1 << 32) if masq_ip >= 1 << 31 else masq_ip      # imm is signed 32-bit
    return b"".join([
        _insn(_MOV64_X, _R6, _R1),              # LD_ABS/LD_IND take the skb from r6
        _insn(_LD_ABS_B, imm=0),                # version and IHL
        _insn(_AND64_K, _R0, imm=0x0F),
        _insn(_LSH64_K, _R0, imm=2),
        _insn(_MOV64_X, _R7, _R0),              # r7: IP header length in bytes
        _insn(_LD_ABS_W, imm=16),               # destination address
        _insn(_JEQ32_K, _R0, off=2, imm=masq),
        _insn(_LD_IND_H, src=_R7, imm=0),       # client side: its source port
        _insn(_EXIT),
        _insn(_LD_IND_H, src=_R7, imm=2),       # reply: the masquerade port
        _insn(_EXIT),
    ])


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32)]


def load(masq_ip):
    """Load the program; returns its fd. Raises OSError with the verifier's
    log when the kernel refuses it."""
    if SYS_BPF is None:
        raise OSError(errno.ENOSYS, f"bpf(): syscall number unknown on {platform.machine()}")
    code = program(masq_ip)
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = _ProgLoadAttr(prog_type=BPF_PROG_TYPE_SOCKET_FILTER, insn_cnt=len(code) // 8,
                         insns=ctypes.addressof(insns), license=ctypes.addressof(lic),
                         log_level=1, log_size=len(log), log_buf=ctypes.addressof(log))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_int(BPF_PROG_LOAD), ctypes.byref(attr),
                      ctypes.c_uint(ctypes.sizeof(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(BPF_PROG_LOAD): {os.strerror(err)}: {log.value.decode(errors='replace').strip()}")
    return fd


def attach(tun_fd, masq_ip):
    """Steer the TUN of tun_fd (any of its queues) with the program. The
    device keeps its own reference, so our fd is closed again."""
    fd = load(masq_ip)
    try:
        fcntl.ioctl(tun_fd, TUNSETSTEERINGEBPF, struct.pack("i", fd))
    finally:
        os.close(fd)

