#!/usr/bin/env bash
# Installs what engine and its tests need on a fresh Debian machine (as root),
# then builds and installs engine itself (editable: the extension lands in
# engine/ so the tests run against this tree).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in ip:iproute2 curl:curl iperf3:iperf3 dig:dnsutils nft:nftables iptables:iptables haproxy:haproxy wrk:wrk dnsperf:dnsperf; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
