"""Queue steering (engine/steering.py): the eBPF program on a real
multi-queue TUN, and both directions of a flow on one engine worker."""
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from test_clusterip import ENGINE, seed

PROBE = textwrap.dedent("""
    import fcntl, os, select, socket, sys, time, ipaddress
    sys.path.insert(0, %(root)r)
    from pytun import TunTapDevice, IFF_TUN, IFF_NO_PI, IFF_MULTI_QUEUE
    from engine import steering
    flags = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE
    qs = [TunTapDevice(name="st0", flags=flags) for _ in range(2)]
    steering.attach(qs[0].fileno(), int(ipaddress.IPv4Address("169.254.100.1")))
    for q in qs:
        fcntl.fcntl(q.fileno(), fcntl.F_SETFL, os.O_NONBLOCK)
    os.system("sysctl -qw net.ipv6.conf.all.disable_ipv6=1; ip link set st0 up && "
              "ip route add 10.99.0.0/16 dev st0 && ip route add 169.254.100.1/32 dev st0")
    def queue_of(dst, sport, dport):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", sport))
        s.sendto(b"x", (dst, dport))
        s.close()
        time.sleep(0.1)
        found = set()
        for i, q in enumerate(qs):      # the UDP datagram, among whatever else came
            while True:
                try:
                    p = os.read(q.fileno(), 2048)
                except BlockingIOError:
                    break
                if p[0] >> 4 == 4 and p[9] == 17 and p[20:24] == sport.to_bytes(2, "big") + dport.to_bytes(2, "big"):
                    found.add(i)
        assert len(found) == 1, found
        return found.pop()
    out = []
    for port in (40001, 40002, 40003, 40004):
        out.append(("client", port, queue_of("10.99.0.1", port, 80)))        # by source port
        out.append(("reply", port, queue_of("169.254.100.1", 5555, port)))  # by destination port
    print(out)
""")


def test_program_steers_by_port_on_a_real_tun():
    ns = "st-" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE % {"root": root}],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        got = eval(r.stdout)
        # both sides of a port land on the same queue, and the two parities on different ones
        by_port = {}
        for side, port, q in got:
            by_port.setdefault(port, set()).add(q)
        assert all(len(qs) == 1 for qs in by_port.values()), got
        assert by_port[40001] == by_port[40003] != by_port[40002] == by_port[40004], got
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def queue_counts(eng):
    rows = dict(l.split(None, 1) for l in eng.ctl("stats").stdout.splitlines()[1:] if l.strip())
    return [int(rows[k]) for k in sorted(rows) if k.startswith("queue") and k.endswith(".rx_packets")], rows


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one queue per core: needs two cores")
def test_both_directions_of_a_flow_reach_one_worker(lab):
    text = "---\n".join([ENGINE + "tunName: kube-tun4\n", seed("service-exam.yaml")]) + lab.pod_manifests()
    with lab.start_engine(text) as eng:
        before, rows = queue_counts(eng)
        assert rows["queue_steering"].startswith("ebpf"), rows
        assert len(before) == 2
        r = lab.run(lab.client_ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}",
                                    "--local-port", "45001", "http://10.96.100.100/bytes/20000000"])
        assert r.stdout == "20000000"
        one = [a - b for a, b in zip(queue_counts(eng)[0], before)]
        assert sum(one) > 300 and min(one) == 0, one          # data and ACKs: one queue
        r = lab.run(lab.client_ns, ["curl", "-s", "-o", "/dev/null", "--local-port", "45002",
                                    "http://10.96.100.100/bytes/20000000"])
        two = [a - b for a, b in zip(queue_counts(eng)[0], before)]
        assert min(two) > 300, two                              # the other parity: the other queue
