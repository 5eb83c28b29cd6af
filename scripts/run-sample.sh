#!/usr/bin/env bash
# Builds mirror-gateway and runs it in the foreground on the sample mirror data:
# primary domain on Host 127.0.0.1 (user mirror, password mirror-pass), community domain on
# Host localhost without credentials. Listens on 127.0.0.1:8080 (conf/gateway.toml), or on
# 127.0.0.1:$PORT when PORT is set. Stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${PORT:-}" ]]; then
    [[ "$PORT" =~ ^[0-9]+$ && "$PORT" -ge 1 && "$PORT" -le 65535 ]] || {
        echo "run-sample: PORT must be a TCP port number (1-65535), not '$PORT'" >&2
        exit 1
    }
    export MIRROR_GATEWAY__SERVER__LISTEN="[\"127.0.0.1:$PORT\"]"
fi

scripts/setup-debian.sh
conf/sample-mirror/generate.sh
cargo build --release --bin mirror-gateway

base="http://127.0.0.1:${PORT:-8080}"
echo "mirror-gateway: serving the sample mirror on $base"
echo "  try: curl -u mirror:mirror-pass $base/concelier/exports/index.json"
echo "  smoke tests (another terminal): scripts/smoke-test.sh $base"
exec "${CARGO_TARGET_DIR:-target}/release/mirror-gateway" run -c conf/gateway.toml
