"""A restart into a changed world (issue 10, items 5 and 7): the next start
takes over only the flows whose service and backend it still serves, with
no more time left than the configured timeouts, never a half-open one, and
only from a snapshot nobody else could have written; the snapshot stays
until a new one replaces it, so a SIGKILL soon after a restart loses
nothing."""
import os
import re
import signal
import struct

import pytest

from engine.refpath import CT_SYN_SENT, ENTRY_BYTES
from test_clusterip import ENGINE, EXTRA, seed

ECHO = "10.96.100.53"
FLOWS = 24

# FLOWS UDP "connections" to the echo service from as many source ports; each
# gets an answer (the flow is then ASSURED, 120 s by default)
UDP_FLOWS = r"""
import socket, sys
ip, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 40000 + i)); s.settimeout(2)
    s.sendto(b"ping", (ip, 53))
    s.recv(100)
    s.sendto(b"ping", (ip, 53))
    s.recv(100)
"""


def config(lab, pods):
    return "---\n".join([ENGINE + "tunName: kube-tun12\n", seed("service-exam.yaml")]) + EXTRA + \
        lab.pod_manifests(pods=pods)


def flows(eng):
    """(client port, backend address, seconds left) of each UDP flow."""
    out = []
    for line in eng.ctl("conntrack", "-p", "udp").stdout.splitlines():
        m = re.match(r"udp\s+17\s+(\d+)\s.*?sport=(\d+) dport=53 src=(\S+)", line)
        if m:
            out.append((int(m.group(2)), m.group(3), int(m.group(1))))
    return sorted(out)


def open_flows(lab):
    r = lab.python(lab.client_ns, UDP_FLOWS, ECHO, FLOWS)
    assert r.returncode == 0, r.stderr


def restart(lab, eng, text=None, sig=signal.SIGTERM):
    eng.stop(sig=sig)
    if text is not None:
        with open(eng.path, "w") as f:
            f.write(text)
    return lab.restart_engine(eng)


@pytest.fixture
def started(lab):
    """An engine with FLOWS UDP flows over the lab's three pods; yields it and
    the list the test fills with the engines it starts after it."""
    eng = lab.start_engine(config(lab, lab.pods))
    later = [eng]
    try:
        open_flows(lab)
        before = flows(eng)
        assert len(before) == FLOWS and len({b for _, b, _ in before}) == 3, before
        yield eng, later, before
    finally:
        for e in later:
            e.stop()
        path = eng.path + ".flows"
        if os.path.exists(path):
            os.unlink(path)


def test_flows_of_a_removed_pod_stay_behind(lab, started):
    eng, later, before = started
    gone = lab.pods[2]
    eng2 = restart(lab, eng, config(lab, lab.pods[:2]))
    later.append(eng2)
    after = flows(eng2)
    kept = [(p, b) for p, b, _ in before if b != gone.ip]
    assert [(p, b) for p, b, _ in after] == kept, (before, after)
    assert f"took over {len(kept)} flows" in eng2.log(), eng2.log()
    # a client of the removed pod is served by a live one at its next datagram
    port = next(p for p, b, _ in before if b == gone.ip)
    r = lab.python(lab.client_ns, "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                   f"s.bind(('0.0.0.0',{port}));s.settimeout(2);s.sendto(b'ping',('{ECHO}',53))\n"
                   "print(s.recv(100).decode())")
    assert r.returncode == 0 and gone.name not in r.stdout, (r.stdout, r.stderr)


def _records(path):
    with open(path, "rb") as f:
        raw = f.read()
    head, _, data = raw.partition(b"\n")
    return head, [bytearray(data[i:i + ENTRY_BYTES]) for i in range(0, len(data), ENTRY_BYTES)]


def _write(path, head, recs):
    with open(path, "wb") as f:
        f.write(head + b"\n" + b"".join(recs))


def test_crafted_snapshot_entries_are_cut_or_left(lab, started):
    eng, later, before = started
    eng.stop()
    path = eng.path + ".flows"
    head, recs = _records(path)
    assert len(recs) == FLOWS
    tail = struct.Struct("=IIIBBH")
    for r in recs:                                  # 127 years to live
        v = list(tail.unpack_from(r, 32))
        v[0] = 0xF0000000
        tail.pack_into(r, 32, *v)
    v = list(tail.unpack_from(recs[0], 32))         # a half-open one
    v[3] = CT_SYN_SENT
    tail.pack_into(recs[0], 32, *v)
    v = list(tail.unpack_from(recs[1], 32))         # a service port the snapshot never named
    v[1] = 60000
    tail.pack_into(recs[1], 32, *v)
    _write(path, head, recs)
    eng2 = lab.restart_engine(eng)
    later.append(eng2)
    after = flows(eng2)
    assert len(after) == FLOWS - 2, after
    assert all(left <= 120 for _, _, left in after), after      # udp stream timeout
    assert "took over %d flows" % (FLOWS - 2) in eng2.log(), eng2.log()


@pytest.mark.parametrize("spoil", ["owner", "mode"])
def test_snapshot_anyone_else_could_write_is_refused(lab, started, spoil):
    eng, later, before = started
    eng.stop()
    path = eng.path + ".flows"
    if spoil == "owner":
        os.chown(path, 65534, 65534)
    else:
        os.chmod(path, 0o662)
    eng2 = lab.restart_engine(eng)
    later.append(eng2)
    assert flows(eng2) == []
    assert "ignoring flow snapshot" in eng2.log(), eng2.log()


def test_sigkill_soon_after_a_restart_keeps_the_flows(lab, started):
    eng, later, before = started
    path = eng.path + ".flows"
    eng2 = restart(lab, eng)                        # SIGTERM: saved, taken over
    later.append(eng2)
    assert f"took over {FLOWS} flows" in eng2.log(), eng2.log()
    with open(path + ".tmp", "wb") as f:            # as a crash in the middle of a write leaves it
        f.write(b"half")
    eng3 = restart(lab, eng2, sig=signal.SIGKILL)   # well before its first periodic snapshot
    later.append(eng3)
    assert f"took over {FLOWS} flows" in eng3.log(), eng3.log()
    assert [(p, b) for p, b, _ in flows(eng3)] == [(p, b) for p, b, _ in before]
    assert not os.path.exists(path + ".tmp")
