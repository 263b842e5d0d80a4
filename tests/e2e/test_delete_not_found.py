"""`engine delete -f` of an object the engine does not have says so and
fails, as kubectl does (issue 10, lower severity: it printed "deleted");
the objects that do exist are still deleted."""
from test_clusterip import ENGINE, seed

EXTRA = """apiVersion: v1
kind: Service
metadata: {name: extra}
spec: {clusterIP: 10.96.100.77, ports: [{port: 80}]}
"""
NOPE = """apiVersion: v1
kind: Service
metadata: {name: nope}
spec: {clusterIP: 10.96.100.78, ports: [{port: 80}]}
"""


def test_delete_of_a_missing_service_is_not_found(lab):
    text = "---\n".join([ENGINE + "tunName: kube-tun14\n", seed("service-exam.yaml")]) + lab.pod_manifests()
    with lab.start_engine(text) as eng:
        r = eng.ctl("delete", "-f", "-", input=NOPE)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert 'Error from server (NotFound): services "nope" not found' in r.stderr
        assert "deleted" not in r.stdout + r.stderr
        assert eng.ctl("apply", "-f", "-", input=EXTRA).returncode == 0
        r = eng.ctl("delete", "-f", "-", input=EXTRA + "---\n" + NOPE)
        assert r.returncode == 1 and "service/extra deleted" in r.stderr and '"nope" not found' in r.stderr, r
        assert "extra" not in eng.ctl("get", "svc").stdout
