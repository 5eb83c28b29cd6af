#!/usr/bin/env bash
# Measures what the `quota` plugin costs on a cached index: requests per second with no budget
# plugin, with `quota` counting locally, and with `quota` counting in Redis, each also with
# `rate_limit` when the gateway has that plugin. Prints a markdown table with the ratio of each
# scenario to the one without budget plugins.
#
#   bench/quota.sh [SECONDS] [ROUNDS]   default 5 seconds per wrk run, 3 rounds;
#                                       about 2.5 minutes in all
#   bench/quota.sh instructions [REQUESTS]
#                                       runs the gateway under callgrind instead and counts
#                                       the instructions it executes per request over REQUESTS
#                                       requests (default 5000, `ab -k -c 8`); slower, but the
#                                       same on a busy machine as on an idle one. The ratio is
#                                       then the instructions without budget plugins divided
#                                       by the scenario's: the throughput ratio on a CPU-bound
#                                       gateway, leaving out the kernel's share.
#   bench/quota.sh paired [SECONDS] [ROUNDS]
#                                       runs each budget scenario at the same time as the
#                                       baseline instead of after it (see below); default
#                                       5 seconds, 5 rounds, about 3 minutes in all
#
# The scenarios take turns. Every gateway starts first. Then each round runs wrk once on each
# scenario with a budget plugin, each run between two runs of the baseline (no budget
# plugins), in the order baseline, quota, baseline, quota + rate_limit, baseline, and so on.
# The baseline runs once more at the end. The `median` column is the median over the rounds of the
# scenario's requests/s divided by the mean of the two baseline runs around it. A machine
# whose speed drifts at a steady rate moves both sides of that ratio alike, which the ratio to
# a single baseline run some scenarios earlier does not. Each scenario also reports its best
# run (highest requests/s, with that run's p99) and the ratio of its best run to the
# baseline's best. The baseline runs more often than each other scenario, so its best tends
# higher and that ratio errs against the plugins. The CPU columns take the CPU time the
# gateway process ran during a wrk run (the schedstat of all its threads: user and kernel
# time) per request wrk completed: the scenario's median, and the median ratio of the
# baseline's CPU time per request (the mean of the two runs around) to the scenario's. On a
# CPU-bound gateway that ratio is the throughput ratio. Below the table come the baseline's
# requests/s run by run and each scenario's ratios, round by round.
# In paired mode, both gateways share CPU 0, and two wrk processes on CPU 1 load them at once,
# one wrk each. The scheduler switches between the two gateways every few milliseconds, so a
# slow spell of the machine falls on both alike. The ratio of their requests/s is the
# throughput ratio while both keep CPU 0 busy. The ratio of their CPU time per request is valid
# even when they do not. `CPU 0 busy` under the table is the median over the runs of the share
# of wall time that the two gateways ran: near 100% means that the gateways, not wrk, set the
# pace. The first row pairs the baseline with a second gateway without budget plugins (A/A
# check), so its distance from 1.000 shows the error of the method on this machine.
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
elif [[ ${1:-} == paired ]]; then
    mode=paired
    set -- "${2:-5}" "${3:-5}"
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
[[ $mode != instructions ]] || tools+=(valgrind callgrind_control callgrind_annotate ab)
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
    [[ $mode != instructions ]] || tries=600
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

# Runs wrk once on scenario I and records requests/s and CPU time per request as run number K.
# Keeps the scenario's best run and its p99.
run_once() {
    local i=$1 k=$2 out cpu_before cpu_after served
    cpu_before=$(cpu_ns "${gateway_pids[i]}")
    out=$("${pin_load[@]}" wrk -t1 -c32 -d"${seconds}s" --latency "${urls[i]}")
    cpu_after=$(cpu_ns "${gateway_pids[i]}")
    served=$(awk '/requests in/ {print $1}' <<<"$out")
    run_cpu[$k]=$(awk -v a="$cpu_before" -v b="$cpu_after" -v n="$served" \
        'BEGIN { printf "%.0f", (n > 0) ? (b - a) / n : 0 }')
    if grep -q 'Non-2xx' <<<"$out"; then
        echo "quota bench: ${labels[i]} got non-2xx responses in run $k:" >&2
        grep 'Non-2xx' <<<"$out" >&2
    fi
    run_rps[$k]=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    if awk -v a="${run_rps[$k]}" -v b="${best_rps[i]}" 'BEGIN { exit !(a > b) }'; then
        best_rps[i]=${run_rps[$k]} best_p99[i]=$(awk '$1 == "99%" {print $2}' <<<"$out")
    fi
}

# Prints the median of the numbers on standard input, one per line, with FORMAT.
median_of() {
    sort -n | awk -v f="$1" '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf f, m }'
}

# Prints the ratios of scenario I's runs to the mean of the two baseline runs around each, one
# per line: of requests/s (rps), or of the baseline's CPU time per request to the scenario's
# (cpu). Reads the run order and numbers that `measure` keeps.
#   around I rps|cpu
around() {
    local i=$1 what=$2 k
    for k in "${!order[@]}"; do
        [[ ${order[k]} == "$i" ]] || continue
        if [[ $what == rps ]]; then
            awk -v a="${run_rps[k]}" -v b="${run_rps[k - 1]}" -v c="${run_rps[k + 1]}" \
                'BEGIN { printf "%.4f\n", 2 * a / (b + c) }'
        else
            awk -v a="${run_cpu[k]}" -v b="${run_cpu[k - 1]}" -v c="${run_cpu[k + 1]}" \
                'BEGIN { printf "%.4f\n", (a > 0) ? (b + c) / (2 * a) : 0 }'
        fi
    done
}

# Runs wrk $rounds times on every scenario with a budget plugin, each run between two runs
# without plugins. In each round the baseline runs before every other scenario, and it runs
# once more after the last round. Only the gateway under load does work; the others wait idle.
# Then prints one table row per scenario with its best run, and the median over the rounds of
# its ratios to the mean of the two baseline runs around it.
measure() {
    local i k round ratio median cpu_median cpu_ratio
    local -a order=() run_rps=() run_cpu=()
    for round in $(seq 1 "$rounds"); do
        for ((i = 1; i < ${#names[@]}; i++)); do order+=(0 "$i"); done
    done
    order+=(0)
    for k in "${!order[@]}"; do run_once "${order[k]}" "$k"; done

    for i in "${!names[@]}"; do
        ratio=$(awk -v a="${best_rps[i]}" -v b="${best_rps[0]}" 'BEGIN { printf "%.3f", a / b }')
        if [[ $i == 0 ]]; then
            median=1.000 cpu_ratio=1.000
        else
            median=$(around "$i" rps | median_of '%.3f')
            cpu_ratio=$(around "$i" cpu | median_of '%.3f')
        fi
        cpu_median=$(for k in "${!order[@]}"; do
            if [[ ${order[k]} == "$i" ]]; then echo "${run_cpu[k]}"; fi
        done | median_of '%.0f')
        printf '| %-34s | %12s | %8s | %6s | %6s | %10s | %9s |\n' "${labels[i]}" "${best_rps[i]}" \
            "${best_p99[i]}" "$ratio" "$median" "$cpu_median" "$cpu_ratio"
    done
    # Run by run, to show how much the machine moved during the run.
    echo
    printf -- '- %s, requests/s run by run:' "${labels[0]}"
    for k in "${!order[@]}"; do
        if [[ ${order[k]} == 0 ]]; then printf ' %.0f' "${run_rps[k]}"; fi
    done
    echo
    for ((i = 1; i < ${#names[@]}; i++)); do
        printf -- '- %s, ratio by round:%s; CPU ratio by round:%s\n' "${labels[i]}" \
            "$(around "$i" rps | awk '{ printf " %.3f", $1 }')" \
            "$(around "$i" cpu | awk '{ printf " %.3f", $1 }')"
    done
}

# Loads the baseline and scenario I at once, one wrk each, for $seconds s. Appends to
# pair_rps and pair_cpu the scenario's ratios to the baseline in this run, and to pair_busy the
# share of the run's wall time that the two gateways ran.
run_pair() {
    local i=$1 b0 s0 b1 s1 start end served_b served_s rps_b rps_s wrk_b wrk_s
    b0=$(cpu_ns "${gateway_pids[0]}") s0=$(cpu_ns "${gateway_pids[i]}") start=$(date +%s%N)
    "${pin_load[@]}" wrk -t1 -c32 -d"${seconds}s" --latency "${urls[0]}" >"$tmp/pair-0.out" &
    wrk_b=$!
    "${pin_load[@]}" wrk -t1 -c32 -d"${seconds}s" --latency "${urls[i]}" >"$tmp/pair-$i.out" &
    wrk_s=$!
    wait "$wrk_b" "$wrk_s"
    end=$(date +%s%N) b1=$(cpu_ns "${gateway_pids[0]}") s1=$(cpu_ns "${gateway_pids[i]}")
    if grep -q 'Non-2xx' "$tmp/pair-0.out" "$tmp/pair-$i.out"; then
        echo "quota bench: non-2xx responses while pairing ${labels[i]} with the baseline" >&2
    fi
    served_b=$(awk '/requests in/ {print $1}' "$tmp/pair-0.out")
    served_s=$(awk '/requests in/ {print $1}' "$tmp/pair-$i.out")
    rps_b=$(awk '/^Requests\/sec/ {print $2}' "$tmp/pair-0.out")
    rps_s=$(awk '/^Requests\/sec/ {print $2}' "$tmp/pair-$i.out")
    pair_rps+=("$(awk -v a="$rps_s" -v b="$rps_b" 'BEGIN { printf "%.4f", (b > 0) ? a / b : 0 }')")
    pair_cpu+=("$(awk -v b="$((b1 - b0))" -v nb="$served_b" -v s="$((s1 - s0))" -v ns="$served_s" \
        'BEGIN { printf "%.4f", (s > 0 && nb > 0) ? (b / nb) / (s / ns) : 0 }')")
    pair_busy+=("$(awk -v c="$((b1 - b0 + s1 - s0))" -v w="$((end - start))" \
        'BEGIN { printf "%.1f", 100 * c / w }')")
    pair_base+=("$rps_b") pair_scenario+=("$rps_s")
}

# Runs $rounds rounds; in each, every scenario with a budget plugin runs paired with the
# baseline. Prints one row per scenario: the medians of its requests/s, of the baseline's in
# its runs, and of the two ratios.
measure_paired() {
    local i round k
    local -a pair_rps=() pair_cpu=() pair_busy=() pair_base=() pair_scenario=() pair_of=()
    for round in $(seq 1 "$rounds"); do
        for ((i = 1; i < ${#names[@]}; i++)); do
            run_pair "$i"
            pair_of+=("$i")
        done
    done
    # Prints the values of array NAME that belong to scenario I, one per line.
    values_of() {
        local -n values=$1
        for k in "${!pair_of[@]}"; do
            if [[ ${pair_of[k]} == "$2" ]]; then echo "${values[k]}"; fi
        done
    }
    for ((i = 1; i < ${#names[@]}; i++)); do
        printf '| %-34s | %12s | %12s | %6s | %9s |\n' "${labels[i]}" \
            "$(values_of pair_scenario "$i" | median_of '%.0f')" "$(values_of pair_base "$i" | median_of '%.0f')" \
            "$(values_of pair_rps "$i" | median_of '%.3f')" "$(values_of pair_cpu "$i" | median_of '%.3f')"
    done
    echo
    printf -- '- CPU 0 busy (median over the runs): %s%%\n' "$(printf '%s\n' "${pair_busy[@]}" | median_of '%.1f')"
    for ((i = 1; i < ${#names[@]}; i++)); do
        printf -- '- %s, ratio by round:%s; CPU ratio by round:%s\n' "${labels[i]}" \
            "$(values_of pair_rps "$i" | awk '{ printf " %.3f", $1 }')" \
            "$(values_of pair_cpu "$i" | awk '{ printf " %.3f", $1 }')"
    done
}

echo "machine: $(nproc) CPUs, $(awk '/model name/ {$1=$2=$3=""; print; exit}' /proc/cpuinfo | sed 's/^ *//')"
if [[ $mode == wrk ]]; then
    echo "binary: $("$binary" version 2>/dev/null || echo unknown); $rounds rounds of wrk runs of $seconds s (-t1 -c32), each between two baseline runs; gateway threads = 1"
elif [[ $mode == paired ]]; then
    echo "binary: $("$binary" version 2>/dev/null || echo unknown); $rounds rounds of paired wrk runs of $seconds s (-t1 -c32 each), the baseline and a scenario at once; gateway threads = 1"
else
    echo "binary: $("$binary" version 2>/dev/null || echo unknown); callgrind over $requests requests (ab -k -c 8) after 500 warm-up requests; gateway threads = 1"
fi
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "redis: $(redis-server --version | awk '{print $3}')"
echo
if [[ $mode == wrk ]]; then
    echo "| scenario                           | requests/s   | p99      | ratio  | median | CPU ns/req | CPU ratio |"
    echo "|------------------------------------|--------------|----------|--------|--------|------------|-----------|"
elif [[ $mode == paired ]]; then
    echo "| scenario                           | requests/s   | baseline r/s | ratio  | CPU ratio |"
    echo "|------------------------------------|--------------|--------------|--------|-----------|"
else
    echo "| scenario                           | instr./req.  | p99      | ratio  |"
    echo "|------------------------------------|--------------|----------|--------|"
fi
scenario none "no budget plugins" ""
if [[ $mode == paired ]]; then
    # A second gateway without budget plugins: its ratio shows the error of the pairing itself.
    scenario twin "no budget plugins (A/A check)" ""
fi
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
case $mode in
wrk) measure ;;
paired) measure_paired ;;
esac
