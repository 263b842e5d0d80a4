"""Engine lifecycle: what `engine run` adds it removes again."""
import re

from test_clusterip import ENGINE, seed

NODE = "192.168.50.1"


def test_sigterm_removes_tun_routes(lab):
    text = ENGINE + "tunName: kube-tun9\n---\n" + seed("service-exam.yaml") + "\n" + lab.pod_manifests()
    with lab.start_engine(text) as eng:        # stopped on the way out, also on failure
        links = lab.run(lab.node_ns, ["ip", "-o", "link", "show", "kube-tun9"])
        assert links.returncode == 0
        routes = lab.run(lab.node_ns, ["ip", "route"]).stdout
        assert "kube-tun9" in routes
        assert eng.stop() == 0
    assert lab.run(lab.node_ns, ["ip", "-o", "link", "show", "kube-tun9"]).returncode != 0
    routes = lab.run(lab.node_ns, ["ip", "route"]).stdout
    assert "kube-tun9" not in routes and "10.96.0.0/12" not in routes and "169.254.100.1" not in routes
    assert "engine stopped" in eng.log()


def test_rules_are_removed_on_exit(lab):
    text = "---\n".join([ENGINE + "tunName: kube-tun8\n", seed("nodeport-exam.yaml")]) + lab.pod_manifests()
    before = lab.run(lab.node_ns, ["ip", "rule"]).stdout
    with lab.start_engine(text, healthz="127.0.0.1:10256") as eng:
        during = lab.run(lab.node_ns, ["ip", "rule"]).stdout
        assert re.search(r"to 192\.168\.50\.1 ipproto tcp dport 30000-32767 lookup 2004", during), during
        assert lab.run(lab.client_ns, ["curl", "-s", "-m", "5", f"http://{NODE}:30200/"]).returncode == 0
        assert eng.stop() == 0
    after = lab.run(lab.node_ns, ["ip", "rule"]).stdout
    assert after == before
    assert "2004" not in lab.run(lab.node_ns, ["ip", "route", "show", "table", "all"]).stdout


def _download_survives(lab, text, size, rate, settle, interrupt):
    """Run a paced download through an engine on text; after settle seconds
    call interrupt(engine) -> the engine that carries on; the download must
    still complete whole. Returns (old engine, new engine)."""
    import subprocess
    import time
    eng = lab.start_engine(text)
    eng2 = None
    try:
        with lab.small_receive_buffer(lab.client_ns):
            dl = lab.popen(lab.client_ns, ["curl", "-s", "-o", "/dev/null", "--limit-rate", rate, "-m", "60",
                                            "-w", "%{size_download} %{http_code}", f"http://10.96.100.100/bytes/{size}"],
                           stdout=subprocess.PIPE, text=True)
            try:
                time.sleep(settle)
                ct = eng.ctl("conntrack", "-p", "tcp").stdout
                assert "ESTABLISHED" in ct, ct                 # still on the wire
                eng2 = interrupt(eng)
                out, _ = dl.communicate(timeout=90)
                assert out.split() == [str(size), "200"], out
            finally:
                dl.kill()
        return eng, eng2
    finally:
        eng.stop()
        if eng2:
            assert eng2.stop() == 0


def test_restart_keeps_a_long_transfer(lab):
    """SIGTERM writes the flow table; the next start takes it over, so an
    established download carries on after a few retransmissions."""
    text = "---\n".join([ENGINE + "tunName: kube-tun7\n", seed("service-exam.yaml")]) + lab.pod_manifests()
    eng, eng2 = _download_survives(lab, text, 60_000_000, "10M", 1.5, lab.restart_engine)
    assert "saved" in eng.log() and "took over 1 flows" in eng2.log(), (eng.log(), eng2.log())


def test_sigkill_keeps_flows_of_the_last_snapshot(lab):
    """A crash writes nothing: the periodic snapshot (conntrack.snapshotInterval)
    is what the next start takes over, so a download older than it survives
    a SIGKILL."""
    import signal
    text = "---\n".join([ENGINE + "tunName: kube-tun5\nconntrack: {snapshotInterval: 1}\n",
                         seed("service-exam.yaml")]) + lab.pod_manifests()

    def crash(eng):
        eng.stop(sig=signal.SIGKILL)
        return lab.restart_engine(eng)
    # settle 2.5 s: in at least one snapshot
    eng, eng2 = _download_survives(lab, text, 40_000_000, "8M", 2.5, crash)
    assert "saved" not in eng.log()                     # nothing written on the way down
    assert "took over 1 flows" in eng2.log(), eng2.log()


def test_start_after_sigkill_takes_over_leftovers(lab):
    """A killed engine leaves its ip rules behind (the TUN goes with its fd);
    the next start must take them over, and its exit remove them."""
    import signal
    text = "---\n".join([ENGINE + "tunName: kube-tun6\n", seed("nodeport-exam.yaml")]) + lab.pod_manifests()
    before = lab.run(lab.node_ns, ["ip", "rule"]).stdout
    eng = lab.start_engine(text)
    eng.stop(sig=signal.SIGKILL)
    with lab.restart_engine(eng) as eng2:
        assert lab.run(lab.client_ns, ["curl", "-s", "-m", "5", f"http://{NODE}:30200/"]).returncode == 0
        assert eng2.stop() == 0
    assert lab.run(lab.node_ns, ["ip", "rule"]).stdout == before
