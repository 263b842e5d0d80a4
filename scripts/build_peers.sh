#!/usr/bin/env bash
# Builds the real Kubernetes peers the tests run against (kube-apiserver,
# kube-controller-manager, etcd, CoreDNS) from the Go module proxy, and caches
# each under $ENGINE_PEERS/<name>-<version>/<name>. A cached binary that runs
# is not rebuilt. Prints one "name path" line per peer; exits non-zero with the
# failing command's output if a build fails.
#
#   scripts/build_peers.sh                 # all peers
#   scripts/build_peers.sh etcd coredns    # some of them
#
# Kubernetes and etcd cannot be built with `go install pkg@version`: their
# go.mod replaces sibling modules by local paths (./staging/src/k8s.io/...,
# ./api, ...), which `go install` refuses. So we build them from a small module
# of our own that requires the release and replaces each such module by its
# published version (kubernetes/kubernetes#79384 describes this).
set -euo pipefail

ENGINE_PEERS=${ENGINE_PEERS:-$HOME/.cache/engine-peers}
K8S_VERSION=${K8S_VERSION:-1.36.3}
ETCD_VERSION=${ETCD_VERSION:-3.6.17}
COREDNS_VERSION=${COREDNS_VERSION:-1.14.7}

export GOMODCACHE=${GOMODCACHE_PEERS:-$ENGINE_PEERS/gomod}
export GOCACHE=${GOCACHE_PEERS:-$ENGINE_PEERS/gocache}
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
export GOMAXPROCS=${GOMAXPROCS:-2}
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto}

log() { echo "build_peers: $*" >&2; }

# run CMD...: runs a build step; on failure prints the command and its output.
run() {
    local out
    if ! out=$("$@" 2>&1); then
        log "FAILED: $*"
        echo "$out" | tail -n 60 >&2
        exit 1
    fi
}

# cached NAME VERSION VERSION_ARGS...: true if the cached binary runs.
cached() {
    local bin=$ENGINE_PEERS/$1-$2/$1
    [ -x "$bin" ] && "$bin" "${@:3}" >/dev/null 2>&1
}

# wrapper_module DIR MODULE VERSION STAGING_VERSION: a module in DIR that
# requires MODULE@VERSION and replaces each module that MODULE's go.mod
# replaces by a local path with that module's published STAGING_VERSION.
wrapper_module() {
    local dir=$1 mod=$2 ver=$3 staged=$4 gomod m
    rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
    run go mod init local/peers
    gomod=$(go mod download -json "$mod@$ver" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    for m in $(python3 - "$gomod" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
# required modules ("a v1.2.3" lines, in or out of a require ( ... ) block)
required = set(re.findall(r'^[ \t]*(?:require[ \t]+)?([^\s(/]+\.[^\s(]+)[ \t]+v\S+', text, re.M))
# "a => ./x" lines, inside or outside a replace ( ... ) block; only those
# required (etcd also "replaces" modules it forbids, by a path that isn't there)
for left, right in re.findall(r'^[ \t]*(?:replace[ \t]+)?([^\s(]\S*)(?:[ \t]+\S+)?[ \t]+=>[ \t]+(\S+)', text, re.M):
    if right.startswith(('./', '../')) and left in required:
        print(left)
EOF
    ); do
        run go mod edit -replace="$m=$m@$staged"
    done
    run go mod edit -require="$mod@$ver"
}

build_k8s() {  # build_k8s NAME: a kube-* command of the Kubernetes release
    local name=$1 dir=$ENGINE_PEERS/$1-v$K8S_VERSION
    cached "$name" "v$K8S_VERSION" --version && { echo "$name $dir/$name"; return; }
    log "building $name v$K8S_VERSION (10-20 min on 2 cores)"
    local src=$ENGINE_PEERS/src/k8s-v$K8S_VERSION
    if [ ! -f "$src/go.sum" ] || ! grep -q "k8s.io/kubernetes v$K8S_VERSION" "$src/go.mod"; then
        wrapper_module "$src" k8s.io/kubernetes "v$K8S_VERSION" "v0.${K8S_VERSION#1.}"
        run go get "k8s.io/kubernetes/cmd/$name@v$K8S_VERSION"
    fi
    cd "$src"
    local v=k8s.io/component-base/version
    local minor=${K8S_VERSION#1.}; minor=${minor%%.*}
    run go build -p 2 -trimpath -ldflags "-s -w -X $v.gitVersion=v$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor" \
        -o "$dir/$name.tmp" "k8s.io/kubernetes/cmd/$name"
    mv "$dir/$name.tmp" "$dir/$name"
    cached "$name" "v$K8S_VERSION" --version || { log "FAILED: $dir/$name --version does not run"; exit 1; }
    echo "$name $dir/$name"
}

build_etcd() {
    local dir=$ENGINE_PEERS/etcd-v$ETCD_VERSION
    cached etcd "v$ETCD_VERSION" --version && { echo "etcd $dir/etcd"; return; }
    log "building etcd v$ETCD_VERSION"
    local src=$ENGINE_PEERS/src/etcd-v$ETCD_VERSION
    wrapper_module "$src" go.etcd.io/etcd/server/v3 "v$ETCD_VERSION" "v$ETCD_VERSION"
    run go get "go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
    run go build -p 2 -trimpath -ldflags "-s -w" -o "$dir/etcd.tmp" go.etcd.io/etcd/server/v3
    mv "$dir/etcd.tmp" "$dir/etcd"
    cached etcd "v$ETCD_VERSION" --version || { log "FAILED: $dir/etcd --version does not run"; exit 1; }
    echo "etcd $dir/etcd"
}

build_coredns() {
    local dir=$ENGINE_PEERS/coredns-v$COREDNS_VERSION
    cached coredns "v$COREDNS_VERSION" -version && { echo "coredns $dir/coredns"; return; }
    log "building coredns v$COREDNS_VERSION"
    local src=$ENGINE_PEERS/src/coredns-v$COREDNS_VERSION
    wrapper_module "$src" github.com/coredns/coredns "v$COREDNS_VERSION" "v$COREDNS_VERSION"
    run go get "github.com/coredns/coredns@v$COREDNS_VERSION"
    run go build -p 2 -trimpath -ldflags "-s -w" -o "$dir/coredns.tmp" github.com/coredns/coredns
    mv "$dir/coredns.tmp" "$dir/coredns"
    cached coredns "v$COREDNS_VERSION" -version || { log "FAILED: $dir/coredns -version does not run"; exit 1; }
    echo "coredns $dir/coredns"
}

# --cached: print the paths of peers already built, build nothing; fail if
# one is missing (the test harness uses this, so versions live only here).
CACHED_ONLY=0
if [ "${1:-}" = "--cached" ]; then CACHED_ONLY=1; shift; fi
[ $# -gt 0 ] || set -- etcd kube-apiserver kube-controller-manager coredns

version_of() {
    case $1 in
        etcd) echo "v$ETCD_VERSION" ;;
        kube-apiserver|kube-controller-manager) echo "v$K8S_VERSION" ;;
        coredns) echo "v$COREDNS_VERSION" ;;
        *) log "unknown peer $1 (etcd kube-apiserver kube-controller-manager coredns)"; exit 2 ;;
    esac
}

if [ $CACHED_ONLY = 1 ]; then
    for p in "$@"; do
        v=$(version_of "$p"); flag=--version; [ "$p" = coredns ] && flag=-version
        cached "$p" "$v" $flag || { log "$p $v is not built under $ENGINE_PEERS (run scripts/build_peers.sh $p)"; exit 1; }
        echo "$p $ENGINE_PEERS/$p-$v/$p"
    done
    exit 0
fi

# sudo's PATH may lack the machine's Go
command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || { log "FAILED: go is not on PATH (nor in /usr/local/go/bin)"; exit 1; }
mkdir -p "$ENGINE_PEERS"
for p in "$@"; do
    version_of "$p" >/dev/null
    case $p in
        etcd) (build_etcd) ;;
        kube-apiserver|kube-controller-manager) (build_k8s "$p") ;;
        coredns) (build_coredns) ;;
    esac
done
