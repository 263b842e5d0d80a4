"""`engine demo` plays the whole seed walkthrough and leaves nothing behind."""
import subprocess
import sys

from engine.lab import netns_list


def test_demo_runs_and_cleans_up():
    before = set(netns_list())
    r = subprocess.run([sys.executable, "-m", "engine", "demo", "--requests", "30"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for step in ("(1) kubectl create -f service-exam.yaml", "(2) scale the deployment to 5 pods",
                 "(3) kubectl apply -f nodeport-exam.yaml", "(4) kubectl apply -f loadbalancer-exam.yaml",
                 "(5) kubectl apply -f externalname-exam.yaml"):
        assert step in out
    assert "IN CNAME google.com." in " ".join(out.split())
    assert "deploy-nginx-5" in out
    assert set(netns_list()) == before
