"""Live changes end to end: scaling by editing the manifests while clients
keep talking, engine apply/delete, and the inspection commands."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from test_clusterip import ENGINE, seed

VIP = "10.96.100.100"

PROBE = r"""
import json, socket, sys, time
# one HTTP request every 50 ms (new connection each), one UDP echo every 100 ms
# from a fixed source port; one JSON line per answer
vip, dur = sys.argv[1], float(sys.argv[2])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 47000)); u.settimeout(0.3)
end = time.time() + dur; n = 0
while time.time() < end:
    t = time.time()
    try:
        s = socket.create_connection((vip, 80), timeout=2)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n"); data = b""
        while True:
            b = s.recv(4096)
            if not b: break
            data += b
        s.close()
        print(json.dumps({"t": t, "http": data.split(b"\r\n\r\n", 1)[1].decode().strip()}), flush=True)
    except Exception as e:
        print(json.dumps({"t": t, "http_error": repr(e)}), flush=True)
    if n % 2 == 0:
        try:
            u.sendto(b"x", (vip, 53)); print(json.dumps({"t": t, "udp": u.recv(100).decode().split()[0]}), flush=True)
        except Exception as e:
            print(json.dumps({"t": t, "udp_error": repr(e)}), flush=True)
    n += 1
    time.sleep(max(0, 0.05 - (time.time() - t)))
"""

UDP_SVC = """---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  clusterIP: 10.96.100.100
  selector: {app: deploy-nginx}
  ports: [{name: echo, protocol: UDP, port: 53, targetPort: echo}]
"""


@pytest.fixture(scope="module")
def live(lab, tmp_path_factory):
    d = tmp_path_factory.mktemp("live")
    (d / "manifests").mkdir()
    svc = seed("service-exam.yaml").replace("ports:\n", "ports:\n  - {name: echo, protocol: UDP, port: 53, targetPort: echo}\n")
    svc = svc.replace("  - protocol: TCP\n", "  - name: http\n    protocol: TCP\n")
    (d / "manifests" / "svc.yaml").write_text(svc)
    extra = [lab.add_pod(), lab.add_pod()]       # pods 4 and 5 exist but are not in the manifests yet
    (d / "manifests" / "pods.yaml").write_text(lab.pod_manifests(pods=lab.pods[:3]))
    text = ENGINE + "manifests: [%s]\n" % (d / "manifests")
    eng = lab.start_engine(text)
    yield eng, d
    eng.stop()
    for p in extra:
        lab.remove_pod(p.name)


def test_scale_3_5_2_while_clients_talk(lab, live):
    eng, d = live
    pods_file = d / "manifests" / "pods.yaml"
    all_pods = lab.pods[:5]
    probe = lab.popen(lab.client_ns, [sys.executable, "-c", PROBE, VIP, "9"], stdout=subprocess.PIPE, text=True)
    # scale 3 -> 5
    time.sleep(1.5)
    t_up = time.time()
    pods_file.write_text(lab.pod_manifests(pods=all_pods))
    time.sleep(3.0)
    # a long download through the change
    dl = lab.popen(lab.client_ns, ["curl", "-s", "-D", "-", "-o", "/dev/null", "--limit-rate", "40M",
                                    "-w", "size=%{size_download}\n", f"http://{VIP}/bytes/120000000"],
                   stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    # scale 5 -> 2, removing the pod the UDP client is on (found in the engine's conntrack)
    ct = eng.ctl("conntrack", "-p", "udp", "--sport", "47000").stdout
    m = re.search(r"src=(10\.244\.1\.\d+) dst=169\.254\.100\.1 sport=5353", ct)
    assert m, ct
    udp_ip = m.group(1)
    keep = [p for p in all_pods if p.ip != udp_ip][:2]
    t_down = time.time()
    pods_file.write_text(lab.pod_manifests(pods=keep))
    out, _ = probe.communicate(timeout=30)
    dl_out, _ = dl.communicate(timeout=60)
    events = [json.loads(l) for l in out.splitlines()]
    http = [e for e in events if "http" in e or "http_error" in e]
    assert http and not [e for e in http if "http_error" in e], [e for e in http if "http_error" in e][:5]
    new = {p.name for p in all_pods[3:]}
    first_new = min(e["t"] for e in http if e.get("http") in new)
    assert first_new - t_up < 1.0
    late = [e for e in http if e["t"] > t_down + 1.0]
    assert late and all(e["http"] in {p.name for p in keep} for e in late), late
    udp_names = {p.ip: p.name for p in all_pods}
    udp_after = [e for e in events if "udp" in e and e["t"] > t_down + 1.0]
    assert udp_after and all(e["udp"] != udp_names[udp_ip] for e in udp_after), (eng.log()[-3000:], t_down, udp_ip, eng.ctl("stats").stdout)
    assert "size=120000000" in dl_out, dl_out


def test_apply_and_delete(lab, live):
    eng, _ = live
    r = eng.ctl("apply", "-f", "-", input=UDP_SVC.replace("name: echo}", "name: extra}")
                .replace("10.96.100.100", "10.96.100.150"))
    assert r.returncode == 0 and "service/extra configured" in r.stdout, r.stderr
    ans = lab.udp_query(lab.client_ns, "10.96.100.150", 53, payload="hi")
    assert ans is not None, (eng.ctl("stats").stdout, eng.ctl("conntrack").stdout, eng.ctl("get", "endpoints").stdout)
    bad = eng.ctl("apply", "-f", "-", input="kind: Service\nmetadata: {name: bad}\nspec: {ports: [{port: 99999}]}\n")
    assert bad.returncode == 1 and "spec.ports[0].port: 99999 is out of range" in bad.stderr
    assert lab.udp_query(lab.client_ns, "10.96.100.150", 53, payload="hi") is not None   # unchanged
    r = eng.ctl("delete", "-f", "-", input=UDP_SVC.replace("name: echo}", "name: extra}"))
    assert r.returncode == 0 and "service/extra deleted" in r.stdout
    q = lab.python(lab.client_ns, "import socket;s=socket.socket(2,2);s.settimeout(1);s.sendto(b'x',('10.96.100.150',53))\n"
                                  "try: s.recv(9); print('answered')\nexcept OSError: print('no')")
    assert q.stdout.strip() == "no"


def test_a_service_file_moved_in_and_removed_is_seen_at_once(lab, live):
    """inotify: a manifest renamed into the folder (as editors and
    config-management tools write) is served within a second, and its
    removal withdraws the service; only the changed file is read."""
    eng, d = live
    tmp, f = d / "manifests" / ".watched.yaml.tmp", d / "manifests" / "watched.yaml"
    tmp.write_text(UDP_SVC.replace("name: echo}", "name: watched}").replace("10.96.100.100", "10.96.100.170"))
    t0 = time.time()
    os.replace(tmp, f)
    while lab.udp_query(lab.client_ns, "10.96.100.170", 53, payload="hi", timeout=0.2) is None:
        assert time.time() - t0 < 3, eng.log()[-2000:]
    assert time.time() - t0 < 1.0
    assert "no inotify" not in eng.log()
    f.unlink()
    t0 = time.time()
    while lab.udp_query(lab.client_ns, "10.96.100.170", 53, payload="hi", timeout=0.2) is not None:
        assert time.time() - t0 < 3, eng.log()[-2000:]
    assert "watched" not in eng.ctl("get", "svc").stdout


def test_bad_file_change_keeps_running_table(lab, live):
    eng, d = live
    f = d / "manifests" / "svc.yaml"
    good = f.read_text()
    f.write_text(good.replace("port: 80", "port: 80000"))
    time.sleep(1.0)
    assert "reload refused, running table unchanged" in eng.log()
    assert lab.http_get(lab.client_ns, f"http://{VIP}/").strip()
    f.write_text(good)


def test_get_describe_endpoints_stats(lab, live):
    eng, _ = live
    r = eng.ctl("get", "svc")
    assert r.returncode == 0
    rows = [l.split() for l in r.stdout.splitlines()]
    assert ["default", "deploy-svc", "ClusterIP", "10.96.100.100", "<none>"] in [row[:5] for row in rows], rows
    # the engine's own DNS, as any cluster shows it
    assert ["kube-system", "kube-dns", "ClusterIP", "10.96.0.10", "<none>", "53/UDP,53/TCP"] in rows, rows
    r = eng.ctl("describe", "svc", "deploy-svc")
    assert re.search(r"^Endpoints:\s+10\.244\.1\.\d+:80", r.stdout, re.M), r.stdout
    assert "Session Affinity:" in r.stdout and "Scheduler:" in r.stdout
    r = eng.ctl("get", "endpoints")
    assert "deploy-svc" in r.stdout and "10.244.1." in r.stdout
    lab.http_get(lab.client_ns, f"http://{VIP}/")
    r = eng.ctl("conntrack", "-p", "tcp", "--dport", "80")
    assert re.search(r"^tcp\s+6 \d+ \w+ src=192\.168\.50\.2 dst=10\.96\.100\.100 sport=\d+ dport=80 src=10\.244", r.stdout, re.M)
    r = eng.ctl("stats")
    assert re.search(r"^rx_packets\s+\d+", r.stdout, re.M)
    r = eng.ctl("describe", "svc", "nope")
    assert r.returncode == 1 and 'services "nope" not found' in r.stderr


def test_control_socket_is_root_only(lab, live):
    eng, _ = live
    assert oct(os.stat(eng.socket).st_mode & 0o777) == "0o600"
