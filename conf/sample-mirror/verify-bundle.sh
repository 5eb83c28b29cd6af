#!/usr/bin/env bash
# Verifies a detached signature over a mirror bundle.
#
#   verify-bundle.sh BUNDLE SIGNATURE [PUBKEY]
#
# SIGNATURE is cosign style: base64 of the DER ECDSA P-256 signature over the SHA-256 of
# BUNDLE. PUBKEY defaults to the sample test key next to this script. Uses cosign when it is
# installed (offline: no transparency log), else openssl; VERIFY_WITH=openssl|cosign forces one.
# Prints PASS or FAIL with the reason; exits 0 when the signature is valid, 1 otherwise.
# NOTE: the cosign branch has been checked only for its arguments: cosign is not a Debian
# bookworm package, so the test machines verify with openssl.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

if [[ $# -lt 2 || $# -gt 3 ]]; then
    fail "usage: $(basename "$0") BUNDLE SIGNATURE [PUBKEY]"
fi
bundle=$1
signature=$2
pubkey=${3:-$here/signing-key.pub}
for file in "$bundle" "$signature" "$pubkey"; do
    [[ -f "$file" && -r "$file" ]] || fail "'$file' is missing or unreadable"
done

tool=${VERIFY_WITH:-}
if [[ -z "$tool" ]]; then
    if command -v cosign >/dev/null; then tool=cosign; else tool=openssl; fi
fi

case "$tool" in
    cosign)
        command -v cosign >/dev/null || fail "VERIFY_WITH=cosign but cosign is not on PATH"
        if output=$(cosign verify-blob --key "$pubkey" --signature "$signature" \
            --insecure-ignore-tlog=true "$bundle" 2>&1); then
            echo "PASS: $bundle matches $signature (cosign, key $pubkey)"
            exit 0
        fi
        fail "$bundle does not match $signature (cosign, key $pubkey): $output"
        ;;
    openssl)
        command -v openssl >/dev/null || fail "openssl is not on PATH; install it (scripts/setup-debian.sh)"
        der=$(mktemp)
        trap 'rm -f "$der"' EXIT
        base64 -d "$signature" >"$der" 2>/dev/null || fail "$signature is not base64 text"
        if output=$(openssl dgst -sha256 -verify "$pubkey" -signature "$der" "$bundle" 2>&1); then
            echo "PASS: $bundle matches $signature (openssl, key $pubkey)"
            exit 0
        fi
        fail "$bundle does not match $signature (openssl, key $pubkey): ${output%%$'\n'*}"
        ;;
    *)
        fail "VERIFY_WITH must be 'openssl' or 'cosign', not '$tool'"
        ;;
esac
