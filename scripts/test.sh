#!/usr/bin/env bash
# Runs every check of the project, stopping at the first failure:
#   Debian packages, sample mirror data, cargo fmt, cargo clippy, moto in .venv (for the S3
#   sync tests), cargo test, then the operator smoke tests against a gateway started here on
#   a free loopback port.
# GATEWAY_PROFILE=release smoke-tests a release build (default: debug, which cargo test
# has mostly built already). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/free-port.sh
source scripts/free-port.sh
# Incremental artifacts would double the disk a full build needs; a test run gains nothing.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

profile=${GATEWAY_PROFILE:-debug}
[[ "$profile" == debug || "$profile" == release ]] || {
    echo "test.sh: GATEWAY_PROFILE must be 'debug' or 'release', not '$profile'" >&2
    exit 1
}
target_dir=${CARGO_TARGET_DIR:-target}
work=$(mktemp -d)
gateway_pid=""

main() {
    trap cleanup EXIT
    section "Debian packages"
    scripts/setup-debian.sh
    section "sample mirror data"
    conf/sample-mirror/generate.sh
    section "cargo fmt"
    cargo fmt --all -- --check
    section "cargo clippy"
    cargo clippy --workspace --all-targets -- -D warnings
    section "moto (S3 test server) in .venv"
    moto_venv
    section "cargo test"
    cargo test --workspace --no-fail-fast
    section "gateway build ($profile)"
    local build_flags=()
    [[ "$profile" == release ]] && build_flags=(--release)
    cargo build "${build_flags[@]}" --bin mirror-gateway
    local bin="$target_dir/$profile/mirror-gateway"
    section "config check"
    "$bin" check -c conf/gateway.toml
    smoke "$bin"
    section "all checks passed: fmt, clippy, cargo test, smoke tests"
}

# Creates .venv with moto's S3 server, which the sync crate's S3 tests start on a loopback
# port (sync/tests/s3_moto.rs); they fail when it is missing.
moto_venv() {
    python3 -m venv .venv
    .venv/bin/pip install -q "moto[server]==5.2.*"
}

section() {
    printf '\n=== %s\n' "$*"
}

# Starts the gateway on a free loopback port, runs the smoke tests against it, stops it.
smoke() {
    local bin=$1 port
    port=$(free_port)
    section "smoke tests (gateway on 127.0.0.1:$port)"
    MIRROR_GATEWAY__SERVER__LISTEN="[\"127.0.0.1:$port\"]" \
        "$bin" run -c conf/gateway.toml >"$work/gateway.log" 2>&1 &
    gateway_pid=$!
    if ! wait_ready "$port" || ! scripts/smoke-test.sh "http://127.0.0.1:$port"; then
        echo "--- last 40 lines of the gateway's output:"
        tail -n 40 "$work/gateway.log"
        return 1
    fi
    stop_gateway
}

# Waits up to 30 s until the gateway returns any HTTP response; fails at once if it exits.
wait_ready() {
    local port=$1 code
    for _ in $(seq 60); do
        if ! kill -0 "$gateway_pid" 2>/dev/null; then
            echo "test.sh: the gateway exited before it responded on port $port; see its output below" >&2
            return 1
        fi
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/" || true)
        [[ "$code" != 000 ]] && return 0
        sleep 0.5
    done
    echo "test.sh: timed out after 30 s waiting for the gateway to respond on port $port" >&2
    return 1
}

# Stops the gateway by PID: SIGTERM (graceful), then SIGKILL after 15 s.
stop_gateway() {
    [[ -n "$gateway_pid" ]] || return 0
    if kill -0 "$gateway_pid" 2>/dev/null; then
        kill -TERM "$gateway_pid" 2>/dev/null || true
        for _ in $(seq 30); do
            kill -0 "$gateway_pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "$gateway_pid" 2>/dev/null || true
    fi
    wait "$gateway_pid" 2>/dev/null || true
    gateway_pid=""
}

cleanup() {
    stop_gateway
    rm -rf "$work"
}

main "$@"
