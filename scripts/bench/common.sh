#!/usr/bin/env bash
# Helpers shared by the benchmark scripts (sourced, not run). The caller sets `prog` (the name
# its messages carry) before sourcing.

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "$prog: error: $*" >&2; exit 1; }
log() { echo "$prog: $*" >&2; }

stop_pid() {
    local pid="$1"
    [[ -n "$pid" ]] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
as_root() { if [[ "$(id -u)" -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
find_nginx() { command -v nginx 2>/dev/null || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; } || true; }

# install_tools [EXTRA_PACKAGE_CHECKS...]: installs wrk, nginx, curl, taskset (and python3 with
# `python3`) with apt-get when missing, without letting the package start the system nginx.
install_tools() {
    local missing=() made_policy="" install_rc=0
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    [[ -n "$(find_nginx)" ]] || missing+=(nginx-light)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
    if [[ " $* " == *" python3 "* ]]; then command -v python3 >/dev/null 2>&1 || missing+=(python3); fi
    [[ ${#missing[@]} -gt 0 ]] || return 0
    log "installing ${missing[*]} with apt-get"
    # policy-rc.d exit 101 = "action forbidden" (only if the machine has no policy of its own).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d'
        made_policy=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 \
        && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || install_rc=$?
    [[ -n "$made_policy" ]] && as_root rm -f /usr/sbin/policy-rc.d
    [[ "$install_rc" -eq 0 ]] || die "apt-get install ${missing[*]} failed"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Server ports come from below the kernel's ephemeral range, so that no outgoing connection
# (wrk's, a proxy's upstream ones, idle clients) can take one between our check and the bind.
read -r eph_lo _ < /proc/sys/net/ipv4/ip_local_port_range || eph_lo=32768
taken_ports=" "
# free_port VAR: sets VAR to a free loopback port not handed out before.
free_port() {
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((10000 + (RANDOM * 32768 + RANDOM) % (eph_lo - 10000)))
        [[ "$taken_ports" == *" $p "* ]] && continue
        if ! port_in_use "$p" && ! ss -Htan "sport = :$p" 2>/dev/null | grep -q .; then
            taken_ports+="$p "
            printf -v "$1" '%s' "$p"; return 0
        fi
    done
    die "no free port found"
}
# wait_until DEADLINE_SECS PID DESCRIPTION CMD...: polls CMD until it succeeds.
wait_until() {
    local secs="$1" pid="$2" what="$3"; shift 3
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null || die "$what exited before becoming ready"
        ((SECONDS < deadline)) || die "$what not ready after ${secs}s"
        sleep 0.05
    done
}
http_ok() { [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$1")" == 200 ]]; }
lua_quote() { local s="$1"; s="${s//\\/\\\\}"; s="${s//\"/\\\"}"; printf '"%s"' "$s"; }
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") f = 1; else if (u == "ms") f = 1e3; else if (u == "s") f = 1e6;
        else if (u == "m") f = 6e7; else if (u == "h") f = 3.6e9; else { print "NaN"; exit 1 }
        printf "%.1f", n * f
    }'
}
fmt_us() { awk -v u="$1" 'BEGIN { if (u >= 1000) printf "%.2f ms", u / 1000; else printf "%.0f us", u }'; }
json_str() { local s="$1"; s="${s//\\/\\\\}"; s="${s//\"/\\\"}"; printf '"%s"' "$s"; }
