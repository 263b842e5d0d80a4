"""Smoke test of the benchmark scripts (bench/): each runs with --quick (one
run, the smallest sizes) as a subprocess, exits 0 and prints its table.
These check that the benchmarks still work, not how fast anything is.

bench_paths builds its own namespace lab (root; skipped without it, like
every e2e test); the other two run in memory.
"""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench")


def run_bench(name, timeout, tmp_path, *extra):
    out = tmp_path / f"{name}.json"
    r = subprocess.run([sys.executable, os.path.join(BENCH, name), "--quick", "--json", str(out), *extra],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, f"{name} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["runs"] == 1
    return r.stdout, r.stderr, data


def test_bench_fastpath_quick(tmp_path):
    stdout, _, data = run_bench("bench_fastpath.py", 60, tmp_path)
    assert "Fast path in memory: Cython vs Python reference" in stdout
    assert "Conntrack cost per established packet" in stdout
    assert "Memory per flow" in stdout
    assert [d["flows"] for d in data["results"]["lookup"]] == [1000, 10_000]   # --quick stops at 1e4


def test_bench_control_quick(tmp_path):
    stdout, _, data = run_bench("bench_control.py", 240, tmp_path)
    assert "Scale, ms" in stdout
    assert "One change into the fast path, 1,000 services" in stdout
    assert "First-packet cost" in stdout
    assert [d["services"] for d in data["results"]["scale"]] == [10, 1000]   # --quick stops at 1,000
    labels = [r["label"] for r in data["results"]["changes"]["rows"]]
    for source in ("object event", "engine apply -f", "inotify"):
        assert any(source in lab and "endpoint" in lab for lab in labels), (source, labels)
    assert any("service deleted" in lab for lab in labels)


def test_bench_paths_quick(tmp_path):
    stdout, stderr, data = run_bench("bench_paths.py", 200, tmp_path)
    assert "Paths to the same backends" in stdout
    assert "workload" in stdout and "engine/kernel" in stdout and "engine/haproxy" in stdout
    assert "engine/kube-proxy" in stdout
    # every path came up and gave a figure for the headline row
    med = data["medians"]["TCP bulk, 1 stream (Gbit/s)"]
    for path in ("kernel", "kubeproxy", "haproxy", "engine", "direct"):
        assert med[path], (path, med)
    # and its namespaces are gone
    m = re.search(r"lab namespaces: (\S+)-\*", stderr)
    assert m, stderr[-2000:]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not [ns for ns in left if ns.startswith(m.group(1) + "-")], left
