"""Broken configuration on a running engine: corpus files (tests/unit/corpus)
written over its watched manifest, and over its main configuration file, one
after another. Each is refused ("reload refused" in the log, with the
message), the running table stays as it was (`engine get svc` unchanged) and
traffic keeps flowing; `engine apply -f` of a broken file is refused with the
message. The good file back in place reloads again."""
import os
import re
import sys
import time

import pytest

from test_clusterip import ENGINE, seed

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "unit"))
from test_corpus import CORPUS, header, materialise  # noqa: E402

VIP = "10.96.100.100"

# written over the watched manifest file
MANIFEST_CASES = ["02-unclosed-flow-mapping.yaml", "07-port-out-of-range.yaml", "12-duplicate-cluster-ip.yaml",
                  "17-conflicting-node-ports.yaml", "25-latin1.yaml", "28-document-is-a-list.yaml",
                  "44-endpoints-bad-ip.yaml", "52-duplicate-service.yaml", "22-deeply-nested.yaml",
                  "21-huge-file.yaml"]
# written over the main configuration file
MAIN_CASES = ["29-unknown-engine-field.yaml", "33-masquerade-in-service-cidr.yaml", "01-bad-indentation.yaml"]
# sent with engine apply -f
APPLY_CASES = ["07-port-out-of-range.yaml", "12-duplicate-cluster-ip.yaml", "20-bad-source-range.yaml",
               "35-name-not-dns-1035.yaml", "46-python-tag.yaml"]


def corpus(name):
    return os.path.join(CORPUS, "broken", name)


@pytest.fixture(scope="module")
def live(lab, tmp_path_factory):
    d = tmp_path_factory.mktemp("badreload")
    (d / "manifests").mkdir()
    good = seed("service-exam.yaml") + lab.pod_manifests()
    (d / "manifests" / "svc.yaml").write_text(good)
    main = ENGINE + "manifests: [%s]\n" % (d / "manifests")
    eng = lab.start_engine(main)
    # (without inotify, the polling watcher takes its baseline at its first
    # poll, 0.25 s after start: a change before that would not be seen)
    time.sleep(1.0)
    yield eng, d, good, main
    eng.stop()


def refusals(eng):
    return re.findall(r"reload refused, running table unchanged: (.*)", eng.log())


def write_and_wait_refused(eng, path, content, timeout=15.0):
    """Write content (bytes) to path and wait for the engine to refuse it;
    returns the refusal message."""
    n = len(refusals(eng))
    replace(path, content)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = refusals(eng)
        if len(r) > n:
            return r[-1]
        assert eng.proc.poll() is None, eng.log()[-3000:]
        time.sleep(0.1)
    raise AssertionError(f"no 'reload refused' within {timeout} s of writing {path}:\n{eng.log()[-2000:]}")


def replace(path, content):
    """Write the file whole, as an editor's atomic save does: the engine sees
    the old file or the new one, never half of the new (a half-written 20 MB
    file would be parsed, slowly, before the size check sees the rest)."""
    path = str(path)
    tmp = os.path.join(os.path.dirname(os.path.dirname(path)), "." + os.path.basename(path) + ".new")
    with open(tmp, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    os.replace(tmp, path)


def reloads(eng):
    return eng.log().count("reloaded ")


def wait_reloaded(eng, n, timeout=15.0):
    """Wait for a reload after the n-th (count before the write: inotify
    reloads within milliseconds, maybe before this looks)."""
    deadline = time.monotonic() + timeout
    while eng.log().count("reloaded ") == n:
        assert time.monotonic() < deadline, eng.log()[-2000:]
        time.sleep(0.1)


class Serves:
    """Truthy when the VIP answers from the client; its repr says why not."""

    def __init__(self, lab, eng=None):
        r = lab.run(lab.client_ns, ["curl", "-s", "-S", "-m", "5", f"http://{VIP}/"], timeout=15)
        names = r.stdout.split()
        self.ok = r.returncode == 0 and len(names) == 1 and names[0] in {p.name for p in lab.pods}
        self.why = f"curl rc={r.returncode} out={r.stdout[:200]!r} err={r.stderr[:300]!r}"
        if not self.ok and eng is not None:
            self.why += "\n" + eng.ctl("stats").stdout + eng.ctl("conntrack").stdout[-2000:] + eng.log()[-2000:]

    def __bool__(self):
        return self.ok

    def __repr__(self):
        return self.why


def serves(lab, eng=None):
    return Serves(lab, eng)


def content(name, tmp_path):
    with open(materialise(corpus(name), str(tmp_path)), "rb") as f:
        return f.read()


def test_broken_manifests_are_refused_and_nothing_changes(lab, live, tmp_path):
    eng, d, good, _ = live
    table = eng.ctl("get", "svc").stdout
    ok = serves(lab, eng)
    assert "deploy-svc" in table and ok, ok
    target = d / "manifests" / "svc.yaml"
    for name in MANIFEST_CASES:
        msg = write_and_wait_refused(eng, target, content(name, tmp_path))
        assert str(target) in msg, (name, msg)
        for frag in header(corpus(name))["expect"]:
            assert frag in msg, (name, frag, msg)
        assert eng.ctl("get", "svc").stdout == table, name
        ok = serves(lab, eng)
        assert ok, (name, ok)
    assert "Traceback" not in eng.log()
    n = reloads(eng)
    replace(target, good)
    wait_reloaded(eng, n)
    assert eng.ctl("get", "svc").stdout == table and serves(lab)


def test_broken_main_configuration_is_refused(lab, live, tmp_path):
    eng, _, _, main = live
    table = eng.ctl("get", "svc").stdout
    for name in MAIN_CASES:
        msg = write_and_wait_refused(eng, eng.path, content(name, tmp_path))
        assert eng.path in msg, (name, msg)
        for frag in header(corpus(name))["expect"]:
            assert frag in msg, (name, frag, msg)
        assert eng.ctl("get", "svc").stdout == table, name
        ok = serves(lab, eng)
        assert ok, (name, ok)
    n = reloads(eng)
    replace(eng.path, main)
    wait_reloaded(eng, n)
    assert eng.ctl("get", "svc").stdout == table and serves(lab)


def test_apply_of_broken_files_is_refused(lab, live):
    eng, _, _, _ = live
    table = eng.ctl("get", "svc").stdout
    for name in APPLY_CASES:
        r = eng.ctl("apply", "-f", corpus(name))
        assert r.returncode == 1, (name, r.stdout, r.stderr)
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr, (name, r.stderr)
        assert corpus(name) in r.stderr, (name, r.stderr)
        for frag in header(corpus(name))["expect"]:
            assert frag in r.stderr, (name, frag, r.stderr)
        assert eng.ctl("get", "svc").stdout == table, name
    assert serves(lab)
    assert eng.proc.poll() is None
