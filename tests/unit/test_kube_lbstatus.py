"""LoadBalancer IPAM from Service status: what is in status stays."""

from engine.kube.lbstatus import allocate, desired_ingress


def lb(name, created="2026-01-01T00:00:00Z", ingress=(), ns="default", **spec):
    s = {"metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
         "spec": dict({"type": "LoadBalancer"}, **spec)}
    if ingress:
        s["status"] = {"loadBalancer": {"ingress": [{"ip": i} for i in ingress]}}
    return s


POOL = ["172.18.255.0/29"]     # hosts .1 - .6


def test_new_services_get_the_lowest_free_addresses_in_creation_order():
    got = allocate([lb("b", "2026-01-02T00:00:00Z"), lb("a", "2026-01-03T00:00:00Z"),
                    {"metadata": {"name": "c", "namespace": "default"}, "spec": {"type": "ClusterIP"}}], POOL)
    assert got == {"default/b": ["172.18.255.1"], "default/a": ["172.18.255.2"]}


def test_status_is_kept_across_restarts_and_leader_changes():
    # a new leader knows nothing but what is in status: it must keep it
    svcs = [lb("a", ingress=["172.18.255.5"]), lb("b", ingress=["172.18.255.1"]), lb("new")]
    assert allocate(svcs, POOL) == {"default/a": ["172.18.255.5"], "default/b": ["172.18.255.1"],
                                    "default/new": ["172.18.255.2"]}


def test_load_balancer_ip_wins_and_clashes_go_to_the_older_service():
    svcs = [lb("old", "2026-01-01T00:00:00Z", ingress=["172.18.255.3"]),
            lb("young", "2026-02-01T00:00:00Z", ingress=["172.18.255.3"]),
            lb("pinned", "2026-03-01T00:00:00Z", loadBalancerIP="172.18.255.1")]
    got = allocate(svcs, POOL)
    assert got["default/old"] == ["172.18.255.3"]
    assert got["default/pinned"] == ["172.18.255.1"]
    assert got["default/young"] == ["172.18.255.2"]


def test_ip_outside_the_pool_in_status_is_not_ours_to_keep():
    got = allocate([lb("a", ingress=["203.0.113.7"])], POOL)
    assert got == {"default/a": ["172.18.255.1"]}
    # but it stays in status after ours (another controller wrote it)
    assert desired_ingress(lb("a", ingress=["203.0.113.7"]), got["default/a"], POOL) == [
        {"ip": "172.18.255.1", "ipMode": "VIP"}, {"ip": "203.0.113.7"}]


def test_other_classes_are_left_alone_and_exhaustion_leaves_pending():
    svcs = [lb(f"s{i}", f"2026-01-0{i}T00:00:00Z") for i in range(1, 9)]
    svcs.append(lb("other", loadBalancerClass="example.com/lb"))
    got = allocate(svcs, POOL)
    assert "default/other" not in got
    assert [got[f"default/s{i}"] for i in range(1, 7)] == [[f"172.18.255.{i}"] for i in range(1, 7)]
    assert got["default/s7"] == [] and got["default/s8"] == []


def test_dual_stack_pools_follow_ip_families():
    pools = ["172.18.255.0/29", "fd00:18::/125"]
    got = allocate([lb("v4", "2026-01-01T00:00:00Z"), lb("both", "2026-01-02T00:00:00Z", ipFamilies=["IPv6", "IPv4"]),
                    lb("v6", "2026-01-03T00:00:00Z", ipFamilies=["IPv6"])], pools)
    assert got == {"default/v4": ["172.18.255.1"], "default/both": ["172.18.255.2", "fd00:18::1"],
                   "default/v6": ["fd00:18::2"]}
