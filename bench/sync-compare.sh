#!/usr/bin/env bash
# Compares `mirror-gateway sync` with `aws s3 sync --delete` and `rclone sync` on one S3 bucket
# served by a local moto server. There are three scenarios: a full sync into an empty
# directory, a run where nothing changed, and a run after 1% of the objects were rewritten
# (half of them at the same size). Prints one markdown table: wall time, the requests each tool made, by kind,
# counted from moto's own request log, and how many files of its tree differ from the export.
#
#   bench/sync-compare.sh [OBJECTS [LARGE]]   default 10000 objects, 5 of them 8-20 MB
#
# Needs target/release/mirror-gateway (cargo build --release), moto in .venv (scripts/test.sh
# makes it), awscli in .venv-bench and rclone (scripts/setup-debian.sh --bench installs both).
# Everything runs on 127.0.0.1 in a temp dir, which is removed on exit with the moto server this
# script started. Each tool run is limited to TOOL_TIMEOUT seconds (default 600).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/free-port.sh
source scripts/free-port.sh

objects=${1:-10000}
large=${2:-5}
tool_timeout=${TOOL_TIMEOUT:-600}
readonly BUCKET=mirror PREFIX=export/latest/ CHANGED=$((objects / 100))
gateway=target/release/mirror-gateway
moto=.venv/bin/moto_server
python=.venv/bin/python
aws=.venv-bench/bin/aws
work=$(mktemp -d)
moto_pid=""

main() {
    trap cleanup EXIT
    check_tools
    local port
    port=$(free_port)
    endpoint="http://127.0.0.1:$port"
    start_moto "$port"
    "$python" bench/sync_bench.py fill "$endpoint" "$BUCKET" "$PREFIX" "$objects" "$large"
    write_gateway_config
    : >"$work/results.tsv"
    local changed=0
    for scenario in full no-change changed; do
        if [[ $scenario == changed ]]; then
            changed=$CHANGED
            "$python" bench/sync_bench.py change "$endpoint" "$BUCKET" "$PREFIX" "$objects" "$changed"
        fi
        measure "$scenario" mirror-gateway run_gateway dest-gateway/latest "$changed"
        measure "$scenario" "aws s3 sync" run_aws dest-aws "$changed"
        measure "$scenario" "rclone sync" run_rclone dest-rclone "$changed"
    done
    echo
    echo "$objects objects ($large of 8-20 MB), $CHANGED rewritten in 'changed'; $(date -u +%F)"
    echo
    "$python" bench/sync_bench.py table "$work/results.tsv"
}

check_tools() {
    local missing=()
    [[ -x $gateway ]] || missing+=("$gateway (cargo build --release)")
    [[ -x $moto ]] || missing+=("$moto (scripts/test.sh creates .venv)")
    [[ -x $aws ]] || missing+=("$aws (scripts/setup-debian.sh --bench)")
    command -v rclone >/dev/null || missing+=("rclone (scripts/setup-debian.sh --bench)")
    if [[ ${#missing[@]} -gt 0 ]]; then
        printf 'sync-compare.sh: missing: %s\n' "${missing[@]}" >&2
        exit 1
    fi
}

# Starts moto on 127.0.0.1:PORT, logging every request to $work/moto.log; waits up to 30 s.
start_moto() {
    local port=$1
    "$moto" -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
    moto_pid=$!
    for _ in $(seq 60); do
        if ! kill -0 "$moto_pid" 2>/dev/null; then
            echo "sync-compare.sh: moto exited at start; its output:" >&2
            cat "$work/moto.log" >&2
            exit 1
        fi
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.5
    done
    echo "sync-compare.sh: timed out after 30 s waiting for moto on port $port" >&2
    exit 1
}

write_gateway_config() {
    cat >"$work/sync.toml" <<EOF
[sync.jobs.bench]
destination = "$work/dest-gateway"
deadline_secs = $tool_timeout

[sync.jobs.bench.source]
kind = "s3"
bucket = "$BUCKET"
prefix = "$PREFIX"
region = "us-east-1"
endpoint = "$endpoint"
path_style = true
allow_http = true
EOF
}

# Runs one tool in one scenario and appends its row to results.tsv: wall time, the requests
# moto logged while it ran, its exit status, and the files of its tree DEST that differ from
# the export (with CHANGED objects rewritten).
measure() {
    local scenario=$1 tool=$2 runner=$3 dest=$4 changed=$5 skip start end rc=0 counts wrong
    skip=$(wc -l <"$work/moto.log")
    start=$(date +%s%N)
    "$runner" >"$work/$runner.$scenario.log" 2>&1 || rc=$?
    end=$(date +%s%N)
    # werkzeug writes a request's log line as its response starts; let the last ones land.
    sleep 1
    counts=$("$python" bench/sync_bench.py count "$work/moto.log" "$skip" "$BUCKET")
    local seconds
    seconds=$(awk -v ns=$((end - start)) 'BEGIN { printf "%.3f", ns / 1e9 }')
    wrong=$("$python" bench/sync_bench.py check "$work/$dest" "$objects" "$large" "$changed")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$scenario" "$tool" "$seconds" "$counts" "$rc" "$wrong" \
        >>"$work/results.tsv"
    printf '%-10s %-15s %8s s  list/head/get/other/errors: %s  exit %s  wrong files: %s\n' \
        "$scenario" "$tool" "$seconds" "$(echo "$counts" | tr '\t' /)" "$rc" "$wrong"
    if [[ $rc -ne 0 ]]; then
        echo "--- last 20 lines of $tool's output:"
        tail -n 20 "$work/$runner.$scenario.log"
    fi
}

# Dummy credentials for moto. The shared AWS files and the caller's AWS_CA_BUNDLE are kept
# out, because the endpoint is plain HTTP and rclone fails to start with a custom CA bundle.
s3_env=(-u AWS_CA_BUNDLE -u AWS_PROFILE AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
    AWS_REGION=us-east-1 AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
    AWS_EC2_METADATA_DISABLED=true)

run_gateway() {
    env "${s3_env[@]}" timeout "$tool_timeout" "$gateway" sync -c "$work/sync.toml"
}

run_aws() {
    env "${s3_env[@]}" timeout "$tool_timeout" "$aws" s3 sync "s3://$BUCKET/$PREFIX" \
        "$work/dest-aws" --delete --endpoint-url "$endpoint" --only-show-errors
}

# rclone's defaults, with the remote defined by environment variables and --fast-list (one
# recursive listing instead of one per directory).
run_rclone() {
    : >"$work/rclone.conf"
    env -u AWS_CA_BUNDLE RCLONE_CONFIG_MOTO_TYPE=s3 RCLONE_CONFIG_MOTO_PROVIDER=Other \
        RCLONE_CONFIG_MOTO_ENDPOINT="$endpoint" RCLONE_CONFIG_MOTO_REGION=us-east-1 \
        RCLONE_CONFIG_MOTO_ACCESS_KEY_ID=testing RCLONE_CONFIG_MOTO_SECRET_ACCESS_KEY=testing \
        RCLONE_CONFIG_MOTO_FORCE_PATH_STYLE=true \
        timeout "$tool_timeout" rclone --config "$work/rclone.conf" sync \
        "moto:$BUCKET/${PREFIX%/}" "$work/dest-rclone" --fast-list
}

cleanup() {
    if [[ -n $moto_pid ]] && kill -0 "$moto_pid" 2>/dev/null; then
        kill "$moto_pid" 2>/dev/null || true
        wait "$moto_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}

main "$@"
