#!/usr/bin/env python3
"""A fixed fast-path workload for instruction counts (A/B of a C change).

Counts are stable under load where timings are not, so a change to cext/ is
compared by the instructions its workload costs, measured inside
Dataplane.process_batch only (set-up and Python are left out):

    flock /tmp/engine-bench.lock valgrind --tool=callgrind \\
        --callgrind-out-file=/tmp/cg.out --toggle-collect='*process_batch*' \\
        python3 bench/callgrind_fastpath.py
    callgrind_annotate /tmp/cg.out | head -20     # "PROGRAM TOTALS"

Workload: 4096 new TCP flows (SYN) over 64 backends in batches of 64, their
SYN-ACKs and ACKs, then 64 established ACKs x 200 repeats, 2048 new UDP
flows, and 64 packets that are dropped or answered (no service, unserved
port) x 50 repeats. Every verdict is checked, so a broken build fails here.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import TH_ACK, TH_SYN, TcpFactory, client_addr, ip_int, tcp_packet, udp_packet  # noqa: E402

from engine import _fastpath  # noqa: E402

MASQ = ip_int("169.254.100.1")
VIP = ip_int("10.96.100.100")
NOW = 1000.0


def main():
    backends = [(ip_int("10.244.0.0") + 2 + i, 8080) for i in range(64)]
    t = _fastpath.Tables([
        {"name": "default/web:http", "vip": VIP, "port": 80, "proto": 6, "backends": backends},
        {"name": "default/web:dns", "vip": VIP, "port": 53, "proto": 17, "backends": backends,
         "scheduler": 4},
    ], vips=[VIP], drop_cidrs=[(ip_int("10.96.0.0"), 12)])
    dp = _fastpath.Dataplane(MASQ, max_flows=16384, batch=64, tables=t)
    pb = dp.process_batch

    clients = [client_addr(i) for i in range(4096)]
    syn = TcpFactory(VIP, 80, TH_SYN)
    ack = TcpFactory(VIP, 80, TH_ACK, b"p" * 24)
    for i in range(0, len(clients), 64):
        assert pb([syn.make(a, p) for a, p in clients[i:i + 64]], NOW) == 64
    reply = {(f["orig"][0], f["orig"][1]): f["reply"] for f in dp.flows(NOW)}
    synack = [tcp_packet(*reply[c], TH_SYN | TH_ACK) for c in clients]
    for i in range(0, len(synack), 64):
        assert pb(synack[i:i + 64], NOW) == 64
    for i in range(0, len(clients), 64):
        assert pb([ack.make(a, p) for a, p in clients[i:i + 64]], NOW) == 64
    assert pb([ack.make(a, p) for a, p in clients[:64]], NOW, 200) == 64 * 200
    for i in range(0, 2048, 64):
        assert pb([udp_packet(a, p, VIP, 53) for a, p in clients[i:i + 64]], NOW) == 64
    odd = [tcp_packet(a, p, VIP + 1 + i % 2, 80, TH_SYN) if i % 4 else tcp_packet(a, p, VIP, 81, TH_SYN)
           for i, (a, p) in enumerate(clients[:64])]
    pb(odd, NOW, 50)
    c = dp.counters()
    assert c["flows_created"] == 4096 + 2048, c
    assert c["rejects"] == 16 * 50, c          # port 81 on the VIP: refused (rate limit 1000/s)
    print(c["rx_packets"], "packets", c["flows_created"], "flows")


if __name__ == "__main__":
    main()
