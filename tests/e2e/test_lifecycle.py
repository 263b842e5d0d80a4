"""Engine lifecycle: what `engine run` adds it removes again."""
from test_clusterip import ENGINE, seed


def test_sigterm_removes_tun_routes(lab):
    text = ENGINE + "tunName: kube-tun9\n---\n" + seed("service-exam.yaml") + "\n" + lab.pod_manifests()
    eng = lab.start_engine(text)
    links = lab.run(lab.node_ns, ["ip", "-o", "link", "show", "kube-tun9"])
    assert links.returncode == 0
    routes = lab.run(lab.node_ns, ["ip", "route"]).stdout
    assert "kube-tun9" in routes
    assert eng.stop() == 0
    assert lab.run(lab.node_ns, ["ip", "-o", "link", "show", "kube-tun9"]).returncode != 0
    routes = lab.run(lab.node_ns, ["ip", "route"]).stdout
    assert "kube-tun9" not in routes and "10.96.0.0/12" not in routes and "169.254.100.1" not in routes
    assert "engine stopped" in eng.log()
