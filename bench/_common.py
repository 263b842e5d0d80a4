"""Shared helpers of the bench/ scripts: arguments, tables, medians, packets.

Standard library only (plus the engine package, imported by the scripts).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
from engine.lab import packets  # noqa: E402


# --- command line ----------------------------------------------------------------

def parser(description, runs=3):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="short runs and the smallest sizes (a smoke test, not a measurement)")
    p.add_argument("--runs", type=int, default=None,
                   help=f"repetitions of each measurement, median reported (default {runs}; 1 with --quick)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(default_runs=runs)
    return p


def runs_of(args):
    if args.runs is not None:
        return max(1, args.runs)
    return 1 if args.quick else args.default_runs


def log(*a):
    """Progress goes to stderr; the table (the result) to stdout."""
    print(*a, file=sys.stderr, flush=True)


# --- statistics ---------------------------------------------------------------

def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(x, digits=3):
    """A number with `digits` significant digits, '-' for None."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if x == 0:
        return "0"
    if isinstance(x, int):
        return f"{x:,}"
    ax = abs(x)
    if ax >= 10 ** digits:
        return f"{x:,.0f}"
    if ax >= 1:
        return f"{x:.{max(0, digits - len(str(int(ax))))}f}"
    return f"{x:.{digits}g}"


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def table(title, header, rows):
    """A plain-text table; header is a list of column names, rows lists of cells."""
    cells = [[str(c) for c in header]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    out = [title, "=" * len(title), line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def machine():
    info = {"python": platform.python_version(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def machine_line():
    m = machine()
    return f"# {m.get('cpu', '?')}, {m['cpus']} CPUs, Linux {m['kernel']}, Python {m['python']}, {m['time']}"


def write_json(path, data):
    if not path:
        return
    data = dict(data, machine=machine())
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")


# --- packets -------------------------------------------------------------------

TH_FIN, TH_SYN, TH_RST, TH_PSH, TH_ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def tcp_packet(src, sport, dst, dport, flags, payload=b"", seq=1, ack=0):
    """IPv4 + TCP (no options) with valid checksums; addresses as host-order ints."""
    return packets.tcp(src, dst, sport, dport, flags, seq=seq, ack=ack, payload=payload,
                       window=65535, ident=0)


def udp_packet(src, sport, dst, dport, payload=b"x" * 18):
    return packets.udp(src, dst, sport, dport, payload=payload, ident=0)


class TcpFactory:
    """Many TCP packets that differ only in source address and port, fast:
    the checksums are patched from a template's partial sums (RFC 1624 style)
    instead of being recomputed, so a million SYNs take about a second."""

    def __init__(self, dst, dport, flags, payload=b""):
        self.dst, self.dport, self.flags = dst, dport, flags
        tmpl = bytearray(tcp_packet(0, 0, dst, dport, flags, payload))
        tmpl[10:12] = b"\0\0"
        tmpl[36:38] = b"\0\0"
        self.ip_base = packets.sum16(bytes(tmpl[:20]))                     # src = 0
        tcp_len = len(tmpl) - 20
        self.tcp_base = packets.sum16(struct.pack("!IIBBH", 0, dst, 0, 6, tcp_len)) + packets.sum16(bytes(tmpl[20:]))
        self.head = bytes(tmpl[:10])
        self.mid = bytes(tmpl[16:20])          # dst
        self.tail = bytes(tmpl[22:36])         # dport .. urg-less: from dport to before csum
        self.rest = bytes(tmpl[38:])

    def make(self, src, sport):
        s_src = (src >> 16) + (src & 0xFFFF)
        ipc = ~packets.fold(self.ip_base + s_src) & 0xFFFF
        tc = ~packets.fold(self.tcp_base + s_src + sport) & 0xFFFF
        return b"".join((self.head, struct.pack("!HI", ipc, src), self.mid,
                         struct.pack("!H", sport), self.tail, struct.pack("!H", tc), self.rest))


def client_addr(i, base=0x0A000000 | (1 << 16)):
    """Distinct (address, port) pairs: 60,000 ports per address from 10.1.0.0 up."""
    return base + i // 60000, 1024 + i % 60000


def ip_int(s):
    a, b, c, d = (int(x) for x in s.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def ip_str(n):
    return ".".join(str((n >> s) & 0xFF) for s in (24, 16, 8, 0))


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def time_batches(dp, batches, now):
    """Seconds to push each batch through dp.process_batch, with the garbage
    collector held off so it does not land inside the measurement."""
    import gc
    gc.disable()
    try:
        pb = dp.process_batch
        t0 = time.perf_counter()
        for ch in batches:
            pb(ch, now)
        return time.perf_counter() - t0
    finally:
        gc.enable()
