"""`engine demo`: the seed walkthrough, played in a network-namespace lab.

As in the notes (shared/seed), with the seed manifests as they are:
  1. three nginx-like pods and `kubectl create -f service-exam.yaml`:
     curl 10.96.100.100 spreads over the pods
  2. scale the deployment 3 -> 5: the service's endpoints follow
  3. nodeport-exam.yaml: curl NODE_IP:30200 from another host
  4. loadbalancer-exam.yaml: an ingress IP from the pool, reached from outside
  5. externalname-exam.yaml: dig and curl external-svc.default.svc.cluster.local
Everything is removed on exit, also on Ctrl-C.
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import tempfile
import time

from .netns import Lab

SEED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "seed")
UPSTREAM, WEB = "192.168.50.53", "192.168.50.80"

ENGINE_DOC = f"""apiVersion: engine/v1alpha1
kind: EngineConfiguration
serviceCIDR: 10.96.0.0/12
masqueradeIP: 169.254.100.1
loadBalancerCIDR: 172.18.255.0/24
dns: {{clusterIP: 10.96.0.10, upstream: [{UPSTREAM}]}}
manifests: [./manifests]
"""


def seed(name):
    with open(os.path.join(SEED, name), encoding="utf-8") as f:
        return f.read()


def _say(msg=""):
    print(msg, flush=True)


def _indent(text):
    return "   " + text.strip().replace("\n", "\n   ")


def _spread(lab, url, n, ns=None):
    r = lab.run(ns or lab.client_ns, ["curl", "-s", "-m", "5", f"{url}?[1-{n}]"], timeout=60 + n)
    names = r.stdout.split()
    counts = collections.Counter(names)
    for name in sorted(counts):
        c = counts[name]
        _say(f"   {name:<16} {c:>4}  {'#' * max(1, round(40 * c / max(1, len(names))))}")
    _say(f"   {len(names)} of {n} answered")
    return n - len(names)


def run_demo(requests=60):
    if os.geteuid() != 0:
        print("error: engine demo needs root (network namespaces, TUN)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    failed = 0
    try:
        with Lab(pods=3) as lab, tempfile.TemporaryDirectory(prefix="engine-demo-") as tmp:
            _say("== a lab in network namespaces: a client, a node, three pods (deploy-nginx)")
            for p in lab.pods:
                _say(f"   pod {p.name:<16} {p.ip}")
            _say(f"   client {lab.client_ip} -> node {lab.node_ip} (engine, TUN kube-tun0) -> pods on 10.244.1.0/24")
            up = lab.add_host("updns", UPSTREAM)
            web = lab.add_host("google", WEB)
            lab.popen(web.ns, [sys.executable, "-m", "engine.lab.podserver", "--name", "google.com", "--http-port", "80"])
            dnsp = lab.popen(up.ns, [sys.executable, "-m", "engine.lab.dns", "--bind", "0.0.0.0", "--port", "53",
                                     "--record", f"google.com=A:{WEB}"], stdout=subprocess.PIPE)
            dnsp.stdout.readline()
            lab.set_resolv_conf(lab.client_ns, "search default.svc.cluster.local svc.cluster.local cluster.local\n"
                                               "nameserver 10.96.0.10\noptions ndots:5\n")
            man = os.path.join(tmp, "manifests")
            os.makedirs(man)
            with open(os.path.join(man, "deploy-nginx.yaml"), "w") as f:
                f.write(seed("deploy-nginx.yaml"))
            pods_file = os.path.join(man, "pods.yaml")
            with open(pods_file, "w") as f:
                f.write(lab.pod_manifests())
            with open(os.path.join(man, "service-exam.yaml"), "w") as f:
                f.write(seed("service-exam.yaml"))
            config = os.path.join(tmp, "config.yaml")
            with open(config, "w") as f:
                f.write(ENGINE_DOC)
            with lab.start_engine(open(config).read().replace("./manifests", man)) as eng:
                _say()
                _say("== (1) kubectl create -f service-exam.yaml   (ClusterIP 10.96.100.100)")
                _say(_indent(eng.ctl("get", "svc").stdout))
                _say()
                _say("== kubectl describe svc deploy-svc")
                _say(_indent(eng.ctl("describe", "svc", "deploy-svc").stdout))
                _say()
                _say(f"== curl 10.96.100.100, {requests} times, from the client")
                failed += _spread(lab, "http://10.96.100.100/", requests)

                _say()
                _say("== (2) scale the deployment to 5 pods: the endpoints follow by themselves")
                lab.add_pod()
                lab.add_pod()
                with open(pods_file, "w") as f:
                    f.write(lab.pod_manifests())
                time.sleep(1.0)
                _say(_indent(eng.ctl("get", "endpoints").stdout))
                failed += _spread(lab, "http://10.96.100.100/", requests)

                _say()
                _say("== (3) kubectl apply -f nodeport-exam.yaml   (NodePort 30200 on every node address)")
                _say(_indent(eng.ctl("apply", "-f", os.path.join(SEED, "nodeport-exam.yaml")).stdout))
                _say(_indent(eng.ctl("get", "svc").stdout))
                _say(f"== curl {lab.node_ip}:30200 from the client (another host)")
                failed += _spread(lab, f"http://{lab.node_ip}:30200/", requests // 2)

                _say()
                _say("== (4) kubectl apply -f loadbalancer-exam.yaml   (ingress from loadBalancerCIDR 172.18.255.0/24)")
                _say(_indent(eng.ctl("apply", "-f", os.path.join(SEED, "loadbalancer-exam.yaml")).stdout))
                out = eng.ctl("get", "svc").stdout
                _say(_indent(out))
                ingress = next(l.split()[4] for l in out.splitlines() if " deploy-svc " in l)
                _say(f"== curl {ingress} from the client")
                failed += _spread(lab, f"http://{ingress}/", requests // 2)

                _say()
                _say("== (5) kubectl apply -f externalname-exam.yaml   (DNS only: a CNAME)")
                _say(_indent(eng.ctl("apply", "-f", os.path.join(SEED, "externalname-exam.yaml")).stdout))
                _say(_indent(eng.ctl("get", "svc").stdout))
                _say("== dig external-svc.default.svc.cluster.local   (upstream: a DNS server of the lab's own)")
                r = lab.run(lab.client_ns, ["dig", "+noall", "+answer", "external-svc.default.svc.cluster.local"])
                _say(_indent(r.stdout))
                _say("== curl external-svc.default.svc.cluster.local   (google.com here is a host in the lab)")
                r = lab.run(lab.client_ns, ["curl", "-s", "-m", "5", "http://external-svc.default.svc.cluster.local/"])
                _say(_indent(r.stdout or "(no answer)"))
                failed += 0 if r.stdout.strip() == "google.com" else 1

                _say()
                _say("== engine stats")
                _say(_indent(eng.ctl("stats").stdout))
            _say()
            _say("== engine stopped; removing the lab")
        return 0 if failed == 0 else 1
    except KeyboardInterrupt:
        _say("interrupted; lab removed")
        return 130
