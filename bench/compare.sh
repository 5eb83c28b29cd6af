#!/usr/bin/env bash
# Runs the same scenarios against nginx, Varnish and mirror-gateway, one server at a time, and
# prints one markdown table (rows: scenarios; columns: the three servers and the ratio of the
# gateway to the better of the other two).
#
#   bench/compare.sh [SECONDS] [ROUNDS]
#                                   default 5 seconds per wrk run and 1 round; about 2 minutes
#                                   in all, plus about a minute per extra round at 5 s
#
# With ROUNDS above 1, the cached-hit scenarios (b), (c) and (d) and the stampede (e) run ROUNDS
# times, the servers taking turns in each round, so that a slow spell of the machine falls on
# all of them alike. Their cells then show each server's median over the rounds (requests/s,
# MiB/s, p50 and p99 each taken as its own median), and the ratio column the median over the
# rounds of the ratio within each round. A line under the table lists every round's ratios.
#
# Needs nginx, varnishd, wrk, python3, curl and htpasswd (scripts/setup-debian.sh --bench installs
# them) and a release build (cargo build --release). Installs nothing.
#
# Everything runs on 127.0.0.1 with free ports, in a temp dir removed on exit: the Python
# origin (bench/origin.py), nginx (disk proxy_cache), Varnish (malloc storage) and the gateway
# (memory cache). With two or more CPUs, the server under test runs on CPU 0, and wrk, the
# stampede client and the origin run on CPU 1. Each server is idle while another is measured.
#
# Environment:
#   BENCH_DELAY_MS         first-byte delay of the origin's /slow/ and /stale/ paths (500)
#   BENCH_GATEWAY_CACHE    extra lines for the gateway's [cache] table, for example to turn on
#                          the disk tier. @TMP@ is replaced by the temp dir. Example:
#                          BENCH_GATEWAY_CACHE=$'disk_dir = "@TMP@/disk"\ndisk_bytes = "1GiB"'
#   BENCH_GATEWAY_THREADS  the gateway's worker threads (default 1); with two or more CPUs they
#                          share CPU 0, where the gateway is pinned
#   BENCH_GATEWAY_SERVER   extra lines for the gateway's [server] table, for example
#                          BENCH_GATEWAY_SERVER='tcp_nopush = false' to send large cached bodies uncorked
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=${1:-5}
rounds=${2:-1}
delay_ms=${BENCH_DELAY_MS:-500}
gateway_cache_extra=${BENCH_GATEWAY_CACHE:-}
gateway_server_extra=${BENCH_GATEWAY_SERVER:-}
gateway_threads=${BENCH_GATEWAY_THREADS:-1}
binary=$root/target/release/mirror-gateway

[[ $seconds =~ ^[0-9]+$ && $seconds -ge 1 && $seconds -le 60 ]] || {
    echo "compare: SECONDS must be a whole number from 1 to 60, got '$seconds'" >&2
    exit 2
}
[[ $rounds =~ ^[0-9]+$ && $rounds -ge 1 && $rounds -le 10 ]] || {
    echo "compare: ROUNDS must be a whole number from 1 to 10, got '$rounds'" >&2
    exit 2
}
[[ $gateway_threads =~ ^[1-9][0-9]?$ && $gateway_threads -le 64 ]] || {
    echo "compare: BENCH_GATEWAY_THREADS must be a whole number from 1 to 64, got '$gateway_threads'" >&2
    exit 2
}
[[ -x $binary ]] || { echo "compare: $binary missing; build first: cargo build --release" >&2; exit 1; }
missing=()
for tool in nginx varnishd wrk python3 curl htpasswd; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "compare: not found: ${missing[*]}; run scripts/setup-debian.sh --bench" >&2
    exit 1
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/mirror-bench.XXXXXX")
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

# --- helpers -------------------------------------------------------------------------------

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits up to 10 s until URL responds with any status, else prints the server's log and exits.
wait_ready() {
    local name=$1 url=$2 log=$3
    for _ in $(seq 1 100); do
        curl -s -o /dev/null --max-time 1 "$url" && return 0
        sleep 0.1
    done
    echo "compare: $name did not respond on $url within 10 s; its log:" >&2
    tail -20 "$log" >&2 || true
    exit 1
}

# Prints a wrk latency ("850.00us", "6.32ms", "1.02s", "1.50m") in milliseconds, with three
# significant digits at most.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : -1
        if (f < 0) { print "?"; exit }
        ms = n * f
        printf (ms >= 100 ? "%.0f" : ms >= 10 ? "%.1f" : "%.2f"), ms }'
}

# Prints a wrk transfer rate ("512.00MB", "1.23GB") in MiB/s (wrk's units are powers of 1024).
to_mib() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        f = (u == "B") ? 1/1048576 : (u == "KB") ? 1/1024 : (u == "MB") ? 1 : (u == "GB") ? 1024 : -1
        if (f < 0) print "?"; else printf "%.0f", n * f }'
}

# Prints the median of the numbers given as arguments (the mean of the middle two for an even
# count).
median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print 0; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        print m }'
}

# Prints GATEWAY over the better of NGINX and VARNISH with two decimals: better is higher with
# SENSE "high" and lower with "low". Prints "?" when the gateway's value or both peers' are
# missing ("" or "None"), or the better peer's is 0.
#   peer_ratio SENSE NGINX VARNISH GATEWAY
peer_ratio() {
    awk -v sense="$1" -v n="$2" -v v="$3" -v g="$4" 'BEGIN {
        best = ""
        if (n != "" && n != "None") best = n + 0
        if (v != "" && v != "None") { if (best == "" || (sense == "low" ? v < best : v > best)) best = v + 0 }
        if (best == "" || best == 0 || g == "" || g == "None") { print "?"; exit }
        printf "%.2f", g / best }'
}

# Appends the ratio of one round's numbers, kept in `this_round` by server, to
# round_ratios[KEY]. A missing number gives the ratio 0.
#   add_round_ratio KEY SENSE
add_round_ratio() {
    local ratio
    ratio=$(peer_ratio "$2" "${this_round[nginx]}" "${this_round[varnish]}" "${this_round[gateway]}")
    round_ratios[$1]+="${ratio/\?/0} "
}

# Prints an integer with thousands separators.
grouped() {
    printf '%.0f' "$1" | sed -e ':a' -e 's/\([0-9]\)\([0-9]\{3\}\)\($\|,\)/\1,\2\3/' -e 'ta'
}

# Waits until the servers' CPU is idle (under 10% busy over 0.2 s), for at most 15 s. Work left
# from the run before would otherwise fall on the next contender. For example, nginx goes on
# checking the bcrypt passwords of the requests wrk gave up on (about 1.6 s, an estimate).
settle() {
    local line=cpu deadline=$((SECONDS + 15)) before after
    [[ ${#pin_server[@]} -gt 0 ]] && line=cpu0
    while ((SECONDS < deadline)); do
        before=$(awk -v l="$line" '$1 == l {print $2 + $3 + $4 + $7 + $8, $5 + $6}' /proc/stat)
        sleep 0.2
        after=$(awk -v l="$line" '$1 == l {print $2 + $3 + $4 + $7 + $8, $5 + $6}' /proc/stat)
        if awk -v a="$before" -v b="$after" 'BEGIN {
            split(a, x, " "); split(b, y, " "); busy = y[1] - x[1]; idle = y[2] - x[2]
            exit !(busy * 10 <= busy + idle) }'; then
            return
        fi
    done
    note "the server CPU was still busy 15 s after the run before"
}

# Runs wrk for SECONDS against a URL and sets rps, p99_ms, max_ms, mib_s; adds a note on errors.
# Waits for the servers' CPU to be idle first.
#   measure LABEL URL [wrk options...] [-- script arguments...]
measure() {
    local label=$1 url=$2; shift 2
    local options=() out
    settle
    while [[ $# -gt 0 && $1 != -- ]]; do options+=("$1"); shift; done
    out=$(timeout $((seconds + 40)) "${pin_load[@]}" wrk -t1 -d"${seconds}s" --timeout 20s \
        --latency "${options[@]}" "$url" "$@" 2>&1) || {
        note "$label: wrk failed: $(tail -1 <<<"$out")"
        rps=0 p99_ms='?' max_ms='?' mib_s=0
        return
    }
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    p99_ms=$(to_ms "$(awk '$1 == "99%" {print $2}' <<<"$out")")
    max_ms=$(to_ms "$(awk '$1 == "Latency" {print $4}' <<<"$out")")
    mib_s=$(to_mib "$(awk '/^Transfer\/sec/ {print $2}' <<<"$out")")
    local bad errors
    bad=$(awk '/Non-2xx or 3xx/ {print $NF}' <<<"$out")
    errors=$(grep -E '^ *Socket errors' <<<"$out" || true)
    [[ -z $bad ]] || note "$label: $bad responses were not 2xx/3xx"
    [[ -z $errors ]] || note "$label:${errors#*Socket errors:}"
}

notes=()
note() { notes+=("$1"); }

# Fetches URL twice (the first fills the cache) and notes when the second is not a cache hit.
warm() {
    local label=$1 url=$2; shift 2
    curl -s -o /dev/null --max-time 30 "$@" "$url" || true
    local status
    status=$(curl -s -o /dev/null -D - --max-time 30 "$@" "$url" |
        awk -F': *' 'tolower($1) == "x-cache-status" {gsub(/\r/, "", $2); print $2}')
    [[ $status == HIT ]] || note "$label: warm-up request got X-Cache-Status '${status:-none}', not HIT"
}

# Prints the origin's request count for one path.
origin_count() {
    curl -s --max-time 5 "http://127.0.0.1:$origin_port/__stats" |
        python3 -c 'import json, sys; print(json.load(sys.stdin).get(sys.argv[1], 0))' "$1"
}

# Prints the peak resident memory (VmHWM) of the given PIDs together, in MiB.
peak_mib() {
    local total=0 pid kb
    for pid in "$@"; do
        kb=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$((total + ${kb:-0}))
    done
    awk -v k="$total" 'BEGIN {printf "%.1f", k / 1024}'
}

children() { ps -o pid= --ppid "$1" | tr -d ' '; }

# --- servers -------------------------------------------------------------------------------

origin_port=$(free_port)
"${pin_load[@]}" python3 "$root/bench/origin.py" --port "$origin_port" --delay-ms "$delay_ms" \
    >"$tmp/origin.log" 2>&1 &
pids+=($!)
wait_ready origin "http://127.0.0.1:$origin_port/__stats" "$tmp/origin.log"

htpasswd -B -C 10 -b -c "$tmp/htpasswd" bench bench-pass 2>/dev/null
auth_header="Authorization: Basic $(printf 'bench:bench-pass' | base64)"

declare -A port
port[nginx]=$(free_port)
mkdir -p "$tmp/nginx/cache"
cat >"$tmp/nginx/nginx.conf" <<EOF
daemon off;
worker_processes 1;
user $(id -un) $(id -gn);
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path $tmp/nginx/body;
    proxy_temp_path $tmp/nginx/proxy;
    fastcgi_temp_path $tmp/nginx/fastcgi;
    uwsgi_temp_path $tmp/nginx/uwsgi;
    scgi_temp_path $tmp/nginx/scgi;
    proxy_cache_path $tmp/nginx/cache levels=1:2 keys_zone=bench:64m max_size=2g
                     inactive=1h use_temp_path=off;
    upstream origin {
        server 127.0.0.1:$origin_port;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:${port[nginx]};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_cache bench;
        proxy_cache_lock on;
        proxy_cache_lock_timeout 30s;
        proxy_cache_use_stale updating error timeout;
        proxy_cache_background_update on;
        proxy_cache_valid 200 5m;
        add_header X-Cache-Status \$upstream_cache_status always;
        location / {
            proxy_pass http://origin;
        }
        location /auth/ {
            auth_basic "bench";
            auth_basic_user_file $tmp/htpasswd;
            proxy_pass http://origin;
        }
    }
}
EOF
"${pin_server[@]}" nginx -p "$tmp/nginx" -e "$tmp/nginx/error.log" -c "$tmp/nginx/nginx.conf" \
    >"$tmp/nginx/stdout.log" 2>&1 &
pids+=($!)
nginx_pid=$!
wait_ready nginx "http://127.0.0.1:${port[nginx]}/__stats" "$tmp/nginx/error.log"

port[varnish]=$(free_port)
cat >"$tmp/bench.vcl" <<EOF
vcl 4.1;
backend origin {
    .host = "127.0.0.1";
    .port = "$origin_port";
    .first_byte_timeout = 30s;
}
sub vcl_backend_response {
    # Keep serving an expired object for an hour while one background fetch refreshes it.
    set beresp.grace = 1h;
}
sub vcl_deliver {
    if (obj.hits > 0) {
        set resp.http.X-Cache-Status = "HIT";
    } else {
        set resp.http.X-Cache-Status = "MISS";
    }
}
EOF
"${pin_server[@]}" varnishd -F -j none -T none -a "127.0.0.1:${port[varnish]}" -n "$tmp/varnish" \
    -s malloc,256m -f "$tmp/bench.vcl" >"$tmp/varnish.log" 2>&1 &
pids+=($!)
varnish_pid=$!
wait_ready varnish "http://127.0.0.1:${port[varnish]}/__stats" "$tmp/varnish.log"

port[gateway]=$(free_port)
ttl_rules='
[[domains.DOMAIN.plugins]]
name = "ttl"

[[domains.DOMAIN.plugins.rules]]
pattern = "/stale/**"
ttl_secs = 1

[[domains.DOMAIN.plugins.rules]]
pattern = "/miss/**"
ttl_secs = 60

[[domains.DOMAIN.plugins.rules]]
pattern = "/**"
ttl_secs = 300'
cat >"$tmp/gateway.toml" <<EOF
[server]
listen = ["127.0.0.1:${port[gateway]}"]
threads = $gateway_threads
runtime_dir = "$tmp"
grace_period_secs = 0
shutdown_timeout_secs = 1
# --- extra [server] keys from BENCH_GATEWAY_SERVER (tcp_nopush, for example) ---
$gateway_server_extra

[log]
access_log = "off"
level = "warn"

[cache]
memory_bytes = "512MiB"
max_object_bytes = "64MiB"
# --- extra [cache] keys from BENCH_GATEWAY_CACHE (the disk tier, for example) ---
${gateway_cache_extra//@TMP@/$tmp}

# open.bench: no authentication.
[domains.open]
hosts = ["open.bench"]
stale_while_revalidate_secs = 60

[domains.open.origins.origin]
kind = "http"
addresses = ["127.0.0.1:$origin_port"]
read_timeout_ms = 30000

[[domains.open.routes]]
prefix = "/"
origin = "origin"
${ttl_rules//DOMAIN/open}

# auth.bench: bcrypt Basic Auth on /auth/.
[domains.auth]
hosts = ["auth.bench"]

[domains.auth.origins.origin]
kind = "http"
addresses = ["127.0.0.1:$origin_port"]

[[domains.auth.routes]]
prefix = "/auth/"
origin = "origin"

[[domains.auth.plugins]]
name = "htpasswd"
file = "$tmp/htpasswd"
realm = "bench"
${ttl_rules//DOMAIN/auth}
EOF
"$binary" check -c "$tmp/gateway.toml" >/dev/null || {
    echo "compare: the gateway config written to $tmp/gateway.toml is invalid (see above)" >&2
    exit 1
}
"${pin_server[@]}" "$binary" run -c "$tmp/gateway.toml" >"$tmp/gateway.log" 2>&1 &
pids+=($!)
gateway_pid=$!
wait_ready gateway "http://127.0.0.1:${port[gateway]}/__stats" "$tmp/gateway.log"

contenders=(nginx varnish gateway)
declare -A cell value

base() { echo "http://127.0.0.1:${port[$1]}"; }

# --- scenarios -----------------------------------------------------------------------------

# (a) cached 1 KB index behind bcrypt Basic Auth: nginx and the gateway.
for c in nginx gateway; do
    url=$(base "$c")/auth/index.json
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: auth.bench' "$url")
    [[ $code == 401 ]] || note "$c auth: a request without credentials got $code, not 401"
    warm "$c auth" "$url" -H 'Host: auth.bench' -H "$auth_header"
    measure "$c auth" "$url" -c32 -H 'Host: auth.bench' -H "$auth_header"
    cell[a,$c]="$(grouped "$rps") req/s, p99 $p99_ms ms" value[a,$c]=$rps
done
cell[a,varnish]="n/a" value[a,varnish]=

# (b) cached 1 KB index, no auth. (c) cached 1 MB bundle. (d) cached 20 MB bundle. Each runs
# ROUNDS times, the servers taking turns; every run's numbers are kept in runs[ROW,SERVER]
# (requests/s or MiB/s) and p99s[ROW,SERVER], separated by spaces.
declare -A runs p99s round_ratios
hit_scenario() {
    local key=$1 path=$2 connections=$3 label=$4 unit=$5 c r number
    for c in "${contenders[@]}"; do warm "$c $label" "$(base "$c")$path" -H 'Host: open.bench'; done
    for r in $(seq 1 "$rounds"); do
        declare -A this_round=()
        for c in "${contenders[@]}"; do
            measure "$c $label" "$(base "$c")$path" "-c$connections" -H 'Host: open.bench'
            number=$rps
            [[ $unit == req/s ]] || number=$mib_s
            runs[$key,$c]+="$number " p99s[$key,$c]+="$p99_ms " this_round[$c]=$number
        done
        add_round_ratio "$key" high
    done
    for c in "${contenders[@]}"; do
        # shellcheck disable=SC2086 # the lists are numbers separated by spaces
        value[$key,$c]=$(median ${runs[$key,$c]})
        cell[$key,$c]="$(grouped "${value[$key,$c]}") $unit"
        # shellcheck disable=SC2086
        [[ $unit != req/s ]] || cell[$key,$c]+=", p99 $(median ${p99s[$key,$c]//\?/}) ms"
    done
}
hit_scenario b /index.json 32 index req/s
hit_scenario c /bundle-1m.json 16 "1 MB" MiB/s
hit_scenario d /bundle-20m.json 4 "20 MB" MiB/s

# (e) cold stampede: 200 connections send GET on the same uncached slow path at once. With
# ROUNDS above 1 it runs once per round on a fresh path (a new query string), the servers taking
# turns. The cells then show the medians of the rounds' times to first byte, the most origin
# requests of any round and the fewest 200s of any round.
declare -A stampede_p50s stampede_p99s stampede_origin stampede_ok
for r in $(seq 1 "$rounds"); do
    declare -A this_round=()
    for c in "${contenders[@]}"; do
        path=/slow/bundle-1m.json
        target=$path
        [[ $rounds -eq 1 ]] || target="$path?round=$r"
        before=$(origin_count "$path")
        json=$(timeout 60 "${pin_load[@]}" python3 "$root/bench/stampede.py" --port "${port[$c]}" \
            --path "$target" --host open.bench -n 200) || json='{}'
        after=$(origin_count "$path")
        read -r p50 p99 ok extra < <(python3 -c '
import json, sys
r = json.loads(sys.argv[1] or "{}")
t = r.get("ttfb_ms", {})
ok = r.get("statuses", {}).get("200", 0)
bad = r.get("requests", 0) - ok + r.get("short_bodies", 0)
fmt = lambda v: "?" if v is None else "%.0f" % v if v >= 100 else "%.1f" % v
print(fmt(t.get("p50")), t.get("p99"), ok, bad)' "$json")
        [[ $extra == 0 ]] || note "$c stampede, round $r: $json"
        stampede_p50s[$c]+="${p50//\?/} " stampede_p99s[$c]+="${p99//None/} " this_round[$c]=$p99
        if [[ -z ${stampede_origin[$c]:-} || $((after - before)) -gt ${stampede_origin[$c]} ]]; then
            stampede_origin[$c]=$((after - before))
        fi
        if [[ -z ${stampede_ok[$c]:-} || $ok -lt ${stampede_ok[$c]} ]]; then
            stampede_ok[$c]=$ok
        fi
    done
    add_round_ratio e low
done
for c in "${contenders[@]}"; do
    # shellcheck disable=SC2086 # the lists are numbers separated by spaces
    p99=$(median ${stampede_p99s[$c]})
    # shellcheck disable=SC2086
    p50=$(median ${stampede_p50s[$c]})
    cell[e,$c]="${stampede_origin[$c]} origin req; TTFB p50 $(printf '%.0f' "$p50"), p99 $(to_ms "${p99}ms") ms (${stampede_ok[$c]} of 200 OK)"
    [[ $rounds -eq 1 ]] || cell[e,$c]+=", medians of $rounds rounds"
    value[e,$c]=$p99
done

# (f) stale while the origin is slow: fill /stale/index.json (max-age=1), let it expire, then
# load it while every refresh takes BENCH_DELAY_MS.
for c in "${contenders[@]}"; do
    url=$(base "$c")/stale/index.json
    curl -s -o /dev/null --max-time 30 -H 'Host: open.bench' "$url" || true
    sleep 1.5
    before=$(origin_count /stale/index.json)
    first_ms=$(curl -s -o /dev/null --max-time 30 -w '%{time_total}' -H 'Host: open.bench' "$url" |
        awk '{printf "%.1f", $1 * 1000}')
    measure "$c stale" "$url" -c32 -H 'Host: open.bench'
    after=$(origin_count /stale/index.json)
    cell[f,$c]="$(grouped "$rps") req/s, p99 $p99_ms, max $max_ms ms; 1st $first_ms ms; $((after - before)) origin req"
    value[f,$c]=$rps
done

# (g) misses: every request is for a new /miss/<tag>-<n> path.
for c in "${contenders[@]}"; do
    measure "$c miss" "$(base "$c")/" -c32 -H 'Host: open.bench' -s "$root/bench/miss.lua" -- "$c"
    cell[g,$c]="$(grouped "$rps") req/s, p99 $p99_ms ms" value[g,$c]=$rps
done

# (h) peak resident memory after all scenarios. The gateway's cache contains the bodies fetched
# above (3 × 1 KB, 20 MB, and 1 MB for (c) and for each stampede round) and one small entry per
# miss. Its figure is also given without those bodies, because nginx keeps its cache on disk
# (page cache, not its RSS).
mapfile -t nginx_children < <(children "$nginx_pid")
mapfile -t varnish_child < <(children "$varnish_pid")
value[h,nginx]=$(peak_mib "$nginx_pid" "${nginx_children[@]}")
value[h,varnish]=$(peak_mib "${varnish_child[@]}")
value[h,gateway]=$(peak_mib "$gateway_pid")
gateway_misses=$(curl -s --max-time 5 "http://127.0.0.1:$origin_port/__stats" |
    python3 -c 'import json, sys; print(sum(v for k, v in json.load(sys.stdin).items() if k.startswith("/miss/gateway-")))')
bodies_mib=$((21 + rounds))
gateway_outside=$(awk -v m="${value[h,gateway]}" -v b="$bodies_mib" 'BEGIN {printf "%.1f", m - b - 3 / 1024}')
for c in "${contenders[@]}"; do cell[h,$c]="${value[h,$c]} MiB"; done
cell[h,gateway]+=", $gateway_outside MiB without the $bodies_mib MiB of cached bundle/index bodies"
# The target is memory outside the cache's budget, so the ratio compares the figure without them.
value[h,gateway]=$gateway_outside
note "memory: nginx = master + ${#nginx_children[@]} children (worker, cache manager, cache loader while it runs); Varnish = its child process (the manager process, $(peak_mib "$varnish_pid") MiB, not counted; malloc storage counts in the child); the gateway also held $gateway_misses small miss entries"

# --- table ---------------------------------------------------------------------------------

# Prints the gateway's value over the better peer's: higher is better, or lower with "low".
# With several rounds, a row that ran in each prints the median of its rounds' ratios.
ratio() {
    local row=$1 sense=$2
    if [[ $rounds -gt 1 && -n ${round_ratios[$row]:-} ]]; then
        # shellcheck disable=SC2086 # the list is numbers separated by spaces
        printf '%.2f×' "$(median ${round_ratios[$row]})"
        return
    fi
    local result
    result=$(peer_ratio "$sense" "${value[$row,nginx]}" "${value[$row,varnish]}" "${value[$row,gateway]}")
    [[ $result == "?" ]] || result+="×"
    printf '%s' "$result"
}

row() {
    local key=$1 title=$2 sense=$3 unit=$4
    printf '| %s | %s | %s | %s | %s %s |\n' "$title" "${cell[$key,nginx]}" "${cell[$key,varnish]}" \
        "${cell[$key,gateway]}" "$(ratio "$key" "$sense")" "$unit"
}

echo "machine: $(nproc) CPUs, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)," \
    "$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo) RAM," \
    "$(awk -F= '$1 == "PRETTY_NAME" {gsub(/"/, "", $2); print $2}' /etc/os-release)"
echo "versions: $(nginx -v 2>&1 | sed 's/.*: //'), $(varnishd -V 2>&1 | head -1 | sed 's/ revision.*//;s/[()]//g')," \
    "$(wrk --version 2>&1 | head -1 | awk '{print $1, $2}'), $("$binary" version 2>&1 | head -1)"
echo "run: $seconds s per wrk run (wrk -t1), $rounds round(s) of (b) to (e), origin delay $delay_ms ms, gateway threads $gateway_threads, pinning: ${pin_server[*]:-none} / ${pin_load[*]:-none}, $(date -u +%Y-%m-%d)"
for extra in "$gateway_server_extra" "$gateway_cache_extra"; do
    [[ -z $extra ]] || echo "gateway settings added: ${extra//$'\n'/; }"
done
echo
echo "| scenario | nginx | Varnish | mirror-gateway | gateway ÷ better peer |"
echo "|---|---|---|---|---|"
row a "(a) cached 1 KB index, bcrypt Basic Auth, -c32" high "(req/s)"
row b "(b) cached 1 KB index, no auth, -c32" high "(req/s)"
row c "(c) cached 1 MB bundle, -c16" high "(MiB/s)"
row d "(d) cached 20 MB bundle, -c4" high "(MiB/s)"
row e "(e) cold stampede, 200 clients, 1 MB, origin ${delay_ms} ms" low "(TTFB p99, lower is better)"
row f "(f) stale entry, origin ${delay_ms} ms, -c32" high "(req/s)"
row g "(g) misses, unique paths, -c32" high "(req/s)"
row h "(h) peak resident memory (VmHWM)" low "(without the cached bodies; lower is better)"
if [[ $rounds -gt 1 ]]; then
    echo
    for key in b c d e; do
        echo "- ($key) gateway ÷ better peer, round by round: ${round_ratios[$key]% }"
    done
fi
if [[ ${#notes[@]} -gt 0 ]]; then
    echo
    printf -- '- %s\n' "${notes[@]}"
fi
