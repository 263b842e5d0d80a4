"""Fuzzing the fast path (engine/lab/fuzz.py, whose command line is
bench/fuzz.py, at CI size).

- ~100k mutated packets through engine._fastpath (three dataplane
  configurations: roomy, a 32-flow table, four SNAT ports), each result
  checked (fuzz.check_result), the counters adding up, and a shadow dataplane
  with different poison behind every packet catching reads past its end;
- ~5k per configuration through engine.refpath as well, which must give the
  same verdicts and the same bytes, counters and flow table;
- the same fuzz against a debug build (Cython bounds checks, C asserts)
  built into a temporary folder;
- the harness itself: each of its checks fires on a dataplane with that
  fault injected, so a green run means something;
- the two bugs the fuzz found (ICMP errors translated whatever their outer
  destination; port unreachables sent to martian sources) as regressions;
- the IOWorker batch loop over a datagram socket, plain and with virtio-net
  headers, against the in-memory path.

The long run is `python3 bench/fuzz.py --packets 1000000 [--debug]`.
"""
import os
import shutil
import struct
import subprocess
import sys
import time
import types

import pytest

from engine import _fastpath, refpath
from engine.lab import fuzz, packets

ROOT = fuzz.REPO_ROOT

CI_PACKETS = 100_000
REF_PACKETS = 5_000


def test_fastpath_fuzz_ci_run():
    t0 = time.monotonic()
    st = fuzz.Stats()
    for config, n, seed in fuzz.mix_plan(CI_PACKETS, seed=20240601):
        fuzz.run(_fastpath, n, seed=seed, config=config, stats=st)
    took = time.monotonic() - t0
    assert st.packets == CI_PACKETS
    assert st.shadow_compared == CI_PACKETS
    assert took < 60, f"the CI fuzz took {took:.0f} s"
    # the mutations reach every verdict and every drop reason
    seen = {v for v, _ in st.hist} | {r for v, r in st.hist if v == "drop"}
    want = {"forward", "reply"} | set(_fastpath.DROP_REASONS[1:])
    assert want <= seen, f"never reached: {sorted(want - seen)}"
    assert st.partial > 1000          # CHECKSUM_PARTIAL mode exercised
    # nothing but the documented known issues was tolerated
    assert set(st.notes) <= {f"known issue {k}" for k in fuzz.KNOWN_ISSUES}, st.notes


@pytest.mark.parametrize("config", sorted(fuzz.CONFIGS))
def test_refpath_and_fastpath_agree_on_fuzzed_packets(config):
    """The same mutated packets through both modules: same verdicts, reasons
    and bytes out (run() compares them packet by packet), same counters and
    flow table at the end."""
    st = fuzz.run(_fastpath, REF_PACKETS, seed=77, config=config, ref=refpath, ref_packets=REF_PACKETS)
    assert st.ref_compared == REF_PACKETS


def test_refpath_alone_keeps_the_rules():
    """The reference is held to the same rules (it raises no exception on
    any input, and counts as the fast path does)."""
    st = fuzz.run(refpath, 3000, seed=5, config="default", shadow=False)
    assert st.packets == 3000


def test_fuzz_is_reproducible():
    a = fuzz.run(_fastpath, 3000, seed=11, config="default")
    b = fuzz.run(_fastpath, 3000, seed=11, config="default")
    assert a.hist == b.hist


# -- the debug build ----------------------------------------------------------------

def _build_tools():
    try:
        import Cython  # noqa: F401
    except ImportError:
        return "Cython is not installed"
    if not (shutil.which("gcc") or shutil.which("cc")):
        return "no C compiler"
    return None


def test_debug_build_fuzz(tmp_path):
    """Build the extension with ENGINE_DEBUG=1 into a temporary folder (not
    in place) and fuzz it in a child process that imports it from there."""
    missing = _build_tools()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the debug-build fuzz: {missing}")
        pytest.skip(missing)
    lib, tmp = str(tmp_path / "lib"), str(tmp_path / "tmp")
    so = fuzz.build_debug(lib, tmp)
    assert so.startswith(lib)
    # the debug C has Cython's bounds checks in it; the release one does not
    with open(os.path.join(tmp + "-src", "cext", "fastpath.c")) as f:
        assert "__Pyx_RaiseBufferIndexError" in f.read()
    r = subprocess.run([sys.executable, fuzz.FUZZ_CLI, "--use-build", lib, "--packets", "20000", "--seed", "9",
                        "--ref", "2000"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "(debug build)" in r.stdout and lib in r.stdout
    assert "packets: 20000  crashes: 0  failures: 0" in r.stdout


# -- the harness catches what it is meant to catch ---------------------------------

class _Faulty:
    """refpath's Dataplane with one fault injected."""

    def __init__(self, fault, *a, **kw):
        self.dp = refpath.Dataplane(*a, **kw)
        self.fault = fault
        self.buf = bytearray(65536)        # what the C code's slot would hold
        self.n = 0

    def process(self, pkt, now, partial=False):
        pkt = bytes(pkt)
        self.buf[:len(pkt)] = pkt
        v, reason, out = self.dp.process(pkt, now, partial)
        f = self.fault
        if v == "forward" and out and out[9] == 6:
            self.n += 1
            if f == "ip-csum" and self.n >= 50:
                out = out[:10] + bytes([out[10] ^ 1]) + out[11:]
            if f == "longer" and self.n >= 50:
                out = out + b"\0"
            if f == "l4-csum" and self.n >= 50:
                ihl = (out[0] & 15) * 4
                out = out[:ihl + 16] + bytes([out[ihl + 16] ^ 0x10]) + out[ihl + 17:]
        if f == "forward-unmatched" and (v, reason) == ("drop", "no_service"):
            v, reason, out = "forward", "none", pkt
        if f == "unknown-reason" and reason == "unallocated":
            reason = "because"
        if f == "past-end" and v == "drop" and reason == "malformed" and len(pkt) < 20:
            # decides on the byte after the packet
            reason = "malformed" if self.buf[len(pkt)] != 0xaa else "unsupported"
        return v, reason, out

    def counters(self):
        c = self.dp.counters()
        if self.fault == "count":
            c = dict(c, drops_by_reason=dict(c["drops_by_reason"]))
            c["drops_by_reason"]["fragment"] += 1
        return c

    def __getattr__(self, name):
        return getattr(self.dp, name)


def _faulty(fault):
    return types.SimpleNamespace(Tables=refpath.Tables, DROP_REASONS=refpath.DROP_REASONS,
                                 Dataplane=lambda *a, **kw: _Faulty(fault, *a, **kw))


@pytest.mark.parametrize("fault, message", [
    ("ip-csum", "bad IPv4 header checksum"),
    ("longer", "output IP lengths are not consistent"),
    ("l4-csum", "L4 checksum broken"),
    ("forward-unmatched", "addressed to neither a service"),
    ("unknown-reason", "unknown reason"),
    ("past-end", "read past the end"),
    ("count", "counters do not add up"),
])
def test_the_fuzz_catches_a_broken_dataplane(fault, message):
    with pytest.raises(fuzz.FuzzFailure, match=message):
        fuzz.run(_faulty(fault), 4000, seed=3, config="default", truncations=False)


def test_known_issue_tolerance():
    """A rule listed in `known` is counted, not raised; any other still raises."""
    import collections
    dp = _dp(_fastpath)
    syn = packets.tcp(fuzz.CLIENTS[0], fuzz.VIP, 40001, 80, 0x02)
    fwd = dp.process(syn, 1000)[2]
    err = packets.icmp(packets.be32(fwd, 16), fuzz.UNALLOC, 3, 3, payload=fwd[:28])
    wrong = ("forward", "none", err)       # what the fast path did before bd43e87
    reasons = set(_fastpath.DROP_REASONS)
    with pytest.raises(fuzz.FuzzFailure, match="not addressed to the sender of the quoted packet"):
        fuzz.check_result(err, False, wrong, reasons)
    notes = collections.Counter()
    try:
        fuzz.check_result(err, False, wrong, reasons, known=("icmp-outer-dst",), notes=notes)
    except fuzz.FuzzFailure as e:
        assert "icmp-outer-dst" not in str(e)
    assert notes["known issue icmp-outer-dst"] == 1


# -- regressions the fuzz found (fixed in bd43e87) -------------------------------------

MODULES = [pytest.param(_fastpath, id="fastpath"), pytest.param(refpath, id="refpath")]


def _dp(mod):
    return mod.Dataplane(fuzz.MASQ, tables=mod.Tables(**fuzz.table_args()), max_flows=64)


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("to", ["unallocated", "vip", "outside"])
def test_icmp_error_must_be_addressed_to_the_quoted_sender(mod, to):
    """An ICMP error about a tracked flow is translated only when it is
    addressed to whoever sent the quoted packet (Linux conntrack's rule);
    otherwise anyone who learns a flow's tuple can aim errors anywhere."""
    dp = _dp(mod)
    syn = packets.tcp(fuzz.CLIENTS[0], fuzz.VIP, 40001, 80, 0x02)
    v, _, fwd = dp.process(syn, 1000)
    assert v == "forward"                     # masq:port -> backend:8080
    backend = packets.be32(fwd, 16)
    dst = {"unallocated": fuzz.UNALLOC, "vip": fuzz.VIP_NOEP, "outside": fuzz.OUTSIDE}[to]
    err = packets.icmp(backend, dst, 3, 3, payload=fwd[:28])
    v, reason, out = dp.process(err, 1000)
    assert v == "drop", f"translated and forwarded to {fuzz.ipstr(packets.be32(out, 16))}"
    # the same error addressed to the masquerade address is translated
    v, _, out = dp.process(packets.icmp(backend, fuzz.MASQ, 3, 3, payload=fwd[:28]), 1000)
    assert v == "forward" and packets.be32(out, 16) == fuzz.CLIENTS[0]


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("src", ["0.0.0.0", "0.1.2.3", "255.255.255.255", "224.0.0.1", "239.1.1.1",
                                 "240.0.0.1", "127.0.0.1"])
def test_no_port_unreachable_to_a_martian_source(mod, src):
    dp = _dp(mod)
    v, reason, out = dp.process(packets.udp(fuzz.ip(src), fuzz.VIP_NOEP, 5000, 53), 1000)
    assert (v, reason) == ("drop", "martian"), f"sent a port unreachable to {src}"
    v, _, _ = dp.process(packets.udp(fuzz.CLIENTS[0], fuzz.VIP_NOEP, 5000, 53), 1000)
    assert v == "reply"


def test_checker_accepts_a_real_translation():
    """check_result on hand-made results: the rules are not vacuous."""
    dp = _dp(_fastpath)
    reasons = set(_fastpath.DROP_REASONS)
    syn = packets.tcp(fuzz.CLIENTS[0], fuzz.VIP, 40001, 80, 0x02)
    res = dp.process(syn, 1000)
    fuzz.check_result(syn, False, res, reasons)
    bad = (res[0], res[1], res[2][:10] + b"\0\0" + res[2][12:])
    with pytest.raises(fuzz.FuzzFailure, match="checksum"):
        fuzz.check_result(syn, False, bad, reasons)
    rej = packets.udp(fuzz.CLIENTS[0], fuzz.VIP_NOEP, 5000, 53, payload=b"x" * 1000)
    res = dp.process(rej, 1000)
    assert res[0] == "reply" and len(res[2]) == 576
    fuzz.check_result(rej, False, res, reasons)
    out = bytearray(res[2])
    out[-1] ^= 0xff
    struct.pack_into("!H", out, 22, 0)
    struct.pack_into("!H", out, 22, packets.csum(bytes(out[20:])))
    with pytest.raises(fuzz.FuzzFailure, match="quote is not the datagram"):
        fuzz.check_result(rej, False, (res[0], res[1], bytes(out)), reasons)


# -- the I/O path: batches through IOWorker.run on a datagram socket --------------------

@pytest.mark.parametrize("vnet", [False, True], ids=["plain", "vnet"])
def test_ioworker_batches_of_fuzzed_packets(vnet):
    """IOWorker.run, the loop that serves the TUN, over a non-blocking
    datagram socketpair standing in for it: every fuzzed packet in batches,
    with a virtio-net header (NEEDS_CSUM for the partial ones) when vnet;
    what comes back must be, in order and byte for byte, what the in-memory
    Dataplane.process gives for the same sequence, and the counters agree."""
    import random
    import socket
    rng = random.Random(99)
    gen = fuzz.Generator(rng)
    targs = fuzz.table_args()
    dp = _fastpath.Dataplane(fuzz.MASQ, tables=_fastpath.Tables(**targs), max_flows=4096, seed=42)
    ref = _fastpath.Dataplane(fuzz.MASQ, tables=_fastpath.Tables(**targs), max_flows=4096, seed=42)
    io = _fastpath.IOWorker(dp, vnet=vnet)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.setblocking(False)
    a.settimeout(2)
    hdr = 10 if vnet else 0
    sent = got = 0
    try:
        for _ in range(400):
            batch = []
            for _ in range(8):                  # net.unix.max_dgram_qlen is 10
                pkt, partial = gen.next()
                if not pkt or len(pkt) > 60000:
                    continue
                batch.append((pkt, partial))
            now = _fastpath.monotonic()
            want = []
            for pkt, partial in batch:
                res = ref.process(pkt, now, partial and vnet)
                gen.observe(pkt, res)
                if res[0] != "drop":
                    vh = (bytes([1 if partial else 0]) + bytes(9)) if vnet else b""
                    want.append((vh if res[0] == "forward" else bytes(hdr)) + res[2])
                vh = (bytes([1 if partial else 0]) + bytes(9)) if vnet else b""
                a.send(vh + pkt)
            n = 0
            while n < len(batch):
                n += io.run(b.fileno(), 1000)
            out = [a.recv(70000) for _ in want]
            assert out == want
            sent += len(batch)
            got += len(out)
        c, rc = dp.counters(), ref.counters()
        assert c["rx_packets"] == rc["rx_packets"] == sent
        assert c["tx_packets"] == got and c["write_errors"] == 0
        assert c["drops_by_reason"] == rc["drops_by_reason"]
        assert c["flows"] == rc["flows"] and c["flows_created"] == rc["flows_created"]
    finally:
        a.close()
        b.close()


def test_ioworker_sweep_counts_expired_flows():
    """The I/O loop sweeps a few flow entries a batch: the flows it removes
    count in flows_expired, as those expire() and a lookup remove do."""
    import socket
    targs = fuzz.table_args()
    dp = _fastpath.Dataplane(fuzz.MASQ, tables=_fastpath.Tables(**targs), max_flows=32,
                             timeouts=dict.fromkeys(_fastpath.DEFAULT_TIMEOUTS, 1))
    io = _fastpath.IOWorker(dp)
    gen = fuzz.Generator(__import__("random").Random(5))
    then = max(0.0, _fastpath.monotonic() - 10)
    opened = 0
    while opened < 5:                       # flows opened 10 s ago: expired by now
        pkt, _ = gen.next()
        if pkt and dp.process(pkt, then)[0] == "forward" and dp.counters()["flows"] > opened:
            opened = dp.counters()["flows"]
    assert dp.counters()["flows_expired"] == 0
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.setblocking(False)
    try:
        a.send(b"\x45" + bytes(3))          # one packet (malformed) for a batch to run
        assert io.run(b.fileno(), 1000) == 1
    finally:
        a.close()
        b.close()
    c = dp.counters()
    assert c["flows"] == 0
    assert c["flows_expired"] == opened
