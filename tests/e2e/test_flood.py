"""A SYN flood against a service while a long download runs through it.

The engine's flow table is bounded (conntrack max 2048 here). A second
outside host floods the VIP with raw SYNs from random source ports for about
three seconds, far more flows than fit; meanwhile the client downloads a
file at a limited rate, so its connection is established before the flood
and lasts past it. The table must stay within its bound, the flood's
unestablished flows must be the ones evicted (the download survives and
completes with every byte), the engine must stay up, and new connections
must work once the flood is over.

All traffic stays inside the lab's namespaces.
"""
import json
import re
import subprocess
import sys
import time

import pytest

from test_clusterip import ENGINE, seed

VIP = "10.96.100.100"
ATTACKER_IP = "192.168.50.66"
MAX_FLOWS = 2048
DOWNLOAD = 30_000_000            # bytes: more than the socket buffers hold
RATE = "3M"                      # curl --limit-rate: ~10 s, so it spans the flood
FLOOD_SECONDS = 3.0
FLOOD_PPS = 20000

# Runs in the attacker's namespace: scapy builds one SYN, the loop sends it
# from random source ports through a raw socket (scapy's own send loop is too
# slow for a flood), paced to FLOOD_PPS, for FLOOD_SECONDS.
FLOOD = r"""
import json, random, socket, struct, sys, time
from scapy.all import IP, TCP, raw
src, vip, port, seconds, pps = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
tmpl = bytearray(raw(IP(src=src, dst=vip, ttl=64) / TCP(sport=1, dport=port, flags="S", seq=12345, window=1024)))
csum0 = struct.unpack_from("!H", tmpl, 36)[0]
def patch(sport):
    # RFC 1624: the checksum follows the source port from 1 to sport
    s = (~csum0 & 0xffff) + (~1 & 0xffff) + sport
    s = (s & 0xffff) + (s >> 16); s = (s & 0xffff) + (s >> 16)
    b = bytearray(tmpl); struct.pack_into("!HH", b, 20, sport, port); struct.pack_into("!H", b, 36, ~s & 0xffff)
    return bytes(b)
rng = random.Random(7)
pkts = [patch(rng.randrange(1024, 65536)) for _ in range(4096)]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
print("ready", flush=True)
sys.stdin.readline()                # go: the test's download is established by now
print("flooding", flush=True)
t0 = time.monotonic(); sent = errors = 0
while True:
    now = time.monotonic() - t0
    if now >= seconds:
        break
    due = int(now * pps)
    while sent < due:
        try:
            s.sendto(pkts[sent % len(pkts)] if sent < len(pkts) else patch(rng.randrange(1024, 65536)), (vip, 0))
        except OSError:
            errors += 1
        sent += 1
    time.sleep(0.001)
print(json.dumps({"sent": sent, "errors": errors, "seconds": time.monotonic() - t0}))
"""


def stats(eng):
    r = eng.ctl("stats")
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) == 2 and re.fullmatch(r"\d+", parts[1]):
            out[parts[0]] = int(parts[1])
    return out


def sport(line):
    return re.search(r"sport=(\d+)", line).group(1)


def download_flows(eng, lab):
    """conntrack lines of the client's open connections to the VIP (the
    warm-up request's flow lingers in TIME_WAIT, or CLOSE if it was reset)."""
    r = eng.ctl("conntrack", "-p", "tcp", "--dport", "80")
    return [l for l in r.stdout.splitlines() if f"src={lab.client_ip} dst={VIP}" in l
            and " TIME_WAIT " not in l and " CLOSE " not in l]


@pytest.fixture(scope="module")
def flood_lab(lab):
    text = ENGINE + "conntrack: {max: %d}\n---\n" % MAX_FLOWS + seed("service-exam.yaml") + lab.pod_manifests()
    host = lab.add_host("attacker", ATTACKER_IP)
    try:
        with lab.start_engine(text) as eng:
            yield eng, host
    finally:
        lab.remove_host("attacker")


def test_syn_flood_fills_the_table_and_the_download_survives(lab, flood_lab):
    eng, host = flood_lab
    assert lab.http_get(lab.client_ns, f"http://{VIP}/").strip()          # the service works
    before = stats(eng)
    assert before["max_flows"] == MAX_FLOWS

    # the flooder first: scapy takes a while to import on a loaded machine,
    # and the download must still be running when the flood is at its peak
    flood = lab.popen(host.ns, [sys.executable, "-c", FLOOD, ATTACKER_IP, VIP, "80", str(FLOOD_SECONDS), str(FLOOD_PPS)],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert flood.stdout.readline().strip() == "ready", flood.stderr.read() if flood.poll() is not None else ""
    dl = lab.popen(lab.client_ns, ["curl", "-s", "-o", "/dev/null", "--limit-rate", RATE, "-m", "60",
                                   "-w", "%{http_code} %{size_download}", f"http://{VIP}/bytes/{DOWNLOAD}"],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)                                  # established before the flood starts
    ours = download_flows(eng, lab)
    assert len(ours) == 1 and re.search(r" (ESTABLISHED|CLOSE_WAIT) ", ours[0]), ours
    flood.stdin.write("go\n")
    flood.stdin.flush()
    assert flood.stdout.readline().strip() == "flooding"
    # in the middle of the flood: the table is at its bound, the download's flow is in it
    time.sleep(FLOOD_SECONDS / 2)
    mid = stats(eng)
    mid_ours = download_flows(eng, lab)
    out, err = flood.communicate(timeout=FLOOD_SECONDS + 30)
    assert flood.returncode == 0, err
    sent = json.loads(out.strip().splitlines()[-1])
    assert sent["sent"] > 10 * MAX_FLOWS, sent        # far more SYNs than the table holds

    dl_out, dl_err = dl.communicate(timeout=90)
    after = stats(eng)
    assert dl.returncode == 0, (dl.returncode, dl_err, after)
    assert dl_out.split() == ["200", str(DOWNLOAD)], dl_out

    assert eng.proc.poll() is None, eng.log()[-3000:]
    assert mid["flows"] <= MAX_FLOWS and after["flows"] <= MAX_FLOWS, (mid, after)
    assert mid["flows"] >= MAX_FLOWS * 0.9, mid      # the flood did fill it
    # the download's flow was never evicted: the same connection, still open
    # (CLOSE_WAIT once the server has written its last byte and closed)
    assert len(mid_ours) == 1 and re.search(r" (ESTABLISHED|CLOSE_WAIT) ", mid_ours[0]), (ours, mid_ours)
    assert sport(mid_ours[0]) == sport(ours[0]), (ours, mid_ours)
    evicted = after["flows_evicted"] - before["flows_evicted"]
    full = after.get("drops.table_full", 0) - before.get("drops.table_full", 0)
    assert evicted > 0 or full > 0, after
    print(f"flood: {sent}; mid {mid['flows']} flows; evicted {evicted}, table_full {full}; "
          f"drops {after['drops'] - before['drops']}")


def test_new_requests_succeed_after_the_flood(lab, flood_lab):
    eng, _ = flood_lab
    r = lab.run(lab.client_ns, ["curl", "-s", "-m", "5", f"http://{VIP}/?[1-20]"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 20 and set(r.stdout.split()) <= {p.name for p in lab.pods}
    healthz = lab.run(lab.node_ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "2",
                                    "http://127.0.0.1:10256/healthz"])
    assert healthz.stdout == "200"
    assert stats(eng)["flows"] <= MAX_FLOWS
