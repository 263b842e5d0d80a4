"""`engine check` over a corpus of broken and of odd-but-valid configurations.

tests/unit/corpus/broken/*: each file must be refused: exit status 1, a
message that names the file (and the object and field where there is one),
no traceback, within a time bound, in a memory bound. The header of each file
says what to expect:

    # expect: <fragment of the error message>         (required)
    # object: <fragment naming the object>             (optional)
    # generate: <name> ...                             (the test appends a big body)
    # known-bug: <what goes wrong today>               (strict xfail until fixed)

tests/unit/corpus/accepted/*: what Kubernetes accepts must load (exit 0),
with `# warning: <fragment>` / `# note: <fragment>` printed where the header
asks for them.

Big inputs (20 MB, 100,000 nested lists, 10,000 ports) are generated into a
temporary folder rather than kept in the repository.
"""
import concurrent.futures
import os
import resource
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
BROKEN = sorted(os.path.join(CORPUS, "broken", f) for f in os.listdir(os.path.join(CORPUS, "broken")))
ACCEPTED = sorted(os.path.join(CORPUS, "accepted", f) for f in os.listdir(os.path.join(CORPUS, "accepted")))

TIME_BOUND = 20.0           # seconds for one `engine check`, the 20 MB file included
KNOWN_BUG_BOUND = 5.0       # a known bug may hang: give up sooner
MEMORY_BOUND = 2 << 30      # address space of one `engine check` (a YAML bomb must not take the host)


def header(path):
    """The `# key: value` lines at the top of a corpus file."""
    out = {}
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("#"):
                break
            key, sep, value = line[1:].strip().partition(":")
            if sep and key.strip() in ("expect", "object", "generate", "known-bug", "warning", "note", "ok"):
                out.setdefault(key.strip(), []).append(value.strip())
    return out


# -- generated bodies -----------------------------------------------------------------

def _ports(n, last_duplicate):
    lines = [f"  - {{name: p{i}, port: {1 if last_duplicate and i == n - 1 else i + 1}}}" for i in range(n)]
    return "kind: Service\nmetadata: {name: many}\nspec:\n  ports:\n" + "\n".join(lines) + "\n"


def _huge():
    one = "---\nkind: Service\nmetadata: {name: s%07d}\nspec: {ports: [{port: 80}]}\n"
    parts, size, i = [], 0, 0
    while size < 20 * 1024 * 1024:
        s = one % i
        parts.append(s)
        size += len(s)
        i += 1
    return "".join(parts)


GENERATORS = {
    "huge": _huge,
    "deep": lambda: "kind: Service\nmetadata: {name: deep}\nspec: " + "[" * 100000 + "]" * 100000 + "\n",
    "ports10k": lambda: _ports(10000, last_duplicate=True),
    "ports10k-ok": lambda: _ports(10000, last_duplicate=False),
}


def materialise(path, tmpdir):
    """The file to check: the corpus file itself, or a copy with its
    generated body appended."""
    gen = header(path).get("generate")
    if not gen:
        return path
    out = os.path.join(tmpdir, os.path.basename(path))
    shutil.copyfile(path, out)
    with open(out, "a") as f:
        f.write(GENERATORS[gen[0].split()[0]]())
    return out


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BOUND, MEMORY_BOUND))


def engine_check(path, timeout):
    """(returncode or 'timeout', stdout, stderr, seconds)."""
    t0 = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-m", "engine", "check", path], capture_output=True, text=True,
                           errors="replace", timeout=timeout, cwd=ROOT, preexec_fn=_limits)
        return r.returncode, r.stdout, r.stderr, time.monotonic() - t0
    except subprocess.TimeoutExpired as e:
        def s(x):
            return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
        return "timeout", s(e.stdout), s(e.stderr), time.monotonic() - t0


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every corpus file checked once, four at a time."""
    tmpdir = str(tmp_path_factory.mktemp("corpus"))
    jobs = {}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for path in BROKEN + ACCEPTED:
            target = materialise(path, tmpdir)
            bound = KNOWN_BUG_BOUND if header(path).get("known-bug") else TIME_BOUND
            jobs[path] = (target, pool.submit(engine_check, target, bound))
        return {p: (target, fut.result()) for p, (target, fut) in jobs.items()}


def _param(path):
    h = header(path)
    marks = [pytest.mark.xfail(strict=True, reason="known bug: " + h["known-bug"][0])] if h.get("known-bug") else []
    return pytest.param(path, id=os.path.basename(path), marks=marks)


def test_corpus_is_big_enough():
    assert len(BROKEN) >= 25
    for path in BROKEN:
        assert header(path).get("expect"), f"{path}: no '# expect:' line"


@pytest.mark.parametrize("path", [_param(p) for p in BROKEN])
def test_broken_config_is_refused(path, results):
    h = header(path)
    target, (rc, out, err, took) = results[path]
    both = out + err
    assert rc != "timeout", f"engine check did not finish within its bound ({took:.1f} s)"
    assert "Traceback" not in both, both[-3000:]
    assert "MemoryError" not in both
    assert rc == 1, f"exit status {rc}\n{both[-2000:]}"
    assert took < TIME_BOUND
    assert err.startswith("error: "), err[:500]
    assert target in err, f"the message does not name the file {target}: {err[:500]}"
    for frag in h["expect"]:
        assert frag in err, f"expected {frag!r} in: {err[:1000]}"
    for frag in h.get("object", []):
        assert frag in err, f"expected the object {frag!r} in: {err[:1000]}"
    assert len(err) < 4000, "the message is a wall of text"


@pytest.mark.parametrize("path", [_param(p) for p in ACCEPTED])
def test_odd_but_valid_config_is_accepted(path, results):
    h = header(path)
    _, (rc, out, err, took) = results[path]
    assert rc == 0, f"exit status {rc}\n{(out + err)[-2000:]}"
    assert "Traceback" not in out + err
    assert took < TIME_BOUND
    for frag in h.get("warning", []):
        assert any(line.startswith("warning: ") and frag in line for line in err.splitlines()), \
            f"expected a warning with {frag!r}: {err[:1000]}"
    for frag in h.get("note", []):
        assert any(line.startswith("note: ") and frag in line for line in err.splitlines()), \
            f"expected a note with {frag!r}: {err[:1000]}"
    assert "NAMESPACE" in out           # the resolved table is printed


def test_apply_of_a_file_that_is_not_utf8_gives_a_message(tmp_path):
    """`engine apply -f` reads the file itself before talking to the engine."""
    path = os.path.join(CORPUS, "broken", "25-latin1.yaml")
    r = subprocess.run([sys.executable, "-m", "engine", "apply", "-f", path, "--socket", str(tmp_path / "none.sock")],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    assert r.stderr.startswith("error: ")
