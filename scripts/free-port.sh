# shellcheck shell=bash
# Defines `free_port` for the scripts that source this file.
#
# free_port prints a loopback TCP port that nothing listens on (random, at most 50 tries). The
# ports come from below Linux's usual ephemeral range (32768 and up), so that no outgoing
# connection of the caller uses one.
free_port() {
    local port
    for _ in $(seq 50); do
        port=$((10000 + RANDOM % 22000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    echo "${0##*/}: found no free loopback port in 50 tries" >&2
    return 1
}
