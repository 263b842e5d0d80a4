"""The lab on its own (no engine): addressing, bridging, forwarding, teardown."""

import os
import subprocess
import sys

import pytest

from engine.lab import Lab, cleanup_stale, netns_list


def curl(lab, ns, url, *extra):
    r = lab.run(ns, ["curl", "-s", "-m", "5", *extra, url])
    assert r.returncode == 0, (url, r.returncode, r.stderr)
    return r.stdout


def test_node_reaches_pod(lab):
    assert curl(lab, lab.node_ns, "http://10.244.1.2/") == "deploy-nginx-1\n"
    assert [p.ip for p in lab.pods] == ["10.244.1.2", "10.244.1.3", "10.244.1.4"]
    assert [p["name"] for p in lab.pods] == ["deploy-nginx-1", "deploy-nginx-2", "deploy-nginx-3"]


def test_pod_to_pod_through_bridge(lab):
    p1, p2 = lab.pods[0], lab.pods[1]
    assert curl(lab, p1.ns, "http://%s/" % p2.ip) == "deploy-nginx-2\n"


def test_client_to_pod_routed_by_node(lab):
    # client -> node (ip_forward) -> cbr0 -> pod; the pod sees the client's address
    out = curl(lab, lab.client_ns, "http://10.244.1.4/any/path", "-i")
    assert out.endswith("\n\ndeploy-nginx-3\n")  # text mode folds \r\n
    assert "X-Client-Addr: 192.168.50.2:" in out


def test_udp_round_trip(lab):
    code = (
        "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(3);"
        "s.sendto(b'hello',('10.244.1.2',5353)); sys.stdout.write(s.recv(2048).decode())"
    )
    r = lab.run(lab.node_ns, [sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "deploy-nginx-1 hello"
    assert lab.udp_query(lab.client_ns, "10.244.1.3", 5353, "x") == "deploy-nginx-2 x"


def test_client_pings_node(lab):
    assert lab.ping(lab.client_ns, "192.168.50.1")
    assert not lab.ping(lab.client_ns, "192.168.50.250", timeout=0.5)


def test_streamed_bytes(lab):
    n = 50 * 1000 * 1000
    out = curl(lab, lab.node_ns, "http://10.244.1.2/bytes/%d" % n, "-o", "/dev/null", "-w", "%{size_download}")
    assert int(out) == n


def test_forget_pod_connections_keeps_listeners(lab):
    # a pod that closed first holds TIME_WAIT; a fresh engine's lab clears it
    curl(lab, lab.client_ns, "http://10.244.1.2/")
    states = lambda: lab.run(lab.pods[0].ns, ["ss", "-Htan"]).stdout.split("\n")
    assert any(l.startswith("TIME-WAIT") for l in states())
    lab.forget_pod_connections()
    assert [l.split()[0] for l in states() if l.strip()] == ["LISTEN"]
    assert curl(lab, lab.client_ns, "http://10.244.1.2/") == "deploy-nginx-1\n"


def test_scale_pod_up_and_down(lab):
    pod = lab.add_pod()
    try:
        assert pod.name == "deploy-nginx-4" and pod.ip == "10.244.1.5"
        assert curl(lab, lab.client_ns, "http://10.244.1.5/") == "deploy-nginx-4\n"
    finally:
        lab.remove_pod(pod.name)
    assert pod.ns not in netns_list()
    assert lab.run(lab.node_ns, ["curl", "-s", "-m", "1", "http://10.244.1.5/"]).returncode != 0
    assert [p.name for p in lab.pods] == ["deploy-nginx-1", "deploy-nginx-2", "deploy-nginx-3"]


def test_extra_host_on_lan(lab):
    host = lab.add_host("dns", "192.168.50.53")
    try:
        assert lab.ping(lab.client_ns, "192.168.50.53")       # same L2 via lan0
        assert curl(lab, host.ns, "http://10.244.1.2/") == "deploy-nginx-1\n"  # routed
    finally:
        lab.remove_host("dns")
    assert host.ns not in netns_list()


def test_down_removes_everything():
    lab = Lab(pods=2)
    lab.up()
    names = lab.namespaces
    pids = [p.proc.pid for p in lab.pods]
    assert set(names) <= set(netns_list())
    lab.down()
    lab.down()  # idempotent
    assert not set(names) & set(netns_list())
    for pid in pids:
        assert not os.path.exists("/proc/%d" % pid)


def test_down_runs_when_block_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with Lab(pods=1) as lab:
            names = lab.namespaces
            assert len(names) == 3
            raise RuntimeError("boom")
    assert not set(names) & set(netns_list())


def test_cleanup_stale_spares_live_labs(lab):
    # looks like a crashed lab's namespace: no lock held for its prefix
    stale = "eng9999%s-node" % os.urandom(3).hex()
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        deleted = cleanup_stale()
        assert stale in deleted
        assert stale not in netns_list()
        assert set(lab.namespaces) <= set(netns_list())  # our live lab untouched
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)

