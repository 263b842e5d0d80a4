"""The flow snapshot a restart takes over (conntrack.snapshotInterval,
stateFile): written whole or not at all, read only when nobody but its
owner could have written it, and filtered against the table the new start
serves, as kube-proxy clears stale UDP entries at start.

File: one JSON header line, then export_flows() records (ENTRY_BYTES each).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import socket
import stat
import struct

from .refpath import (CT_FREE, CT_SYN_RECV, CT_SYN_SENT, CT_UDP_UNREPLIED,
                      DEFAULT_TIMEOUTS, STATE_NAMES)

log = logging.getLogger("engine.snapshot")

VERSION = 1
MAX_AGE = 600           # seconds; an older snapshot describes flows long gone
# records: two 16-byte keys, then expires, service port id, backend id (u32
# each), state, flags (u8 each), pad (u16); native order, as ct_entry_t
_TAIL = struct.Struct("=IIIBBH")
_TAIL_AT = 32
# a flow that never saw an answer is no connection to keep: a SYN flood's or a
# one-way UDP stream's entries stay behind
HALF_OPEN = frozenset((CT_SYN_SENT, CT_SYN_RECV, CT_UDP_UNREPLIED))


def write(path, header, data):
    """Write header and records to path: a temporary file, fsync, rename,
    fsync of the directory. The previous snapshot stays until the new one
    is complete."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)              # never write through a planted file or link
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n")
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove_stale_tmp(path):
    """Temporary files a crash left half-written."""
    for tmp in glob.glob(glob.escape(path) + ".tmp*"):
        try:
            os.unlink(tmp)
            log.info("removed stale %s", tmp)
        except OSError as e:
            log.warning("cannot remove stale %s: %s", tmp, e)


def read(path, max_bytes):
    """(header dict, record bytes) of the snapshot at path, or None when
    there is none. ValueError when it must not be trusted: not a regular
    file, owned by another user than the engine's, writable by group or
    others, larger than max_bytes, or not a snapshot."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"cannot open: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_uid != os.geteuid():
            raise ValueError(f"owned by uid {st.st_uid}, not {os.geteuid()}")
        if st.st_mode & 0o022:
            raise ValueError(f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")
        if st.st_size > max_bytes:
            raise ValueError(f"{st.st_size} bytes, more than a full table")
        raw = f.read(max_bytes + 1)
    line, sep, data = raw.partition(b"\n")
    if not sep:
        raise ValueError("no header")
    try:
        header = json.loads(line)
    except ValueError:
        raise ValueError("header is not JSON") from None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        raise ValueError("snapshot of another format")
    return header, data


def state_timeouts(configured):
    """Seconds a flow in each state may live: the defaults with the
    configured ones (state name -> seconds) over them."""
    t = dict(DEFAULT_TIMEOUTS, **configured)
    return [int(t.get(name, 0)) for name in STATE_NAMES]


def keep(data, entry_bytes, services, backends, timeouts):
    """The records worth taking over: whose service port (old id -> name in
    services) and backend (old id -> key (service port name, ip, port) in
    backends) both still exist in the new table, as a pair; not half-open;
    with the time left cut to the state's configured timeout. services and
    backends hold only the old ids whose names the new table still has.
    Returns (bytes, count kept, count left behind)."""
    if len(data) % entry_bytes:
        raise ValueError("records are not a whole number of entries")
    out = bytearray()
    left = 0
    for off in range(0, len(data), entry_bytes):
        rec = data[off:off + entry_bytes]
        expires, svc, backend, state, flags, pad = _TAIL.unpack_from(rec, _TAIL_AT)
        name = services.get(svc)
        bkey = backends.get(backend)
        if (name is None or bkey is None or bkey[0] != name or state == CT_FREE
                or state >= len(STATE_NAMES) or state in HALF_OPEN):
            left += 1
            continue
        rec = bytearray(rec)
        _TAIL.pack_into(rec, _TAIL_AT, min(expires, timeouts[state]), svc, backend, state, flags, pad)
        out += rec
    return bytes(out), len(out) // entry_bytes, left


# a record field by field: addresses and ports of both keys as the wire has
# them (network order), the rest native
_RECORD = struct.Struct("=4s4s2s2sBBH4s4s2s2sBBHIIIBBH")


def records(data):
    """(proto, state name, seconds left, (src, sport, dst, dport) of the
    original and of the reply direction, service port id, backend id) of
    each export_flows() record; addresses as dotted text."""
    ntoa, port = socket.inet_ntoa, int.from_bytes
    for (s0, d0, sp0, dp0, proto, _, _, s1, d1, sp1, dp1, _, _, _,
         expires, svc, backend, state, _, _) in _RECORD.iter_unpack(data):
        yield (proto, STATE_NAMES[state] if state < len(STATE_NAMES) else "?", expires,
               (ntoa(s0), port(sp0, "big"), ntoa(d0), port(dp0, "big")),
               (ntoa(s1), port(sp1, "big"), ntoa(d1), port(dp1, "big")), svc, backend)
