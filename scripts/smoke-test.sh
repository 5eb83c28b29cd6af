#!/usr/bin/env bash
# Runs the operator smoke tests against a running gateway that serves the sample mirror
# (conf/gateway.toml with conf/sample-mirror/data):
#
#   scripts/smoke-test.sh [BASE_URL]        default http://127.0.0.1:${PORT:-8080}
#
# Each step shows the command an operator would type, its output, then PASS or FAIL.
# Exits 0 when every step passes, 1 otherwise. Environment: SMOKE_USER / SMOKE_PASSWORD
# (the primary domain's credentials), COMMUNITY_HOST (Host header of the public domain),
# EXCITITOR_DOMAIN (whose exports step 3 lists), PUBKEY (key for step 4).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
base=${1:-http://127.0.0.1:${PORT:-8080}}
base=${base%/}
user=${SMOKE_USER:-mirror}
password=${SMOKE_PASSWORD:-mirror-pass}
community_host=${COMMUNITY_HOST:-localhost}
excititor_domain=${EXCITITOR_DOMAIN:-primary}
pubkey=${PUBKEY:-$root/conf/sample-mirror/signing-key.pub}
readonly CURL=(curl --max-time 10)

for tool in curl jq; do
    command -v "$tool" >/dev/null || {
        echo "smoke-test: '$tool' not found on PATH; install it with scripts/setup-debian.sh" >&2
        exit 1
    }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Each step returns non-zero on failure; `if` disables errexit inside, so steps check explicitly.

step_index_keys() {
    show "curl -fsS -u $user:$password $base/concelier/exports/index.json | jq 'keys'"
    local keys
    keys=$("${CURL[@]}" -fsS -u "$user:$password" "$base/concelier/exports/index.json" | jq 'keys') ||
        return 1
    echo "$keys"
    expect_contains "$keys" '"domains"' "index.json has a 'domains' key"
}

step_manifest_head() {
    show "curl -fsSI -u $user:$password $base/concelier/exports/mirror/primary/manifest.json"
    local headers
    headers=$("${CURL[@]}" -fsSI -u "$user:$password" \
        "$base/concelier/exports/mirror/primary/manifest.json" | tr -d '\r') || return 1
    echo "$headers" | grep -iE '^(HTTP/|x-cache-status:|cache-control:|content-length:)'
    expect_match "$headers" '^HTTP/[0-9.]+ 200' "status 200" &&
        expect_match "$headers" '^[Xx]-[Cc]ache-[Ss]tatus: *[A-Z]+' "X-Cache-Status header present"
}

step_excititor_exports() {
    local url="$base/excititor/mirror/$excititor_domain/index.json"
    show "curl -fsS -u $user:$password $url | jq -r '.exports[].exportKey' | sort -u"
    local keys
    keys=$("${CURL[@]}" -fsS -u "$user:$password" "$url" | jq -r '.exports[].exportKey' | sort -u) ||
        return 1
    echo "$keys"
    [[ -n "$keys" ]] || why "at least one exportKey"
}

step_bundle_signature() {
    local url="$base/concelier/exports/mirror/primary"
    show "curl -fsS -u $user:$password -O $url/bundle.json -O $url/bundle.json.jws"
    "${CURL[@]}" -fsS -u "$user:$password" -o "$work/bundle.json" "$url/bundle.json" \
        -o "$work/bundle.json.jws" "$url/bundle.json.jws" || return 1
    show "conf/sample-mirror/verify-bundle.sh bundle.json bundle.json.jws $pubkey"
    "$root/conf/sample-mirror/verify-bundle.sh" "$work/bundle.json" "$work/bundle.json.jws" "$pubkey" ||
        return 1
    show "curl -fsS -u $user:$password $url/manifest.json | jq -r .bundle.sha256; sha256sum bundle.json"
    local want got
    want=$("${CURL[@]}" -fsS -u "$user:$password" "$url/manifest.json" | jq -r .bundle.sha256) ||
        return 1
    got=$(sha256sum "$work/bundle.json" | cut -d' ' -f1)
    echo "manifest: $want"
    echo "bundle:   $got"
    [[ "$want" == "$got" ]] || why "the bundle's sha256 to equal the manifest's"
}

step_unauthenticated() {
    local url="$base/concelier/exports/index.json" status headers
    show "curl -sS -o /dev/null -D - $url"
    headers=$("${CURL[@]}" -sS -o /dev/null -D - "$url" | tr -d '\r') || return 1
    status=$(echo "$headers" | awk 'NR == 1 { print $2 }')
    echo "$headers" | grep -iE '^(HTTP/|www-authenticate:)'
    [[ "$status" == 401 ]] || why "401 without credentials, got '$status'" || return 1
    expect_match "$headers" '^[Ww][Ww][Ww]-[Aa]uthenticate: *Basic' "WWW-Authenticate: Basic" ||
        return 1
    show "curl -sS -o /dev/null -w '%{http_code}' -u $user:wrong-password $url"
    status=$("${CURL[@]}" -sS -o /dev/null -w '%{http_code}' -u "$user:wrong-password" "$url") ||
        return 1
    echo "$status"
    [[ "$status" == 401 ]] || why "401 for a wrong password, got '$status'"
}

step_community() {
    show "curl -fsS -H 'Host: $community_host' $base/concelier/exports/index.json | jq 'keys'"
    local keys
    keys=$("${CURL[@]}" -fsS -H "Host: $community_host" "$base/concelier/exports/index.json" |
        jq 'keys') || return 1
    echo "$keys"
    expect_contains "$keys" '"domains"' "index.json has a 'domains' key"
}

show() { printf '$ %s\n' "$*"; }

# Prints what a step expected and did not get; returns 1.
why() {
    echo "  expected: $*"
    return 1
}

expect_contains() {
    [[ "$1" == *"$2"* ]] || why "$3"
}

expect_match() {
    grep -qE "$2" <<<"$1" || why "$3"
}

steps=(
    "step_index_keys|1. index.json with credentials lists its keys"
    "step_manifest_head|2. HEAD primary manifest: 200 with X-Cache-Status"
    "step_excititor_exports|3. Excititor $excititor_domain exports[].exportKey"
    "step_bundle_signature|4. primary bundle.json verifies against bundle.json.jws"
    "step_unauthenticated|5. primary without or with wrong credentials: 401"
    "step_community|6. community domain (Host: $community_host) without credentials"
)
passed=0
failed=0
echo "smoke-test against $base"
for entry in "${steps[@]}"; do
    echo
    echo "== ${entry#*|}"
    if "${entry%%|*}"; then
        echo "PASS: ${entry#*|}"
        passed=$((passed + 1))
    else
        echo "FAIL: ${entry#*|}"
        failed=$((failed + 1))
    fi
done
echo
if [[ $failed -eq 0 ]]; then
    echo "smoke-test: all $passed steps passed"
else
    echo "smoke-test: $failed of $((passed + failed)) steps FAILED"
    exit 1
fi
