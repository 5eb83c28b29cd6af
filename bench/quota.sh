#!/usr/bin/env bash
# Measures what the `quota` plugin costs on a cached index: requests per second with no budget
# plugin, with `quota` counting locally, and with `quota` counting in Redis, each also with
# `rate_limit` when the gateway has that plugin. Prints a markdown table with the ratio of each
# scenario to the one without budget plugins.
#
#   bench/quota.sh [SECONDS] [ROUNDS]   default 5 seconds per wrk run, 3 runs per scenario;
#                                       about 90 seconds in all
#   bench/quota.sh instructions [REQUESTS]
#                                       runs the gateway under callgrind instead and counts
#                                       the instructions it executes per request over REQUESTS
#                                       requests (default 5000, `ab -k -c 8`); slower, but the
#                                       same on a busy machine as on an idle one. The ratio is
#                                       then the instructions without budget plugins divided
#                                       by the scenario's: the throughput ratio on a CPU-bound
#                                       gateway, leaving out the kernel's share.
#
# The scenarios take turns: every gateway starts first, then each round runs wrk once on each,
# so that a slow spell of the machine falls on all of them alike. Each scenario reports its
# best run (highest requests/s, with that run's p99), which filters out more of the noise, and
# the ratio of its best run to the best run without budget plugins. The `median` column is
# the median over the rounds of the ratio within each round: the scenario's run against the
# run without plugins just before it, which a slow spell of the machine affects least. The
# CPU columns take the CPU time the gateway process ran during a wrk run (the schedstat of
# all its threads: user and kernel time) per request wrk completed. They show the median over
# the rounds, and the median of the per-round ratios of the baseline's CPU time per request
# to the scenario's. On a CPU-bound gateway that ratio is the throughput ratio, less moved by a
# machine whose speed changes between runs. Below the table come the baseline's requests/s
# and each scenario's ratios, round by round.
# On a shared machine, compare ratios, not absolutes.
# Needs a release build (cargo build --release), wrk, curl, python3 and redis-server
# (scripts/setup-debian.sh installs them; the instructions mode also needs valgrind and ab).
# Everything runs on 127.0.0.1 with free ports, in a temp dir removed on exit. With two or
# more CPUs the gateway (1 worker thread) runs on CPU 0, and wrk and redis-server on CPU 1.
# Every request comes from 127.0.0.1 without credentials, so all of them count against one
# principal: the most contended case. Budgets are set high enough that nothing is rejected.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mode=wrk
if [[ ${1:-} == instructions ]]; then
    mode=instructions
    requests=${2:-5000}
    set -- 5 1
    [[ $requests =~ ^[0-9]+$ && $requests -ge 100 && $requests -le 100000 ]] || {
        echo "quota bench: REQUESTS must be a whole number from 100 to 100000, got '$requests'" >&2
        exit 2
    }
fi
seconds=${1:-5}
rounds=${2:-3}
binary=$root/target/release/mirror-gateway

[[ $seconds =~ ^[0-9]+$ && $seconds -ge 1 && $seconds -le 60 ]] || {
    echo "quota bench: SECONDS must be a whole number from 1 to 60, got '$seconds'" >&2
    exit 2
}
[[ $rounds =~ ^[0-9]+$ && $rounds -ge 1 && $rounds -le 10 ]] || {
    echo "quota bench: ROUNDS must be a whole number from 1 to 10, got '$rounds'" >&2
    exit 2
}
[[ -x $binary ]] || { echo "quota bench: $binary missing; run cargo build --release" >&2; exit 1; }
tools=(wrk curl python3 redis-server redis-cli)
[[ $mode == wrk ]] || tools+=(valgrind callgrind_control callgrind_annotate ab)
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null || {
        echo "quota bench: $tool not found; run scripts/setup-debian.sh" >&2
        exit 1
    }
done
"$root/conf/sample-mirror/generate.sh" >/dev/null

tmp=$(mktemp -d "${TMPDIR:-/tmp}/quota-bench.XXXXXX")
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT

pin_server=() pin_load=()
if [[ $(nproc) -ge 2 ]] && command -v taskset >/dev/null; then
    pin_server=(taskset -c 0) pin_load=(taskset -c 1)
fi

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits up to 10 s (60 s under callgrind) until URL returns 200.
wait_ready() {
    local url=$1 log=$2 tries=100
    [[ $mode == wrk ]] || tries=600
    for _ in $(seq 1 "$tries"); do
        curl -fs -o /dev/null --max-time 1 "$url" && return 0
        sleep 0.1
    done
    echo "quota bench: no 200 response from $url within $((tries / 10)) s; log:" >&2
    tail -20 "$log" >&2 || true
    exit 1
}

redis_port=$(free_port)
"${pin_load[@]}" redis-server --port "$redis_port" --bind 127.0.0.1 --save '' \
    --appendonly no --daemonize no --dir "$tmp" >"$tmp/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
    [[ $(redis-cli -p "$redis_port" ping 2>/dev/null) == PONG ]] && break
    sleep 0.1
done

# Plugin tables for each ingredient of a scenario.
quota_plugin='[[domains.bench.plugins]]
name = "quota"
index_per_hour = 1000000000
download_per_hour = 1000000000'
redis_table="[domains.bench.plugins.redis]
url = \"redis://127.0.0.1:$redis_port/0\"
key_prefix = \"bench-$$\""
rate_limit_plugin='[[domains.bench.plugins]]
name = "rate_limit"
requests_per_second = 1000000
burst = 1000000'

# Writes the config of one scenario to $tmp/NAME.toml; PLUGINS are extra plugin tables.
write_config() {
    local name=$1 plugins=$2 port=$3
    cat >"$tmp/$name.toml" <<TOML
[server]
listen = ["127.0.0.1:$port"]
threads = 1
grace_period_secs = 0
shutdown_timeout_secs = 1

[log]
access_log = "off"
level = "warn"

[cache]
memory_bytes = "64MiB"

[domains.bench]
hosts = ["127.0.0.1"]

[domains.bench.origins.concelier]
kind = "export_tree"
root = "$root/conf/sample-mirror/data/concelier"

[[domains.bench.routes]]
prefix = "/concelier/exports/index.json"
origin = "concelier"
origin_path = "/mirror/index.json"

[[domains.bench.plugins]]
name = "ttl"

[[domains.bench.plugins.rules]]
pattern = "/concelier/exports/index.json"
ttl_secs = 3600
cache_control = "public, max-age=60"

$plugins
TOML
}

has_rate_limit=no
write_config probe "$rate_limit_plugin" 1
"$binary" check -c "$tmp/probe.toml" >/dev/null 2>&1 && has_rate_limit=yes

baseline=""
# Runs the gateway of scenario NAME under callgrind, counts its instructions over $requests
# requests after a warm-up, and prints a table row.
count_instructions() {
    local name=$1 label=$2 url=$3 gateway total per_request ratio failed
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$tmp/$name.cg" \
        "$binary" run -c "$tmp/$name.toml" >"$tmp/$name.log" 2>&1 &
    gateway=$!
    pids+=("$gateway")
    wait_ready "$url" "$tmp/$name.log"
    ab -q -k -n 500 -c 8 "$url" >/dev/null 2>&1
    callgrind_control -i on "$gateway" >/dev/null 2>&1
    failed=$(ab -k -n "$requests" -c 8 "$url" 2>/dev/null | awk '/^Failed requests/ {print $3}')
    callgrind_control -i off "$gateway" >/dev/null 2>&1
    kill "$gateway" 2>/dev/null || true
    wait "$gateway" 2>/dev/null || true
    [[ $failed == 0 ]] || echo "quota bench: $label had ${failed:-unknown} failed requests" >&2
    total=$(callgrind_annotate "$tmp/$name.cg" 2>/dev/null | awk '/PROGRAM TOTALS/ && !seen {gsub(",", "", $1); print $1; seen = 1}')
    per_request=$((total / requests))
    [[ -n $baseline ]] || baseline=$per_request
    ratio=$(awk -v a="$baseline" -v b="$per_request" 'BEGIN { printf "%.3f", a / b }')
    printf '| %-34s | %12s | %8s | %6s |\n' "$label" "$per_request" "-" "$ratio"
}

# Scenarios started for wrk, in table order: name, label, URL and gateway PID; the best run of
# each.
names=() labels=() urls=() gateway_pids=() best_rps=() best_p99=()

# Prints the CPU time, in nanoseconds, that every thread of process PID has run so far
# (the first field of each thread's schedstat).
cpu_ns() {
    cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ t += $1 } END { printf "%.0f", t }'
}

# Sets up one scenario. Under callgrind it runs at once and prints its table row. For wrk it
# starts the gateway and warms its cache; `measure` runs them all later.
scenario() {
    local name=$1 label=$2 plugins=$3 port gateway
    port=$(free_port)
    write_config "$name" "$plugins" "$port"
    local url="http://127.0.0.1:$port/concelier/exports/index.json"
    if [[ $mode == instructions ]]; then
        count_instructions "$name" "$label" "$url"
        return
    fi
    "${pin_server[@]}" "$binary" run -c "$tmp/$name.toml" >"$tmp/$name.log" 2>&1 &
    gateway=$!
    pids+=("$gateway")
    wait_ready "$url" "$tmp/$name.log"
    curl -fs -o /dev/null "$url"
    names+=("$name") labels+=("$label") urls+=("$url") gateway_pids+=("$gateway")
    best_rps+=(0) best_p99+=(-)
}

# Runs wrk on every scenario in turn, $rounds times over, so that a slow spell of a shared
# machine falls on all scenarios alike. Then prints one table row per scenario with its best
# run and the median of its per-round ratios. Only the gateway under load does work, while the
# others wait idle.
measure() {
    local round i out run_rps run_p99 ratio median cpu_before cpu_after served cpu_median cpu_ratio
    local -A round_rps=() round_cpu=()
    for round in $(seq 1 "$rounds"); do
        for i in "${!names[@]}"; do
            cpu_before=$(cpu_ns "${gateway_pids[i]}")
            out=$("${pin_load[@]}" wrk -t1 -c32 -d"${seconds}s" --latency "${urls[i]}")
            cpu_after=$(cpu_ns "${gateway_pids[i]}")
            served=$(awk '/requests in/ {print $1}' <<<"$out")
            round_cpu[$i,$round]=$(awk -v a="$cpu_before" -v b="$cpu_after" -v n="$served" \
                'BEGIN { printf "%.0f", (n > 0) ? (b - a) / n : 0 }')
            if grep -q 'Non-2xx' <<<"$out"; then
                echo "quota bench: ${labels[i]} got non-2xx responses in round $round:" >&2
                grep 'Non-2xx' <<<"$out" >&2
            fi
            run_rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
            run_p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
            round_rps[$i,$round]=$run_rps
            if awk -v a="$run_rps" -v b="${best_rps[i]}" 'BEGIN { exit !(a > b) }'; then
                best_rps[i]=$run_rps best_p99[i]=$run_p99
            fi
        done
    done
    for i in "${!names[@]}"; do
        ratio=$(awk -v a="${best_rps[i]}" -v b="${best_rps[0]}" 'BEGIN { printf "%.3f", a / b }')
        median=$(for round in $(seq 1 "$rounds"); do
            awk -v a="${round_rps[$i,$round]}" -v b="${round_rps[0,$round]}" 'BEGIN { printf "%.4f\n", a / b }'
        done | sort -n | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.3f", m }')
        cpu_median=$(for round in $(seq 1 "$rounds"); do echo "${round_cpu[$i,$round]}"; done |
            sort -n | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.0f", m }')
        cpu_ratio=$(for round in $(seq 1 "$rounds"); do
            awk -v a="${round_cpu[0,$round]}" -v b="${round_cpu[$i,$round]}" 'BEGIN { printf "%.4f\n", (b > 0) ? a / b : 0 }'
        done | sort -n | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.3f", m }')
        printf '| %-34s | %12s | %8s | %6s | %6s | %10s | %9s |\n' "${labels[i]}" "${best_rps[i]}" \
            "${best_p99[i]}" "$ratio" "$median" "$cpu_median" "$cpu_ratio"
    done
    # Round by round, to show how much the machine moved during the run.
    echo
    printf -- '- %s, requests/s by round:' "${labels[0]}"
    for round in $(seq 1 "$rounds"); do printf ' %.0f' "${round_rps[0,$round]}"; done
    echo
    for i in "${!names[@]}"; do
        [[ $i == 0 ]] && continue
        printf -- '- %s, ratio by round:' "${labels[i]}"
        for round in $(seq 1 "$rounds"); do
            awk -v a="${round_rps[$i,$round]}" -v b="${round_rps[0,$round]}" 'BEGIN { printf " %.3f", a / b }'
        done
        printf '; CPU ratio by round:'
        for round in $(seq 1 "$rounds"); do
            awk -v a="${round_cpu[0,$round]}" -v b="${round_cpu[$i,$round]}" 'BEGIN { printf " %.3f", (b > 0) ? a / b : 0 }'
        done
        echo
    done
}

echo "machine: $(nproc) CPUs, $(awk '/model name/ {$1=$2=$3=""; print; exit}' /proc/cpuinfo | sed 's/^ *//')"
if [[ $mode == wrk ]]; then
    echo "binary: $("$binary" version 2>/dev/null || echo unknown); best of $rounds wrk runs of $seconds s (-t1 -c32), the scenarios taking turns; gateway threads = 1"
else
    echo "binary: $("$binary" version 2>/dev/null || echo unknown); callgrind over $requests requests (ab -k -c 8) after 500 warm-up requests; gateway threads = 1"
fi
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "redis: $(redis-server --version | awk '{print $3}')"
echo
if [[ $mode == wrk ]]; then
    echo "| scenario                           | requests/s   | p99      | ratio  | median | CPU ns/req | CPU ratio |"
    echo "|------------------------------------|--------------|----------|--------|--------|------------|-----------|"
else
    echo "| scenario                           | instr./req.  | p99      | ratio  |"
    echo "|------------------------------------|--------------|----------|--------|"
fi
scenario none "no budget plugins" ""
scenario quota_local "quota, local" "$quota_plugin"
if [[ $has_rate_limit == yes ]]; then
    scenario both_local "quota + rate_limit, local" "$rate_limit_plugin
$quota_plugin"
fi
scenario quota_redis "quota, Redis" "$quota_plugin
$redis_table"
if [[ $has_rate_limit == yes ]]; then
    scenario both_redis "quota + rate_limit, Redis" "$rate_limit_plugin
$quota_plugin
$redis_table"
fi
[[ $mode == instructions ]] || measure
