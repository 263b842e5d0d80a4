"""Fuzzing the fast path (bench/fuzz.py at CI size).

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
- the known issues the fuzz tolerates, each as a strict xfail with its
  reproducer (remove the marker and the KNOWN_ISSUES entry with the fix).

The long run is `python3 bench/fuzz.py --packets 1000000 [--debug]`.
"""
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import time
import types

import pytest

from engine import _fastpath, refpath

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FUZZ_PY = os.path.join(ROOT, "bench", "fuzz.py")
_spec = importlib.util.spec_from_file_location("engine_bench_fuzz", FUZZ_PY)
fuzz = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fuzz
_spec.loader.exec_module(fuzz)

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
    r = subprocess.run([sys.executable, FUZZ_PY, "--use-build", lib, "--packets", "20000", "--seed", "9",
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


def test_known_issues_fail_when_not_tolerated():
    with pytest.raises(fuzz.FuzzFailure, match="not addressed to the sender of the quoted packet"):
        fuzz.run(_fastpath, 20000, seed=3, config="default", known=())


# -- known issues: strict xfails with their reproducers ------------------------------

MODULES = [pytest.param(_fastpath, id="fastpath"), pytest.param(refpath, id="refpath")]


def _dp(mod):
    return mod.Dataplane(fuzz.MASQ, tables=mod.Tables(**fuzz.table_args()), max_flows=64)


@pytest.mark.xfail(strict=True, reason="known issue icmp-outer-dst: ICMP errors are matched on the "
                                       "quoted tuple only, whatever their outer destination")
@pytest.mark.parametrize("mod", MODULES)
def test_icmp_error_must_be_addressed_to_the_quoted_sender(mod):
    dp = _dp(mod)
    syn = fuzz.tcp(fuzz.CLIENTS[0], fuzz.VIP, 40001, 80, 0x02)
    v, _, fwd = dp.process(syn, 1000)
    assert v == "forward"                     # masq:port -> backend:8080
    backend = fuzz.be32(fwd, 16)
    # the backend's port unreachable about it, addressed to an unallocated
    # service address instead of the masquerade address that sent the SYN
    err = fuzz.icmp(backend, fuzz.UNALLOC, 3, 3, payload=fwd[:28])
    v, reason, out = dp.process(err, 1000)
    assert v == "drop", f"translated and forwarded to {fuzz.ipstr(fuzz.be32(out, 16))}"


@pytest.mark.xfail(strict=True, reason="known issue icmp-to-martian: port unreachable sent to "
                                       "0.0.0.0 / broadcast / multicast / loopback sources")
@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("src", ["0.0.0.0", "255.255.255.255", "224.0.0.1", "127.0.0.1"])
def test_no_port_unreachable_to_a_martian_source(mod, src):
    dp = _dp(mod)
    v, reason, out = dp.process(fuzz.udp(fuzz.ip(src), fuzz.VIP_NOEP, 5000, 53), 1000)
    assert v == "drop", f"sent a port unreachable to {src}"


def test_checker_accepts_a_real_translation():
    """check_result on hand-made results: the rules are not vacuous."""
    dp = _dp(_fastpath)
    reasons = set(_fastpath.DROP_REASONS)
    syn = fuzz.tcp(fuzz.CLIENTS[0], fuzz.VIP, 40001, 80, 0x02)
    res = dp.process(syn, 1000)
    fuzz.check_result(syn, False, res, reasons)
    bad = (res[0], res[1], res[2][:10] + b"\0\0" + res[2][12:])
    with pytest.raises(fuzz.FuzzFailure, match="checksum"):
        fuzz.check_result(syn, False, bad, reasons)
    rej = fuzz.udp(fuzz.CLIENTS[0], fuzz.VIP_NOEP, 5000, 53, payload=b"x" * 1000)
    res = dp.process(rej, 1000)
    assert res[0] == "reply" and len(res[2]) == 576
    fuzz.check_result(rej, False, res, reasons)
    out = bytearray(res[2])
    out[-1] ^= 0xff
    struct.pack_into("!H", out, 22, 0)
    struct.pack_into("!H", out, 22, fuzz.csum(bytes(out[20:])))
    with pytest.raises(fuzz.FuzzFailure, match="quote is not the datagram"):
        fuzz.check_result(rej, False, (res[0], res[1], bytes(out)), reasons)
