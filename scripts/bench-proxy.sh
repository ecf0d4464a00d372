#!/usr/bin/env bash
# bench-proxy.sh: gantry serve vs nginx as a reverse proxy, in one go on the same machine.
#
# Backend: one nginx (1 worker) with two server blocks, both answering /health with 200:
#   json: POST /v1/chat/completions -> `return 200` of a canned ~650 B vLLM chat completion
#   sse:  POST /v1/chat/completions -> `return 200` of 256 SSE chunk events + `data: [DONE]`
#         (text/event-stream), so both proxies forward the same POST to it.
# Under test, each with one worker: an nginx proxy (upstream keepalive 64, HTTP/1.1,
# proxy_buffering off for SSE) and `gantry serve --engine <backend> --workers 1` (one gantry
# for the json backend, one for the sse backend).
# Pinning: backend nginx and the proxy under test share CPU 1 (taskset -c 1); wrk -t1 and the
# idle-connection client run on CPU 0. Passes, each with a 2 s warm-up at 32 connections:
#   wrk at 32 and at 1 connection against direct (backend), nginx-proxy and gantry (json);
#   the same against the sse backend through both proxies (and direct, for reference);
#   10,000 idle keep-alive client connections held open to each proxy (RSS delta).
# Targets: gantry req/s @32 >= 1.0 x nginx-proxy's; gantry's added p50 @1 (p50 through the
# proxy - p50 direct) <= nginx's; gantry SSE events/s @32 >= nginx's. A missed target is
# reported, not an error; broken runs are (non-2xx, socket errors > 0.1%, a process dying).
#
# Usage: scripts/bench-proxy.sh [--duration SECS] [--out DIR] [--build] [--skip-idle]
#                               [--idle-conns N] [--driver D]
#   --duration SECS    length of each measured wrk run (default 10)
#   --out DIR          where results.md, results.json and raw wrk output go
#                      (default bench-results/proxy-vs-nginx, relative to the repo root)
#   --build            run `cargo build --release -p gantry` first (default: use the
#                      existing target/release/gantry as it is)
#   --skip-idle        skip the idle-connection memory pass
#   --idle-conns N     idle client connections of that pass (default 10000)
#   --driver D         gantry's I/O driver (auto, io_uring, legacy; default: gantry's default)
#
# Needs at least 2 CPUs and python3. Installs wrk and nginx-light with apt-get when missing
# (as root or via sudo) without starting the system nginx service. Every nginx runs with a
# private config, pid file, logs and temp paths under a temp dir on free loopback ports; the
# system nginx config and service are never touched. Every process it starts is stopped by
# PID on exit.
set -euo pipefail
prog=bench-proxy
# shellcheck source=scripts/bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench/common.sh"

duration=10
out=""
build=""
skip_idle=""
idle_conns=10000
driver=""
warmup=2
sse_events=256


while [[ $# -gt 0 ]]; do
    case "$1" in
        --duration) duration="${2:?--duration needs a value}"; shift 2 ;;
        --duration=*) duration="${1#*=}"; shift ;;
        --out) out="${2:?--out needs a value}"; shift 2 ;;
        --out=*) out="${1#*=}"; shift ;;
        --build) build=1; shift ;;
        --no-build) build=""; shift ;;
        --skip-idle) skip_idle=1; shift ;;
        --idle-conns) idle_conns="${2:?--idle-conns needs a value}"; shift 2 ;;
        --idle-conns=*) idle_conns="${1#*=}"; shift ;;
        --driver) driver="${2:?--driver needs a value}"; shift 2 ;;
        --driver=*) driver="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ "$duration" =~ ^[1-9][0-9]*$ ]] || die "--duration must be a positive integer (seconds)"
[[ "$idle_conns" =~ ^[1-9][0-9]*$ ]] || die "--idle-conns must be a positive integer"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${out:-bench-results/proxy-vs-nginx}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
rm -f "$out"/wrk-*.txt "$out"/results.md "$out"/results.json

[[ "$(nproc)" -ge 2 ]] || die "needs at least 2 CPUs (servers on CPU 1, wrk on CPU 0); nproc=$(nproc)"

# ---------------------------------------------------------------------------------------
# Processes we start, stopped by PID on exit.
tmp="$(mktemp -d "${TMPDIR:-/tmp}/bench-proxy.XXXXXX")"
backend_pid=""
nproxy_pid=""
gantry_pid=""
gantry_sse_pid=""
idle_pid=""
# nginx_master_pid DIR STARTED_PID: the master's PID as nginx recorded it, else the one we started.
nginx_master_pid() {
    local p=""
    [[ -s "$1/nginx.pid" ]] && p="$(tr -dc '0-9' < "$1/nginx.pid")"
    echo "${p:-$2}"
}
stop_nginx() {
    local dir="$1" pid="$2" master
    [[ -n "$pid" ]] || return 0
    master="$(nginx_master_pid "$dir" "$pid")"
    stop_pid "$master"
    [[ "$master" != "$pid" ]] && stop_pid "$pid"
    return 0
}
cleanup() {
    local rc=$?
    stop_pid "$idle_pid"
    stop_pid "$gantry_pid"
    stop_pid "$gantry_sse_pid"
    stop_nginx "$tmp/nproxy" "$nproxy_pid"
    stop_nginx "$tmp/backend" "$backend_pid"
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------
# Tools.
install_tools python3
nginx_bin="$(find_nginx)"
[[ -n "$nginx_bin" ]] || die "nginx not found after install"

if [[ -n "$build" ]]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found"
    log "cargo build --release -p gantry"
    cargo build --release -p gantry >&2 || die "cargo build --release -p gantry failed"
fi
gantry="${CARGO_TARGET_DIR:-$root/target}/release/gantry"
[[ -x "$gantry" ]] || die "$gantry not found (build it, or pass --build)"
idle_py="$root/scripts/bench/idle_conns.py"
[[ -r "$idle_py" ]] || die "$idle_py not found"

# File descriptors: 10k idle connections need > 10k fds in the proxy and in the client.
nofile_note=""
if ! ulimit -n 65536 2>/dev/null; then
    hard="$(ulimit -Hn)"
    [[ "$hard" != unlimited ]] && ulimit -n "$hard" 2>/dev/null || true
    nofile_note="could not raise ulimit -n to 65536 (hard limit $(ulimit -Hn)); using $(ulimit -n)"
    log "$nofile_note"
fi
nofile="$(ulimit -n)"
[[ "$nofile" == unlimited ]] && nofile=1048576
idle_skip_reason=""
if [[ -n "$skip_idle" ]]; then
    idle_skip_reason="--skip-idle"
elif ((nofile < idle_conns + 512)); then
    idle_skip_reason="ulimit -n is $nofile, too low for $idle_conns idle connections"
    log "WARNING: skipping the idle-connection pass: $idle_skip_reason"
fi

# ---------------------------------------------------------------------------------------
# Helpers.
((eph_lo > 11024)) || die "the ephemeral port range starts at $eph_lo; need free ports below it"

# Every process under test must still be alive after each pass.
check_alive() {
    local name pid
    for name in backend nproxy gantry gantry_sse; do
        pid="${name}_pid"; pid="${!pid}"
        [[ -z "$pid" ]] || kill -0 "$pid" 2>/dev/null || die "$name (pid $pid) died; see $out/*.log"
    done
}

request_body='{"model":"mock-model","messages":[{"role":"user","content":"Hello!"}],"max_tokens":16}'
stream_body='{"model":"mock-model","messages":[{"role":"user","content":"Hello!"}],"max_tokens":16,"stream":true}'
# post_once URL BODY BODY_OUT HEADERS_OUT: prints the status code.
post_once() {
    curl -sS --max-time 10 -X POST -H 'Content-Type: application/json' \
        --data-binary "$2" -o "$3" -D "$4" -w '%{http_code}' "$1"
}

for kind in json sse; do
    if [[ "$kind" == json ]]; then b="$request_body"; else b="$stream_body"; fi
    cat > "$tmp/$kind.lua" <<EOF
wrk.method = "POST"
wrk.body = $(lua_quote "$b")
wrk.headers["Content-Type"] = "application/json"
EOF
done

# to_us VALUE: wrk latency ("812.00us", "1.23ms", "2.01s", "1.50m") -> microseconds.

# check_wrk NAME FILE: fails on non-2xx/3xx responses and on socket errors > 0.1% of requests.
# Sets W_REQS, W_SOCKERR.
check_wrk() {
    local name="$1" f="$2"
    if grep -q 'Non-2xx or 3xx responses' "$f"; then
        cat "$f" >&2
        die "wrk got non-2xx/3xx responses from $name ($(grep 'Non-2xx or 3xx' "$f" | tr -s ' '))"
    fi
    W_REQS="$(awk '/requests in/ { print $1; exit }' "$f")"
    [[ -n "$W_REQS" ]] || { cat "$f" >&2; die "could not parse wrk output ($name)"; }
    [[ "$W_REQS" -gt 0 ]] || { cat "$f" >&2; die "wrk completed no requests ($name)"; }
    # "Socket errors: connect 0, read 0, write 0, timeout 0" (absent when all are zero).
    W_SOCKERR="$(awk '/Socket errors:/ { gsub(",", ""); print $4 + $6 + $8 + $10; f = 1 } END { if (!f) print 0 }' "$f")"
    if [[ "$W_SOCKERR" -gt 0 ]]; then
        log "WARNING: $name: $(grep 'Socket errors' "$f" | tr -s ' ') ($W_REQS requests)"
        if ((W_SOCKERR * 1000 > W_REQS)); then
            cat "$f" >&2
            die "$name: socket errors above 0.1% of requests"
        fi
    fi
    check_alive
}

# run_wrk NAME URL CONNS SECS LUA: wrk pinned to CPU 0; raw output to $out/wrk-NAME.txt.
# Sets W_RPS, W_P50_US, W_P99_US, W_REQS, W_SOCKERR.
run_wrk() {
    local name="$1" url="$2" conns="$3" secs="$4" lua="$5" f="$out/wrk-$1.txt"
    taskset -c 0 wrk -t1 -c"$conns" -d"${secs}s" --latency -s "$tmp/$lua.lua" "$url" > "$f" 2>&1 \
        || { cat "$f" >&2; die "wrk failed ($name)"; }
    check_wrk "$name" "$f"
    W_RPS="$(awk '/^Requests\/sec:/ { print $2 }' "$f")"
    local p50 p99
    p50="$(awk '/Latency Distribution/ { d = 1; next } d && $1 == "50%" { print $2; exit }' "$f")"
    p99="$(awk '/Latency Distribution/ { d = 1; next } d && $1 == "99%" { print $2; exit }' "$f")"
    [[ -n "$W_RPS" && -n "$p50" && -n "$p99" ]] || { cat "$f" >&2; die "could not parse wrk output ($name)"; }
    W_P50_US="$(to_us "$p50")"
    W_P99_US="$(to_us "$p99")"
    log "  $name: $W_RPS req/s, p50 $(fmt_us "$W_P50_US"), p99 $(fmt_us "$W_P99_US"), $W_REQS requests, socket errors $W_SOCKERR"
}

# bench_target KEY URL LUA: warm-up, 32-connection run, 1-connection run. Sets R_KEY_*.
bench_target() {
    local key="$1" url="$2" lua="$3" c f
    f="$out/wrk-$key-warmup.txt"
    log "$key: warm-up ${warmup}s at 32 connections, then ${duration}s at 32 and ${duration}s at 1 connection"
    taskset -c 0 wrk -t1 -c32 -d"${warmup}s" -s "$tmp/$lua.lua" "$url" > "$f" 2>&1 \
        || { cat "$f" >&2; die "wrk warm-up failed ($key)"; }
    check_wrk "$key-warmup" "$f"
    for c in 32 1; do
        run_wrk "$key-c$c" "$url" "$c" "$duration" "$lua"
        printf -v "R_${key}_c${c}_rps" '%s' "$W_RPS"
        printf -v "R_${key}_c${c}_p50" '%s' "$W_P50_US"
        printf -v "R_${key}_c${c}_p99" '%s' "$W_P99_US"
        printf -v "R_${key}_c${c}_reqs" '%s' "$W_REQS"
        printf -v "R_${key}_c${c}_sockerr" '%s' "$W_SOCKERR"
    done
}

# start_nginx DIR NAME: checks DIR/nginx.conf and starts it on CPU 1; sets NG_PID.
start_nginx() {
    local dir="$1" name="$2"
    cp "$dir/nginx.conf" "$out/$name.conf"
    "$nginx_bin" -t -q -p "$dir" -e "$dir/logs/error.log" -c "$dir/nginx.conf" \
        || die "nginx rejected the generated config ($out/$name.conf)"
    taskset -c 1 "$nginx_bin" -p "$dir" -e "$dir/logs/error.log" -c "$dir/nginx.conf" > "$out/$name.log" 2>&1 &
    NG_PID=$!
}
nginx_common() {
    local dir="$1"
    mkdir -p "$dir/logs" "$dir/temp"
    cat <<EOF
worker_processes 1;
worker_rlimit_nofile $nofile;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events {
    worker_connections $((nofile > 65536 ? 65536 : nofile - 64));
}
EOF
}
nginx_http_common() {
    local dir="$1"
    cat <<EOF
    access_log off;
    client_body_temp_path $dir/temp/client_body;
    proxy_temp_path $dir/temp/proxy;
    fastcgi_temp_path $dir/temp/fastcgi;
    uwsgi_temp_path $dir/temp/uwsgi;
    scgi_temp_path $dir/temp/scgi;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
EOF
}
# nginx_quote VAR STRING: VAR = the body of an nginx single-quoted string (escapes \ and ').
# (A variable, not $(...): command substitution would drop the events' trailing newlines.)
nginx_quote() { local s="$2"; s="${s//\\/\\\\}"; s="${s//\'/\\\'}"; printf -v "$1" '%s' "$s"; }

# RSS in KiB of a process (VmRSS), and of an nginx master plus its workers.
rss_kib() { awk '/^VmRSS:/ { print $2; f = 1 } END { if (!f) print 0 }' "/proc/$1/status" 2>/dev/null || echo 0; }
nginx_pids() { local m="$1"; echo "$m"; ps -o pid= --ppid "$m" 2>/dev/null | tr -d ' '; }
pids_rss_kib() { local t=0 p; for p in "$@"; do t=$((t + $(rss_kib "$p"))); done; echo "$t"; }
fd_count() { local t=0 p n; for p in "$@"; do n="$(find "/proc/$p/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)"; t=$((t + n)); done; echo "$t"; }

# ---------------------------------------------------------------------------------------
# 1. The canned responses. The JSON body is a real one from `gantry mock --speedup 0`.
free_port mock_port
log "capturing a chat completion from gantry mock on 127.0.0.1:$mock_port"
"$gantry" mock --port "$mock_port" --engines 1 --workers 1 --speedup 0 > "$tmp/mock.log" 2>&1 &
mock_pid=$!
wait_until 30 "$mock_pid" "gantry mock" http_ok "http://127.0.0.1:$mock_port/health"
code="$(post_once "http://127.0.0.1:$mock_port/v1/chat/completions" "$request_body" "$out/canned.json" "$tmp/mock.headers")" \
    || die "POST to the mock failed"
stop_pid "$mock_pid"
[[ "$code" == 200 ]] || { cat "$out/canned.json" >&2; die "mock answered $code to the benchmark request"; }
canned="$(cat "$out/canned.json"; echo x)"
canned="${canned%x}"
[[ "$canned" != *'$'* ]] || die "the captured body contains \$, which an nginx string cannot hold literally"
json_body_bytes="$(wc -c < "$out/canned.json")"
nginx_quote canned_q "$canned"

# 256 chunk events + [DONE]. An nginx config token is limited to 4 KiB, so the body is
# split into maps of 16 events each and returned as their concatenation.
sse_event='data: {"id":"chatcmpl-x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" tok"},"finish_reason":null}]}'$'\n\n'
sse_done='data: [DONE]'$'\n\n'
sse_maps=""
sse_vars=""
: > "$out/canned.sse"
for ((i = 0; i < sse_events; i += 16)); do
    n=$((sse_events - i < 16 ? sse_events - i : 16))
    part=""
    for ((j = 0; j < n; j++)); do part+="$sse_event"; done
    printf '%s' "$part" >> "$out/canned.sse"
    nginx_quote q "$part"
    sse_maps+="    map \$host \$sse_$i { default '$q'; }"$'\n'
    sse_vars+="\$sse_$i"
done
printf '%s' "$sse_done" >> "$out/canned.sse"
nginx_quote q "$sse_done"
sse_maps+="    map \$host \$sse_done { default '$q'; }"$'\n'
sse_vars+="\$sse_done"
sse_body_bytes="$(wc -c < "$out/canned.sse")"

# ---------------------------------------------------------------------------------------
# 2. Backend nginx: json and sse server blocks, one worker, CPU 1.
free_port backend_json_port
free_port backend_sse_port
bdir="$tmp/backend"
{
    nginx_common "$bdir"
    echo "http {"
    nginx_http_common "$bdir"
    printf '%s' "$sse_maps"
    cat <<EOF
    server {
        listen 127.0.0.1:$backend_json_port;
        location = /health { return 200; }
        location = /v1/chat/completions {
            default_type application/json;
            return 200 '$canned_q';
        }
    }
    server {
        listen 127.0.0.1:$backend_sse_port;
        location = /health { return 200; }
        location = /v1/chat/completions {
            default_type text/event-stream;
            return 200 "$sse_vars";
        }
    }
}
EOF
} > "$tmp/backend.conf.tmp"
mkdir -p "$bdir" && mv "$tmp/backend.conf.tmp" "$bdir/nginx.conf"
log "starting backend nginx on 127.0.0.1:$backend_json_port (json), :$backend_sse_port (sse) (CPU 1, 1 worker)"
start_nginx "$bdir" backend-nginx
backend_pid="$NG_PID"
wait_until 30 "$backend_pid" "backend nginx" http_ok "http://127.0.0.1:$backend_json_port/health"
wait_until 10 "$backend_pid" "backend nginx pid file" test -s "$bdir/nginx.pid"

# ---------------------------------------------------------------------------------------
# 3. nginx proxy: one worker, CPU 1, upstream keepalive.
free_port nproxy_json_port
free_port nproxy_sse_port
pdir="$tmp/nproxy"
{
    nginx_common "$pdir"
    echo "http {"
    nginx_http_common "$pdir"
    cat <<EOF
    upstream backend_json {
        server 127.0.0.1:$backend_json_port;
        keepalive 64;
        keepalive_requests 1000000;
    }
    upstream backend_sse {
        server 127.0.0.1:$backend_sse_port;
        keepalive 64;
        keepalive_requests 1000000;
    }
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    server {
        listen 127.0.0.1:$nproxy_json_port;
        location / {
            proxy_pass http://backend_json;
        }
    }
    server {
        listen 127.0.0.1:$nproxy_sse_port;
        location / {
            proxy_pass http://backend_sse;
            proxy_buffering off;
        }
    }
}
EOF
} > "$tmp/nproxy.conf.tmp"
mkdir -p "$pdir" && mv "$tmp/nproxy.conf.tmp" "$pdir/nginx.conf"
log "starting nginx proxy on 127.0.0.1:$nproxy_json_port (json), :$nproxy_sse_port (sse) (CPU 1, 1 worker)"
start_nginx "$pdir" nginx-proxy
nproxy_pid="$NG_PID"
wait_until 10 "$nproxy_pid" "nginx proxy pid file" test -s "$pdir/nginx.pid"
wait_until 30 "$nproxy_pid" "nginx proxy" \
    post_once "http://127.0.0.1:$nproxy_json_port/v1/chat/completions" "$request_body" /dev/null /dev/null

# ---------------------------------------------------------------------------------------
# 4. gantry serve: one for each backend, CPU 1, one worker.
free_port gantry_json_port
free_port gantry_sse_port
driver_args=()
[[ -n "$driver" ]] && driver_args=(--driver "$driver")
gantry_cmd=("$gantry" serve --listen "127.0.0.1:$gantry_json_port" --engine "http://127.0.0.1:$backend_json_port" --workers 1 "${driver_args[@]}")
gantry_sse_cmd=("$gantry" serve --listen "127.0.0.1:$gantry_sse_port" --engine "http://127.0.0.1:$backend_sse_port" --workers 1 "${driver_args[@]}")
gantry_cmd_str="taskset -c 1 $(printf '%q ' "${gantry_cmd[@]}")"
gantry_cmd_str="${gantry_cmd_str% }"
gantry_cmd_str="${gantry_cmd_str//$root\//}"
log "starting gantry: $gantry_cmd_str (and the same on :$gantry_sse_port for the sse backend)"
taskset -c 1 "${gantry_cmd[@]}" > "$out/gantry.log" 2>&1 &
gantry_pid=$!
taskset -c 1 "${gantry_sse_cmd[@]}" > "$out/gantry-sse.log" 2>&1 &
gantry_sse_pid=$!
wait_until 30 "$gantry_pid" "gantry serve" http_ok "http://127.0.0.1:$gantry_json_port/health"
wait_until 30 "$gantry_sse_pid" "gantry serve (sse)" http_ok "http://127.0.0.1:$gantry_sse_port/health"

# ---------------------------------------------------------------------------------------
# 5. Every target answers the benchmark requests with the canned bodies.
declare -A json_url=(
    [direct]="http://127.0.0.1:$backend_json_port/v1/chat/completions"
    [nginx]="http://127.0.0.1:$nproxy_json_port/v1/chat/completions"
    [gantry]="http://127.0.0.1:$gantry_json_port/v1/chat/completions"
)
declare -A sse_url=(
    [direct]="http://127.0.0.1:$backend_sse_port/v1/chat/completions"
    [nginx]="http://127.0.0.1:$nproxy_sse_port/v1/chat/completions"
    [gantry]="http://127.0.0.1:$gantry_sse_port/v1/chat/completions"
)
for t in direct nginx gantry; do
    code="$(post_once "${json_url[$t]}" "$request_body" "$out/response-$t.json" "$out/response-$t.json.headers")" \
        || die "POST to $t failed"
    [[ "$code" == 200 ]] || { cat "$out/response-$t.json" >&2; die "$t answered $code to the json request"; }
    cmp -s "$out/canned.json" "$out/response-$t.json" || die "$t's json body differs from the canned one ($out/response-$t.json)"
    grep -qi '^content-type: *application/json' "$out/response-$t.json.headers" || die "$t's json response is not application/json"
    code="$(post_once "${sse_url[$t]}" "$stream_body" "$out/response-$t.sse" "$out/response-$t.sse.headers")" \
        || die "POST (stream) to $t failed"
    [[ "$code" == 200 ]] || { cat "$out/response-$t.sse" >&2; die "$t answered $code to the stream request"; }
    cmp -s "$out/canned.sse" "$out/response-$t.sse" || die "$t's SSE body differs from the canned one ($out/response-$t.sse)"
    grep -qi '^content-type: *text/event-stream' "$out/response-$t.sse.headers" || die "$t's stream response is not text/event-stream"
done
events="$(grep -c '^data: {' "$out/canned.sse")"
[[ "$events" -eq "$sse_events" ]] || die "canned SSE body has $events events, expected $sse_events"
log "json body $json_body_bytes B, SSE body $sse_body_bytes B ($sse_events events + [DONE]); all targets verified"

# ---------------------------------------------------------------------------------------
# 6. Throughput and latency. Only the target being measured sees traffic.
bench_target direct "${json_url[direct]}" json
bench_target nginx "${json_url[nginx]}" json
bench_target gantry "${json_url[gantry]}" json
bench_target sse_direct "${sse_url[direct]}" sse
bench_target sse_nginx "${sse_url[nginx]}" sse
bench_target sse_gantry "${sse_url[gantry]}" sse

calc() { awk "BEGIN { printf \"$1\", $2 }"; }
ratio_rps="$(calc %.3f "$R_gantry_c32_rps / $R_nginx_c32_rps")"
added_nginx="$(calc %.1f "$R_nginx_c1_p50 - $R_direct_c1_p50")"
added_gantry="$(calc %.1f "$R_gantry_c1_p50 - $R_direct_c1_p50")"
for k in sse_direct sse_nginx sse_gantry; do
    for c in 32 1; do
        v="R_${k}_c${c}_rps"
        printf -v "E_${k}_c${c}" '%s' "$(calc %.0f "${!v} * $sse_events")"
    done
done
ratio_events="$(calc %.3f "$E_sse_gantry_c32 / $E_sse_nginx_c32")"
ratio_events_c1="$(calc %.3f "$E_sse_gantry_c1 / $E_sse_nginx_c1")"
meets_rps="$(calc %s "($ratio_rps >= 1.0) ? \"yes\" : \"no\"")"
meets_latency="$(calc %s "($added_gantry <= $added_nginx) ? \"yes\" : \"no\"")"
meets_events="$(calc %s "($ratio_events >= 1.0) ? \"yes\" : \"no\"")"

# ---------------------------------------------------------------------------------------
# 7. Memory of idle client connections: RSS before, with N connections held, after closing.
gantry_open() {
    curl -s --max-time 2 "http://127.0.0.1:$gantry_json_port/metrics" \
        | awk '$1 == "gantry_open_connections" { printf "%d", $2; f = 1 } END { if (!f) print -1 }'
}
# idle_pass KEY PORT PID...: sets I_KEY_{before,held,after}_kib, I_KEY_connect_s.
idle_pass() {
    local key="$1" port="$2"; shift 2
    local pids=("$@") fds0 before held prev i f="$tmp/idle-$key.out"
    check_alive
    fds0="$(fd_count "${pids[@]}")"
    before="$(pids_rss_kib "${pids[@]}")"
    log "$key: opening $idle_conns idle connections to 127.0.0.1:$port (RSS before: $((before / 1024)) MiB)"
    taskset -c 0 python3 "$idle_py" 127.0.0.1 "$port" "$idle_conns" > "$f" 2> "$tmp/idle-$key.err" &
    idle_pid=$!
    local deadline=$((SECONDS + 120))
    until grep -q '^connected' "$f" 2>/dev/null; do
        kill -0 "$idle_pid" 2>/dev/null || { cat "$tmp/idle-$key.err" >&2; die "idle client for $key exited early"; }
        ((SECONDS < deadline)) || die "$key: $idle_conns connections not established within 120s"
        sleep 0.1
    done
    log "  client: $(cat "$f")"
    # The proxy has accepted them all: its fds grew by N (and gantry's gauge says so).
    deadline=$((SECONDS + 60))
    until (($(fd_count "${pids[@]}") >= fds0 + idle_conns)) \
        && { [[ "$key" != gantry ]] || (($(gantry_open) >= idle_conns)); }; do
        check_alive
        ((SECONDS < deadline)) || die "$key did not accept $idle_conns connections within 60s (fds $(fd_count "${pids[@]}"), before $fds0)"
        sleep 0.2
    done
    [[ "$key" == gantry ]] && log "  gantry_open_connections: $(gantry_open)"
    # Settle: RSS unchanged across two reads 0.5 s apart (at most 10 reads).
    held="$(pids_rss_kib "${pids[@]}")"
    for ((i = 0; i < 10; i++)); do
        sleep 0.5
        prev="$held"; held="$(pids_rss_kib "${pids[@]}")"
        [[ "$held" == "$prev" ]] && break
    done
    stop_pid "$idle_pid"
    idle_pid=""
    # Closed: the proxy's fds go back down.
    deadline=$((SECONDS + 60))
    until (($(fd_count "${pids[@]}") < fds0 + idle_conns / 100)); do
        check_alive
        ((SECONDS < deadline)) || { log "WARNING: $key still holds $(fd_count "${pids[@]}") fds 60s after the clients closed (before: $fds0)"; break; }
        sleep 0.2
    done
    [[ "$key" == gantry ]] && log "  gantry_open_connections after close: $(gantry_open)"
    printf -v "I_${key}_before_kib" '%s' "$before"
    printf -v "I_${key}_held_kib" '%s' "$held"
    printf -v "I_${key}_after_kib" '%s' "$(pids_rss_kib "${pids[@]}")"
    printf -v "I_${key}_connect" '%s' "$(awk '{ print $4 }' "$f")"
    log "  $key: RSS $((before / 1024)) -> $((held / 1024)) MiB with $idle_conns idle connections, $(($(pids_rss_kib "${pids[@]}") / 1024)) MiB after closing"
}
if [[ -z "$idle_skip_reason" ]]; then
    mapfile -t nproxy_pids < <(nginx_pids "$(nginx_master_pid "$pdir" "$nproxy_pid")")
    idle_pass nginx "$nproxy_json_port" "${nproxy_pids[@]}"
    idle_pass gantry "$gantry_json_port" "$gantry_pid"
fi
check_alive
gantry_counter() { curl -s --max-time 2 "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n { printf "%d", $2; f = 1 } END { if (!f) print "n/a" }'; }
g_broken="$(gantry_counter "$gantry_sse_port" gantry_broken_streams_total)"
g_aborts="$(gantry_counter "$gantry_json_port" gantry_client_aborts_total)/$(gantry_counter "$gantry_sse_port" gantry_client_aborts_total)"

# ---------------------------------------------------------------------------------------
# 8. Report.
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
gantry_version="$("$gantry" --version 2>/dev/null || echo unknown)"
gantry_built="$(date -u -r "$gantry" +%Y-%m-%dT%H:%M:%SZ)"
python_version="$(python3 --version 2>&1)"
loadavg="$(cut -d' ' -f1-3 /proc/loadavg)"

mib() { calc %.1f "$1 / 1024"; }
per_conn() { calc %.0f "($1 - $2) * 1024 / $idle_conns"; }
label() { case "$1" in direct) echo "direct (backend nginx)" ;; nginx) echo "nginx proxy" ;; gantry) echo "gantry" ;; esac; }

{
    echo "# gantry serve vs nginx as a proxy"
    echo
    echo "## Non-streaming: POST /v1/chat/completions ($json_body_bytes B JSON response)"
    echo
    echo "| target | req/s @ 32 | p50 @ 32 | p99 @ 32 | req/s @ 1 | p50 @ 1 | p99 @ 1 | added p50 @ 1 | socket errors |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    for t in direct nginx gantry; do
        r32="R_${t}_c32_rps"; p32="R_${t}_c32_p50"; q32="R_${t}_c32_p99"; r1="R_${t}_c1_rps"; p1="R_${t}_c1_p50"; q1="R_${t}_c1_p99"
        s32="R_${t}_c32_sockerr"; s1="R_${t}_c1_sockerr"
        case "$t" in direct) added="—" ;; nginx) added="$(fmt_us "$added_nginx")" ;; gantry) added="$(fmt_us "$added_gantry")" ;; esac
        printf '| %s | %.0f | %s | %s | %.0f | %s | %s | %s | %s |\n' "$(label "$t")" "${!r32}" "$(fmt_us "${!p32}")" "$(fmt_us "${!q32}")" \
            "${!r1}" "$(fmt_us "${!p1}")" "$(fmt_us "${!q1}")" "$added" "$((${!s32} + ${!s1}))"
    done
    echo
    echo "## Streaming: POST /v1/chat/completions, \"stream\":true ($sse_events SSE events + [DONE], $sse_body_bytes B)"
    echo
    echo "| target | events/s @ 32 | req/s @ 32 | p50 @ 32 | p99 @ 32 | events/s @ 1 | p50 @ 1 | p99 @ 1 | socket errors |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    for t in direct nginx gantry; do
        k="sse_$t"
        e32="E_${k}_c32"; e1="E_${k}_c1"; r32="R_${k}_c32_rps"; p32="R_${k}_c32_p50"; q32="R_${k}_c32_p99"; p1="R_${k}_c1_p50"; q1="R_${k}_c1_p99"
        s32="R_${k}_c32_sockerr"; s1="R_${k}_c1_sockerr"
        printf '| %s | %s | %.0f | %s | %s | %s | %s | %s | %s |\n' "$(label "$t")" "${!e32}" "${!r32}" "$(fmt_us "${!p32}")" "$(fmt_us "${!q32}")" \
            "${!e1}" "$(fmt_us "${!p1}")" "$(fmt_us "${!q1}")" "$((${!s32} + ${!s1}))"
    done
    echo
    echo "## Idle keep-alive client connections"
    echo
    if [[ -n "$idle_skip_reason" ]]; then
        echo "Skipped ($idle_skip_reason)."
    else
        echo "| proxy | RSS before | RSS with $idle_conns idle | delta | per connection | RSS after closing |"
        echo "|---|---:|---:|---:|---:|---:|"
        for t in nginx gantry; do
            b="I_${t}_before_kib"; h="I_${t}_held_kib"; a="I_${t}_after_kib"
            printf '| %s | %s MiB | %s MiB | %s MiB | %s B | %s MiB |\n' "$(label "$t")" "$(mib "${!b}")" "$(mib "${!h}")" \
                "$(mib "$((${!h} - ${!b}))")" "$(per_conn "${!h}" "${!b}")" "$(mib "${!a}")"
        done
        echo
        echo "nginx: master + worker VmRSS; gantry: VmRSS of the json instance. Measured after the wrk passes."
    fi
    echo
    echo "## Targets"
    echo
    echo "- gantry / nginx-proxy req/s @ 32 connections = **$ratio_rps** (target >= 1.0: **$meets_rps**)"
    echo "- added p50 @ 1 connection: gantry **$(fmt_us "$added_gantry")**, nginx **$(fmt_us "$added_nginx")** (target gantry <= nginx: **$meets_latency**)"
    echo "- SSE events/s @ 32 connections: gantry $E_sse_gantry_c32, nginx $E_sse_nginx_c32, ratio **$ratio_events** (target >= 1.0: **$meets_events**); @ 1 connection: ratio $ratio_events_c1"
    echo
    echo "## Setup"
    echo
    echo "- date: $date_utc; load average at the end: $loadavg"
    echo "- gantry commit: $commit$dirty; $gantry_version; binary built $gantry_built$([[ -z "$build" ]] && echo ' (not rebuilt by this run: check it matches the commit)')"
    echo "- machine: $cpu_model, nproc $ncpu, kernel $kernel; ulimit -n $nofile${nofile_note:+ ($nofile_note)}"
    echo "- pinning: backend nginx and the proxy under test on CPU 1 (taskset -c 1), sharing one core; wrk -t1 and the idle-connection client on CPU 0"
    echo "- wrk: $wrk_version; per target ${warmup}s warm-up at 32 connections, then ${duration}s at 32 and ${duration}s at 1 connection (\`--latency\`)"
    echo "- nginx: $nginx_version; worker_processes 1, access_log off, keepalive_requests 1000000; backend \`return 200\` of the canned bodies"
    echo "- nginx proxy: upstream keepalive 64 (keepalive_requests 1000000), proxy_http_version 1.1, Connection \"\"; default proxy_buffering for json, proxy_buffering off for SSE"
    echo "- gantry: \`$gantry_cmd_str\` (a second instance on the SSE backend); broken streams $g_broken, client aborts (json/sse) $g_aborts"
    echo "- request: \`$request_body\` (stream: with \`\"stream\":true\`); python: $python_version"
    echo "- added p50 = p50 through the proxy at 1 connection - p50 direct at 1 connection; events/s = req/s x $sse_events"
} > "$out/results.md"

run_json() {
    local k="$1" c="$2" r p50 p99 n s
    r="R_${k}_c${c}_rps"; p50="R_${k}_c${c}_p50"; p99="R_${k}_c${c}_p99"; n="R_${k}_c${c}_reqs"; s="R_${k}_c${c}_sockerr"
    printf '{"req_per_sec": %s, "p50_us": %s, "p99_us": %s, "requests": %s, "socket_errors": %s}' "${!r}" "${!p50}" "${!p99}" "${!n}" "${!s}"
}
target_json() { printf '{"c32": %s, "c1": %s}' "$(run_json "$1" 32)" "$(run_json "$1" 1)"; }
sse_json() {
    local k="sse_$1" e32="E_sse_${1}_c32" e1="E_sse_${1}_c1"
    printf '{"events_per_sec_c32": %s, "events_per_sec_c1": %s, "c32": %s, "c1": %s}' "${!e32}" "${!e1}" "$(run_json "$k" 32)" "$(run_json "$k" 1)"
}
idle_json() {
    if [[ -n "$idle_skip_reason" ]]; then echo null; return; fi
    local t b h a
    printf '{'
    for t in nginx gantry; do
        b="I_${t}_before_kib"; h="I_${t}_held_kib"; a="I_${t}_after_kib"
        [[ "$t" == gantry ]] && printf ', '
        printf '"%s": {"rss_before_kib": %s, "rss_held_kib": %s, "rss_after_close_kib": %s, "delta_mib": %s, "bytes_per_conn": %s}' \
            "$t" "${!b}" "${!h}" "${!a}" "$(mib "$((${!h} - ${!b}))")" "$(per_conn "${!h}" "${!b}")"
    done
    printf '}'
}
yn() { [[ "$1" == yes ]] && echo true || echo false; }
cat > "$out/results.json" <<EOF
{
  "benchmark": "proxy-vs-nginx",
  "date": $(json_str "$date_utc"),
  "gantry_commit": $(json_str "$commit"),
  "dirty_tree": $([[ -n "$dirty" ]] && echo true || echo false),
  "gantry_version": $(json_str "$gantry_version"),
  "gantry_binary_mtime": $(json_str "$gantry_built"),
  "gantry_rebuilt": $([[ -n "$build" ]] && echo true || echo false),
  "machine": {"nproc": $ncpu, "cpu_model": $(json_str "$cpu_model"), "kernel": $(json_str "$kernel"), "nofile": $nofile, "loadavg_end": $(json_str "$loadavg")},
  "pinning": "backend nginx + proxy under test on CPU 1; wrk -t1 and idle client on CPU 0",
  "wrk_version": $(json_str "$wrk_version"),
  "nginx_version": $(json_str "$nginx_version"),
  "python_version": $(json_str "$python_version"),
  "gantry_command": $(json_str "$gantry_cmd_str"),
  "request_body": $(json_str "$request_body"),
  "stream_request_body": $(json_str "$stream_body"),
  "duration_s": $duration,
  "warmup_s": $warmup,
  "json_body_bytes": $json_body_bytes,
  "sse_events": $sse_events,
  "sse_body_bytes": $sse_body_bytes,
  "json": {"direct": $(target_json direct), "nginx": $(target_json nginx), "gantry": $(target_json gantry)},
  "sse": {"direct": $(sse_json direct), "nginx": $(sse_json nginx), "gantry": $(sse_json gantry)},
  "idle_connections": {"count": $idle_conns, "skipped": $(json_str "$idle_skip_reason"), "results": $(idle_json)},
  "gantry_metrics_end": {"broken_streams_total_sse": $(json_str "$g_broken"), "client_aborts_total_json_sse": $(json_str "$g_aborts")},
  "ratio_gantry_over_nginx_req_per_sec_c32": $ratio_rps,
  "added_p50_us_c1": {"nginx": $added_nginx, "gantry": $added_gantry},
  "ratio_gantry_over_nginx_events_per_sec_c32": $ratio_events,
  "ratio_gantry_over_nginx_events_per_sec_c1": $ratio_events_c1,
  "targets": {"req_per_sec_c32_ratio_ge_1": $(yn "$meets_rps"), "added_p50_c1_le_nginx": $(yn "$meets_latency"), "sse_events_per_sec_ratio_ge_1": $(yn "$meets_events")}
}
EOF

echo
cat "$out/results.md"
echo
echo "results: $out/results.md, $out/results.json (raw wrk output: $out/wrk-*.txt)"
