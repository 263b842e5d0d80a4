"""The source distribution holds what a build from it needs (the Cython
sources, every module, the seed manifests), and `engine --version` says the
version of pyproject.toml. .ci/run also builds the wheel from the sdist and
installs it into a scratch venv."""
import os
import re
import shutil
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def project_version():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        return re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M).group(1)


def test_engine_version_is_the_projects():
    r = subprocess.run([sys.executable, "-m", "engine", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "engine " + project_version()


def files_under(top, ends):
    out = set()
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        out |= {os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames if f.endswith(ends)}
    return out


def test_sdist_has_the_sources(tmp_path):
    # build from a copy: the build writes egg-info and cythonized C next to the sources
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", ".pytest_cache", ".hypothesis"))
    # the PEP 517 hook `python -m build --sdist` calls, with this environment's setuptools
    r = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                        "build_meta.build_sdist(sys.argv[1])", str(tmp_path / "dist")],
                       cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (sdist,) = (tmp_path / "dist").glob("engine-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    want = (files_under("cext", (".pyx", ".pxi", ".pxd", ".h")) | files_under("engine", (".py", ".yaml"))
            | {"setup.py", "pyproject.toml", "README.md"})
    assert any(n.endswith(".pyx") for n in want)
    assert any(n.startswith("engine/seed/") for n in want)
    assert not want - names, f"missing from {sdist.name}: {sorted(want - names)}"
    assert not [n for n in names if n.endswith((".so", ".pyc"))]
