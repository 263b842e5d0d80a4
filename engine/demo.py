"""`engine demo`: the seed walkthrough, played in a network-namespace lab.

Builds a node, a client and three pods (each answering HTTP with its own
name), runs `engine run` in the node namespace with the seed's service
manifest, sends requests to the ClusterIP and shows how they spread.
Everything is removed on exit, also on Ctrl-C.
"""
from __future__ import annotations

import collections
import os
import signal
import sys

from .lab import Lab

HERE = os.path.dirname(os.path.abspath(__file__))

SERVICE_EXAM = """apiVersion: v1
kind: Service
metadata:
  name: deploy-svc
spec:
  type: ClusterIP
  clusterIP: 10.96.100.100
  selector:
    app: deploy-nginx # 해당 app명을 기준으로 Pod를 묶는다.
  ports:
  - protocol: TCP
    port: 80 # clusterIP의 Port
    targetPort: 80 # Pod들의 Port
"""

ENGINE_DOC = """apiVersion: engine/v1alpha1
kind: EngineConfiguration
serviceCIDR: 10.96.0.0/12
masqueradeIP: 169.254.100.1
"""


def _say(msg=""):
    print(msg, flush=True)


def _bar(n, total, width=40):
    return "#" * max(1, round(width * n / total)) if n else ""


def run_demo(requests=60):
    if os.geteuid() != 0:
        print("error: engine demo needs root (network namespaces, TUN)", file=sys.stderr)
        return 1
    lab = Lab(pods=3)
    # Ctrl-C and SIGTERM: leave through the with-block so the lab is removed
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with lab:
            _say("== lab: a client, a node and three pods in network namespaces")
            for p in lab.pods:
                _say(f"   pod {p.name:<16} {p.ip}")
            _say(f"   client {lab.client_ip} -> node {lab.node_ip} -> pods on cbr0 10.244.1.0/24")
            _say()
            _say("== kubectl create -f service-exam.yaml")
            _say("   " + SERVICE_EXAM.replace("\n", "\n   ").rstrip())
            config = "---\n".join([ENGINE_DOC, SERVICE_EXAM]) + lab.pod_manifests()
            with lab.start_engine(config) as eng:
                r = lab.run(lab.node_ns, [sys.executable, "-m", "engine", "check", eng.path])
                _say("== engine check (kubectl get svc; kubectl get endpoints)")
                _say("   " + r.stdout.strip().replace("\n", "\n   "))
                _say()
                _say(f"== curl 10.96.100.100, {requests} times, from the client")
                r = lab.run(lab.client_ns, ["curl", "-s", "-m", "5", f"http://10.96.100.100/?[1-{requests}]"],
                            timeout=60 + requests)
                names = r.stdout.split()
                counts = collections.Counter(names)
                for p in lab.pods:
                    n = counts.get(p.name, 0)
                    _say(f"   {p.name:<16} {n:>4}  {_bar(n, max(1, len(names)))}")
                failed = requests - len(names)
                _say(f"   {len(names)} answered, {failed} failed")
                _say()
                _say("== the fast path's counters")
                r = lab.run(lab.node_ns, ["curl", "-s", "http://127.0.0.1:10249/metrics"])
                for line in r.stdout.splitlines():
                    if line.startswith(("engine_packets_total", "engine_flows_created_total",
                                        "engine_conntrack_entries", "engine_rejects_total")):
                        _say("   " + line)
            _say()
            _say("== engine stopped; removing the lab")
            return 0 if failed == 0 else 1
    except KeyboardInterrupt:
        _say("interrupted; lab removed")
        return 130
