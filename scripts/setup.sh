#!/usr/bin/env bash
# Sets up a Debian machine, as root, for engine, its tests, benchmarks and demo:
#   1. the programs listed in scripts/programs.txt (their Debian packages),
#      and what building engine needs (python3-venv, python3-dev);
#   2. /opt/engine/venv: a virtual environment of Debian's python3 with this
#      checkout's engine installed in it (editable: the extension is built
#      into engine/ here, and edits take effect without reinstalling);
#   3. /usr/local/bin/engine, a link to that venv's engine.
# Why a venv of its own: Debian's python3 refuses pip installs (PEP 668), and
# under sudo `python3` is Debian's whatever else is first on a user's PATH.
# A second run finds everything in place and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=/opt/engine/venv
LINK=/usr/local/bin/engine
# the programs of the Debian packages live here; sudo's PATH has them too
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run it as root: sudo bash scripts/setup.sh" >&2
    exit 1
fi

programs() {   # "program package" lines of scripts/programs.txt (not the "program - where" ones)
    local prog pkg
    while read -r prog pkg _; do
        case $prog in '' | '#'*) continue ;; esac
        [ "$pkg" = - ] || echo "$prog $pkg"
    done <scripts/programs.txt
}

installed() {   # is the Debian package $1 installed?
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# 1. Debian packages: only those missing, so a second run does not touch apt.
need=()
while read -r prog pkg; do
    command -v "$prog" >/dev/null || need+=("$pkg")
done < <(programs)
for pkg in python3 python3-venv python3-dev build-essential; do   # to make the venv, build the extension
    installed "$pkg" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    echo "setup: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # nginx and haproxy would start their daemons on install; the tests and
    # benchmarks run their own copies inside network namespaces, so keep the
    # host's from starting (policy-rc.d exit 101: Debian's "don't start").
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi

# 2. The venv, from Debian's python3 (not whatever python3 is first on PATH:
# a pyenv or conda one may go away, and python3-dev has only Debian's headers).
PY=/usr/bin/python3
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))'; then
    echo "setup.sh: engine needs Python >= 3.9; $PY is $("$PY" -V 2>&1)" >&2
    exit 1
fi
if ! "$VENV/bin/python" -c '' 2>/dev/null; then   # missing, or its python is gone
    echo "setup: creating $VENV"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi
# (Re)install when this checkout, its build files or its dependencies changed,
# or when the built extension is gone (a git clean): a stamp records what was
# installed.
sources=$(find pyproject.toml setup.py cext -type f \( -name '*.toml' -o -name '*.py' -o -name '*.pyx' \
    -o -name '*.pxi' -o -name '*.pxd' -o -name '*.h' \) | sort)
stamp="$ROOT $(xargs sha256sum <<<"$sources" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$VENV/.engine-stamp" 2>/dev/null)" != "$stamp" ] ||
    ! (cd / && "$VENV/bin/python" -c 'import engine._fastpath' 2>/dev/null); then
    echo "setup: installing engine from $ROOT into $VENV (builds the extension)"
    rm -f "$VENV/.engine-stamp"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test]"
    echo "$stamp" >"$VENV/.engine-stamp"
fi

# 3. engine on root's PATH (sudo's secure_path has /usr/local/bin).
if [ "$(readlink "$LINK" || true)" != "$VENV/bin/engine" ]; then
    echo "setup: linking $LINK -> $VENV/bin/engine"
    ln -sfn "$VENV/bin/engine" "$LINK"
fi

# 4. The real Kubernetes peers the tests run against (etcd, kube-apiserver,
# kube-controller-manager, CoreDNS), built from the Go module proxy: 30-40
# minutes on 2 cores the first time, then cached under ~/.cache/engine-peers.
bash scripts/build_peers.sh

# Check that it all is there.
missing=()
while read -r prog pkg; do
    command -v "$prog" >/dev/null || missing+=("$prog ($pkg)")
done < <(programs)
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup.sh: still missing after install: ${missing[*]}" >&2
    exit 1
fi
# The programs no Debian package provides: not installed here, only reported.
while read -r prog pkg where; do
    if [ "$pkg" = - ] && ! compgen -G "${where/#\~/$HOME}" >/dev/null; then
        echo "setup: note: $prog is not at $where (see scripts/programs.txt)"
    fi
done < <(grep -v '^#' scripts/programs.txt)
(cd / && "$VENV/bin/python" -c 'import engine._fastpath, pytest')
echo "setup: ready: $("$LINK" --version) from $ROOT; tests: $VENV/bin/python -m pytest -q tests"
