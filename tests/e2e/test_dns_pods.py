"""dns.pods: verified end to end, with its own engine (the lab's others
run with the default, insecure): Pods that arrive and leave live, backing
no service. All traffic stays inside the lab's namespaces."""
import time

from test_clusterip import ENGINE

DNS_IP = "10.96.0.10"



def test_pods_verified_follows_pods_without_services(lab):
    """dns.pods: verified answers a-b-c-d.<ns>.pod only for a Pod of that
    namespace with that IP, also when the Pod backs no service and arrives
    live; its namespace becomes known (NODATA) with it."""
    cfg = ENGINE + "dns: {clusterIP: 10.96.0.10, pods: verified}\n"
    pod = ("kind: Pod\nmetadata: {name: lone, namespace: solo, labels: {app: nobody}}\n"
           "spec: {containers: [{name: c}]}\n"
           'status: {podIP: 10.244.1.88, conditions: [{type: Ready, status: "True"}]}\n')
    name = "10-244-1-88.solo.pod.cluster.local"

    def dig(*args):
        return " ".join(lab.run(lab.client_ns, ["dig", f"@{DNS_IP}", "+time=2", "+tries=1", *args]).stdout.split())

    def until(pred, seconds=5.0):
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            if pred():
                return True
            time.sleep(0.2)
        return False
    with lab.start_engine(cfg) as eng:
        assert "status: NXDOMAIN" in dig(name)
        r = eng.ctl("apply", "-f", "-", input=pod)
        assert r.returncode == 0, r.stderr
        assert until(lambda: "IN A 10.244.1.88" in dig(name)), dig(name)
        assert "status: NXDOMAIN" in dig("10-244-1-89.solo.pod.cluster.local")      # no such pod
        out = dig("solo.svc.cluster.local")
        assert "status: NOERROR" in out and "ANSWER: 0" in out
        eng.ctl("delete", "-f", "-", input=pod)
        assert until(lambda: "status: NXDOMAIN" in dig(name))
