#!/usr/bin/env bash
# Installs the Debian packages that building, running and testing mirror-gateway need,
# skipping those already installed. Runs as root, or through sudo otherwise. Idempotent.
#
#   scripts/setup-debian.sh           build, run and test
#   scripts/setup-debian.sh --bench   also nginx and varnish (bench/compare.sh), and rclone and
#                                     awscli in .venv-bench (bench/sync-compare.sh)
# The Rust toolchain (cargo with rustfmt and clippy) is not a Debian package here: it must
# already be on PATH.
set -euo pipefail

# redis-server: plugins/tests/quota_redis.rs and bench/quota.sh start their own on a free
# port; on a systemd host Debian also starts its service on 6379, which they do not use.
# python3-venv: scripts/test.sh installs moto (the S3 server of the sync tests) into .venv.
# chromium: tests/status_page.rs loads the admin status page in headless Chromium.
# haproxy: tests/proxy_protocol.rs starts its own on a free port to check the documented
# backend; Debian's own service has no listener in its default configuration.
# systemd: tests/deploy_units.rs checks deploy/systemd/ with systemd-analyze.
PACKAGES=(cmake pkg-config build-essential curl jq openssl apache2-utils wrk redis-server python3-venv
    chromium haproxy systemd)
# nginx and varnish are only for bench/compare.sh; on a systemd host Debian also starts their
# services (ports 80 and 6081): `systemctl disable --now nginx varnish` if they are not wanted.
# rclone and awscli are only for bench/sync-compare.sh, which compares them with our sync task.
if [[ ${1:-} == --bench ]]; then
    PACKAGES+=(nginx varnish rclone)
fi
readonly PACKAGES

missing=()
for package in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]] || missing+=("$package")
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "setup-debian: all packages present (${PACKAGES[*]})"
else
    command -v apt-get >/dev/null || {
        echo "setup-debian: apt-get not found; install these packages by hand: ${missing[*]}" >&2
        exit 1
    }
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || {
            echo "setup-debian: not root and no sudo; as root run: apt-get install ${missing[*]}" >&2
            exit 1
        }
        sudo=(sudo)
    fi
    echo "setup-debian: installing ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends "${missing[@]}"
fi

for tool in cargo rustfmt cargo-clippy; do
    command -v "$tool" >/dev/null || echo "setup-debian: warning: '$tool' not on PATH (Rust toolchain)" >&2
done

# awscli comes from PyPI (its 1.x line, which pins one botocore release) into a virtual
# environment of its own, so that its botocore does not clash with moto's in .venv.
if [[ ${1:-} == --bench ]]; then
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    if [[ ! -x "$root/.venv-bench/bin/aws" ]]; then
        echo "setup-debian: installing awscli 1.x into $root/.venv-bench"
        python3 -m venv "$root/.venv-bench"
        "$root/.venv-bench/bin/pip" install -q "awscli==1.*"
    fi
fi
