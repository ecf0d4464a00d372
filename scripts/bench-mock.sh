#!/usr/bin/env bash
# bench-mock.sh: is `gantry mock --speedup 0` ever the bottleneck of a proxy benchmark?
#
# Measures non-streaming throughput (req/s) and p50 latency of
#   POST /v1/chat/completions  {"model":"mock-model","messages":[...],"max_tokens":16}
# with wrk against two targets, in the same run and on the same core budget:
#   mock:  target/release/gantry mock --engines 1 --workers 1 --speedup 0
#   nginx: one worker returning a canned copy of a real mock response (`return 200 '<body>'`)
# The server under test is pinned to CPU 1 (taskset -c 1), wrk (one thread) to CPU 0.
# For each target: 2 s warm-up, a measured run at N connections (req/s, p50), and a run
# at 1 connection (p50, i.e. unloaded latency). Target: mock req/s >= 0.5 x nginx req/s.
#
# Usage: scripts/bench-mock.sh [--duration SECS] [--connections N] [--out DIR] [--driver D] [--no-build]
#   --duration SECS    length of each measured wrk run (default 10)
#   --connections N    connections of the throughput run (default 32)
#   --out DIR          where results.md, results.json and raw wrk output go
#                      (default bench-results/mock-vs-nginx, relative to the repo root)
#   --driver D         the mock's I/O driver: legacy (epoll, the mock's default), io_uring or auto
#   --no-build         use the existing target/release/gantry instead of running cargo build
#
# Needs at least 2 CPUs. Installs wrk and nginx-light with apt-get when missing (as root or
# via sudo), and builds gantry with `cargo build --release -p gantry`. nginx runs with a
# private config, pid file, logs and temp paths under a temp dir; the system nginx config
# and service are never touched. Every process it starts is stopped by PID on exit.
set -euo pipefail
prog=bench-mock
# shellcheck source=scripts/bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench/common.sh"

duration=10
connections=32
out=""
build=1
warmup=2

driver=legacy

while [[ $# -gt 0 ]]; do
    case "$1" in
        --duration) duration="${2:?--duration needs a value}"; shift 2 ;;
        --duration=*) duration="${1#*=}"; shift ;;
        --connections) connections="${2:?--connections needs a value}"; shift 2 ;;
        --connections=*) connections="${1#*=}"; shift ;;
        --out) out="${2:?--out needs a value}"; shift 2 ;;
        --out=*) out="${1#*=}"; shift ;;
        --no-build) build=""; shift ;;
        --driver) driver="${2:?--driver needs a value}"; shift 2 ;;
        --driver=*) driver="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ "$duration" =~ ^[1-9][0-9]*$ ]] || die "--duration must be a positive integer (seconds)"
[[ "$connections" =~ ^[1-9][0-9]*$ ]] || die "--connections must be a positive integer"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${out:-bench-results/mock-vs-nginx}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

[[ "$(nproc)" -ge 2 ]] || die "needs at least 2 CPUs (server on CPU 1, wrk on CPU 0); nproc=$(nproc)"

# ---------------------------------------------------------------------------------------
# Processes we start, stopped by PID on exit.
tmp="$(mktemp -d "${TMPDIR:-/tmp}/bench-mock.XXXXXX")"
mock_pid=""
nginx_pid=""
nginx_master_pid() {
    # The master's PID as nginx recorded it, falling back to the PID we started.
    local p=""
    [[ -s "$tmp/nginx/nginx.pid" ]] && p="$(tr -dc '0-9' < "$tmp/nginx/nginx.pid")"
    echo "${p:-$nginx_pid}"
}
cleanup() {
    local rc=$?
    stop_pid "$mock_pid"
    if [[ -n "$nginx_pid" ]]; then
        local master
        master="$(nginx_master_pid)"
        stop_pid "$master"
        [[ "$master" != "$nginx_pid" ]] && stop_pid "$nginx_pid"
    fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------
# Tools.
install_tools
nginx_bin="$(find_nginx)"
[[ -n "$nginx_bin" ]] || die "nginx not found after install"

if [[ -n "$build" ]]; then
    # cargo rebuilds only what changed, so the binary always matches the checkout.
    command -v cargo >/dev/null 2>&1 || die "cargo not found (or pass --no-build with a built target/release/gantry)"
    log "cargo build --release -p gantry"
    cargo build --release -p gantry >&2 || die "cargo build --release -p gantry failed"
fi
gantry="${CARGO_TARGET_DIR:-$root/target}/release/gantry"
[[ -x "$gantry" ]] || die "$gantry not found (cargo build --release -p gantry)"

# ---------------------------------------------------------------------------------------
# Helpers (the shared ones are in scripts/bench/common.sh).
request_body='{"model":"mock-model","messages":[{"role":"user","content":"Hello!"}],"max_tokens":16}'
# POST the benchmark request; body to $2, headers to $3; prints the status code.
post_once() {
    curl -sS --max-time 10 -X POST -H 'Content-Type: application/json' \
        --data-binary "$request_body" -o "$2" -D "$3" -w '%{http_code}' "$1"
}

cat > "$tmp/post.lua" <<EOF
wrk.method = "POST"
wrk.body = $(lua_quote "$request_body")
wrk.headers["Content-Type"] = "application/json"
EOF

# to_us VALUE: wrk latency ("812.00us", "1.23ms", "2.01s", "1.50m") -> microseconds.

# run_wrk NAME URL CONNS SECS: runs wrk pinned to CPU 0; raw output to $out/wrk-NAME.txt.
# Sets W_RPS, W_P50_US, W_REQS, W_SOCKERR.
run_wrk() {
    local name="$1" url="$2" conns="$3" secs="$4" f="$out/wrk-$1.txt"
    taskset -c 0 wrk -t1 -c"$conns" -d"${secs}s" --latency -s "$tmp/post.lua" "$url" > "$f" 2>&1 \
        || { cat "$f" >&2; die "wrk failed ($name)"; }
    if grep -q 'Non-2xx or 3xx responses' "$f"; then
        cat "$f" >&2
        die "wrk got non-2xx/3xx responses from $name ($(grep 'Non-2xx or 3xx' "$f" | tr -s ' '))"
    fi
    W_RPS="$(awk '/^Requests\/sec:/ { print $2 }' "$f")"
    local p50
    p50="$(awk '/Latency Distribution/ { d = 1; next } d && $1 == "50%" { print $2; exit }' "$f")"
    W_REQS="$(awk '/requests in/ { print $1; exit }' "$f")"
    [[ -n "$W_RPS" && -n "$p50" && -n "$W_REQS" ]] || { cat "$f" >&2; die "could not parse wrk output ($name)"; }
    [[ "$W_REQS" -gt 0 ]] || { cat "$f" >&2; die "wrk completed no requests ($name)"; }
    W_P50_US="$(to_us "$p50")"
    # "Socket errors: connect 0, read 0, write 0, timeout 0" (absent when all are zero).
    W_SOCKERR="$(awk '/Socket errors:/ { gsub(",", ""); print $4 + $6 + $8 + $10; f = 1 } END { if (!f) print 0 }' "$f")"
    if [[ "$W_SOCKERR" -gt 0 ]]; then
        log "WARNING: $name: $(grep 'Socket errors' "$f" | tr -s ' ')"
    fi
    log "  $name: $W_RPS req/s, p50 $(fmt_us "$W_P50_US"), $W_REQS requests, socket errors $W_SOCKERR"
}

# bench_target NAME URL: warm-up, N-connection run, 1-connection run. Sets R_* variables.
bench_target() {
    local name="$1" url="$2"
    log "$name: warm-up ${warmup}s at $connections connections"
    taskset -c 0 wrk -t1 -c"$connections" -d"${warmup}s" -s "$tmp/post.lua" "$url" > "$out/wrk-$name-warmup.txt" 2>&1 \
        || { cat "$out/wrk-$name-warmup.txt" >&2; die "wrk warm-up failed ($name)"; }
    grep -q 'Non-2xx or 3xx responses' "$out/wrk-$name-warmup.txt" \
        && { cat "$out/wrk-$name-warmup.txt" >&2; die "wrk got non-2xx/3xx responses from $name during warm-up"; }
    log "$name: ${duration}s at $connections connections, then ${duration}s at 1 connection"
    run_wrk "$name-c$connections" "$url" "$connections" "$duration"
    printf -v "R_${name}_rps" '%s' "$W_RPS"
    printf -v "R_${name}_p50_us" '%s' "$W_P50_US"
    printf -v "R_${name}_sockerr" '%s' "$W_SOCKERR"
    run_wrk "$name-c1" "$url" 1 "$duration"
    printf -v "R_${name}_rps_c1" '%s' "$W_RPS"
    printf -v "R_${name}_p50_c1_us" '%s' "$W_P50_US"
    printf -v "R_${name}_sockerr_c1" '%s' "$W_SOCKERR"
}

# ---------------------------------------------------------------------------------------
# 1. The mock, on CPU 1.
free_port mock_port
mock_cmd=("$gantry" mock --port "$mock_port" --engines 1 --workers 1 --speedup 0 --driver "$driver")
mock_cmd_str="taskset -c 1 $(printf '%q ' "${mock_cmd[@]}")"
mock_cmd_str="${mock_cmd_str% }"
mock_cmd_str="${mock_cmd_str//$root\//}"
log "starting mock: $mock_cmd_str"
taskset -c 1 "${mock_cmd[@]}" > "$out/mock.log" 2>&1 &
mock_pid=$!
wait_until 30 "$mock_pid" "gantry mock" http_ok "http://127.0.0.1:$mock_port/health"
mock_url="http://127.0.0.1:$mock_port/v1/chat/completions"

code="$(post_once "$mock_url" "$out/mock-response.json" "$out/mock-response.headers")" || die "POST to the mock failed"
[[ "$code" == 200 ]] || { cat "$out/mock-response.json" >&2; die "mock answered $code to the benchmark request"; }
grep -qi '^content-type: *application/json' "$out/mock-response.headers" || log "WARNING: mock response is not application/json"
mock_body_bytes="$(wc -c < "$out/mock-response.json")"
log "mock response: $mock_body_bytes body bytes"

# ---------------------------------------------------------------------------------------
# 2. nginx returning the captured body, on CPU 1, private config and paths.
free_port nginx_port
mkdir -p "$tmp/nginx/logs" "$tmp/nginx/temp"
# nginx single-quoted string: escape \ and '; `$` would start a variable, so it goes
# through $dollar (geo below). JSON from the mock normally contains none of these.
canned="$(cat "$out/mock-response.json"; echo x)"
canned="${canned%x}"
canned="${canned//\\/\\\\}"
canned="${canned//\'/\\\'}"
dollar_geo=""
if [[ "$canned" == *'$'* ]]; then
    canned="${canned//\$/\$\{dollar\}}"
    dollar_geo='geo $dollar { default "$"; }'
fi
cat > "$tmp/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/logs/error.log warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    client_body_temp_path $tmp/nginx/temp/client_body;
    proxy_temp_path $tmp/nginx/temp/proxy;
    fastcgi_temp_path $tmp/nginx/temp/fastcgi;
    uwsgi_temp_path $tmp/nginx/temp/uwsgi;
    scgi_temp_path $tmp/nginx/temp/scgi;
    keepalive_timeout 65s;
    keepalive_requests 100000;
    $dollar_geo
    server {
        listen 127.0.0.1:$nginx_port;
        location = /health {
            return 200;
        }
        location = /v1/chat/completions {
            default_type application/json;
            return 200 '$canned';
        }
    }
}
EOF
cp "$tmp/nginx/nginx.conf" "$out/nginx.conf"
"$nginx_bin" -t -q -p "$tmp/nginx" -e "$tmp/nginx/logs/error.log" -c "$tmp/nginx/nginx.conf" \
    || die "nginx rejected the generated config ($out/nginx.conf)"
log "starting nginx on 127.0.0.1:$nginx_port (CPU 1, 1 worker)"
taskset -c 1 "$nginx_bin" -p "$tmp/nginx" -e "$tmp/nginx/logs/error.log" -c "$tmp/nginx/nginx.conf" \
    > "$out/nginx.log" 2>&1 &
nginx_pid=$!
wait_until 30 "$nginx_pid" "nginx" http_ok "http://127.0.0.1:$nginx_port/health"
wait_until 10 "$nginx_pid" "nginx pid file" test -s "$tmp/nginx/nginx.pid"
nginx_url="http://127.0.0.1:$nginx_port/v1/chat/completions"

code="$(post_once "$nginx_url" "$out/nginx-response.json" "$out/nginx-response.headers")" || die "POST to nginx failed"
[[ "$code" == 200 ]] || die "nginx answered $code to the benchmark request"
cmp -s "$out/mock-response.json" "$out/nginx-response.json" \
    || die "nginx's canned body differs from the captured mock body (see $out/*-response.json)"
grep -qi '^content-type: *application/json' "$out/nginx-response.headers" || die "nginx response is not application/json"
nginx_body_bytes="$(wc -c < "$out/nginx-response.json")"
mock_header_bytes="$(wc -c < "$out/mock-response.headers")"
nginx_header_bytes="$(wc -c < "$out/nginx-response.headers")"

# ---------------------------------------------------------------------------------------
# 3. Measure. The mock first, then nginx; each server is idle while the other is measured.
bench_target mock "$mock_url"
bench_target nginx "$nginx_url"

ratio="$(awk -v m="$R_mock_rps" -v n="$R_nginx_rps" 'BEGIN { printf "%.3f", m / n }')"
meets="$(awk -v r="$ratio" 'BEGIN { print (r >= 0.5) ? "yes" : "no" }')"

# ---------------------------------------------------------------------------------------
# 4. Report.
cpu_model="$(lscpu 2>/dev/null | awk -F: '/^Model name/ { sub(/^[ \t]+/, "", $2); print $2; exit }')"
cpu_model="${cpu_model:-unknown}"
ncpu="$(nproc)"
kernel="$(uname -r)"
date_utc="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
dirty=""
[[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]] && dirty=" (dirty tree)"
wrk_version="$(wrk -v 2>&1 | awk 'NR == 1 { print $1, $2; exit }' || true)"
nginx_version="$("$nginx_bin" -v 2>&1 | sed 's/^nginx version: //' || true)"

table="$(
    printf '| target | req/s @ %s conns | p50 @ %s conns | p50 @ 1 conn | socket errors |\n' "$connections" "$connections"
    printf '|---|---:|---:|---:|---:|\n'
    for t in mock nginx; do
        rps="R_${t}_rps"; p50="R_${t}_p50_us"; p1="R_${t}_p50_c1_us"; se="R_${t}_sockerr"; se1="R_${t}_sockerr_c1"
        printf '| %s | %.0f | %s | %s | %s |\n' "$t" "${!rps}" "$(fmt_us "${!p50}")" "$(fmt_us "${!p1}")" "$((${!se} + ${!se1}))"
    done
)"

{
    echo "# gantry mock vs nginx (non-streaming, --speedup 0)"
    echo
    echo "$table"
    echo
    echo "**mock / nginx req/s = $ratio** (target >= 0.5: $meets)"
    echo
    echo "- date: $date_utc"
    echo "- gantry commit: $commit$dirty"
    echo "- machine: $cpu_model, nproc $ncpu, kernel $kernel"
    echo "- core budget: server on CPU 1 (taskset -c 1), wrk -t1 on CPU 0 (taskset -c 0)"
    echo "- wrk: $wrk_version; ${warmup}s warm-up, then ${duration}s at $connections connections and ${duration}s at 1 connection"
    echo "- nginx: $nginx_version; worker_processes 1, access_log off, keepalive_requests 100000, \`return 200\` of the captured mock body"
    echo "- mock: \`$mock_cmd_str\`"
    echo "- request: \`POST /v1/chat/completions $request_body\`"
    echo "- response body: mock $mock_body_bytes B, nginx $nginx_body_bytes B (identical); headers: mock $mock_header_bytes B, nginx $nginx_header_bytes B"
} > "$out/results.md"

target_json() {
    local t="$1" rps="R_${1}_rps" p50="R_${1}_p50_us" p1="R_${1}_p50_c1_us" rps1="R_${1}_rps_c1" se="R_${1}_sockerr" se1="R_${1}_sockerr_c1"
    printf '{"req_per_sec": %s, "p50_us": %s, "req_per_sec_1conn": %s, "p50_us_1conn": %s, "socket_errors": %s, "socket_errors_1conn": %s}' \
        "${!rps}" "${!p50}" "${!rps1}" "${!p1}" "${!se}" "${!se1}"
}
cat > "$out/results.json" <<EOF
{
  "benchmark": "mock-vs-nginx",
  "date": $(json_str "$date_utc"),
  "gantry_commit": $(json_str "$commit"),
  "dirty_tree": $([[ -n "$dirty" ]] && echo true || echo false),
  "machine": {"nproc": $ncpu, "cpu_model": $(json_str "$cpu_model"), "kernel": $(json_str "$kernel")},
  "wrk_version": $(json_str "$wrk_version"),
  "nginx_version": $(json_str "$nginx_version"),
  "mock_command": $(json_str "$mock_cmd_str"),
  "request_body": $(json_str "$request_body"),
  "duration_s": $duration,
  "warmup_s": $warmup,
  "connections": $connections,
  "response_body_bytes": {"mock": $mock_body_bytes, "nginx": $nginx_body_bytes},
  "response_header_bytes": {"mock": $mock_header_bytes, "nginx": $nginx_header_bytes},
  "mock": $(target_json mock),
  "nginx": $(target_json nginx),
  "ratio_mock_over_nginx_req_per_sec": $ratio,
  "meets_target_0_5": $([[ "$meets" == yes ]] && echo true || echo false)
}
EOF

echo
cat "$out/results.md"
echo
echo "results: $out/results.md, $out/results.json (raw wrk output: $out/wrk-*.txt)"
