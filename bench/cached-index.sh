#!/usr/bin/env bash
# Measures requests per second on a cached small file (the Concelier index.json), with Basic
# Auth (primary domain) and without (community domain), and the gateway's peak resident memory.
#
#   bench/cached-index.sh [SECONDS]      default 10 seconds per scenario
#
# The gateway runs pinned to CPU 0 and wrk to CPU 1 (when the machine has two or more CPUs).
# All traffic stays on 127.0.0.1. Needs a release build (cargo build --release) and wrk.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=${1:-10}
binary=$root/target/release/mirror-gateway
[[ -x $binary ]] || { echo "bench: build first: cargo build --release" >&2; exit 1; }
command -v wrk >/dev/null || { echo "bench: wrk not found; run scripts/setup-debian.sh" >&2; exit 1; }
"$root/conf/sample-mirror/generate.sh" >/dev/null

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 18181)
pin_gateway=() pin_load=()
if [[ $(nproc) -ge 2 ]] && command -v taskset >/dev/null; then
    pin_gateway=(taskset -c 0) pin_load=(taskset -c 1)
fi

MIRROR_GATEWAY__SERVER__LISTEN="[\"127.0.0.1:$port\"]" \
MIRROR_GATEWAY__SERVER__THREADS=1 \
MIRROR_GATEWAY__LOG__ACCESS_LOG=off \
MIRROR_GATEWAY__LOG__LEVEL=warn \
    "${pin_gateway[@]}" "$binary" run -c "$root/conf/gateway.toml" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    curl -fsS -o /dev/null "http://127.0.0.1:$port/concelier/exports/index.json" -H 'Host: localhost' && break
    sleep 0.1
done

url=http://127.0.0.1:$port/concelier/exports/index.json
auth="Authorization: Basic $(printf 'mirror:mirror-pass' | base64)"
curl -fsS -o /dev/null -H "$auth" "$url"

run() {
    local name=$1; shift
    local out
    out=$("${pin_load[@]}" wrk -t1 -c32 -d"${seconds}s" --latency "$@" "$url")
    local rps p99
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    printf '| %-28s | %12s | %8s |\n' "$name" "$rps" "$p99"
}

echo "machine: $(nproc) CPUs, $(awk '/model name/ {$1=$2=$3=""; print; exit}' /proc/cpuinfo | sed 's/^ *//')"
echo "binary: $("$binary" version), $seconds s per scenario, wrk -t1 -c32"
echo
echo "| scenario                     | requests/s   | p99      |"
echo "|------------------------------|--------------|----------|"
run "cached index, Basic Auth" -H "$auth"
run "cached index, no auth" -H "Host: localhost"
echo
echo "peak resident memory (VmHWM): $(awk '/VmHWM/ {print $2, $3}' "/proc/$pid/status")"
