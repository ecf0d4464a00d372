#!/usr/bin/env bash
# bench-routing.sh: the Mooncake conversation trace replayed through `gantry serve` to 8 mock
# engines with limited KV capacity, once per routing policy (kv, round_robin, least_loaded),
# each on a fresh fleet (cold caches), in one go on the same machine.
#
# Per policy: `gantry mock --engines 8` (KV events + replay, --num-gpu-blocks BLOCKS each, real
# time), `gantry serve` (built-in tokenizer, the policy under test), then `gantry bench replay`
# of the first N trace requests at --speed SPEED with --token-scale SCALE, scraping the engines'
# /metrics for their prefix-cache hit rate. Then scripts/ideal_hit_rate.py bounds what any router
# could reach on the same requests and the same total capacity.
# Figures: engine-side prefix hit rate (and its ratio to the ideal), TTFT p50/p99, e2e p50,
# requests/errors; kv's TTFT p50 as a ratio to round_robin's.
#
# Usage: scripts/bench-routing.sh [--trace FILE] [--requests N] [--speed X] [--scale F]
#                                 [--blocks B] [--out DIR] [--policies "kv round_robin ..."]
#   --trace FILE   Mooncake JSONL (default ../shared/traces/mooncake_conversation_trace.jsonl)
#   --requests N   trace requests replayed (default 1500)
#   --speed X      time compression of the trace (default 8)
#   --scale F      --token-scale of the replay (default 0.25: 128-token blocks)
#   --blocks B     KV blocks (16 tokens) per mock engine (default 8192)
#   --out DIR      results (default bench-results/routing)
#   --policies P   policies to run (default "kv round_robin least_loaded")
#   --kv "K=V ..." extra `[pool.kv]` weights for the kv run (e.g. "decode_weight=0.5")
# Needs target/release/gantry (cargo build --release; GANTRY_BIN overrides the path) and python3.
set -euo pipefail
prog=bench-routing
# shellcheck source=scripts/bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench/common.sh"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

trace=../shared/traces/mooncake_conversation_trace.jsonl
requests=1500 speed=8 scale=0.25 blocks=8192 out=bench-results/routing
policies="kv round_robin least_loaded"
kv_extra=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --trace) trace="$2"; shift 2 ;;
        --requests) requests="$2"; shift 2 ;;
        --speed) speed="$2"; shift 2 ;;
        --scale) scale="$2"; shift 2 ;;
        --blocks) blocks="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --policies) policies="$2"; shift 2 ;;
        --kv) kv_extra="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
gantry=${GANTRY_BIN:-target/release/gantry}
[[ -x "$gantry" ]] || die "$gantry missing: run cargo build --release first"
[[ -r "$trace" ]] || die "cannot read trace $trace"
mkdir -p "$out"
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do stop_pid "$p"; done; rm -rf "$tmp"; }
trap cleanup EXIT

for policy in $policies; do
    free_port http; free_port events; free_port replay; free_port proxy
    # Mock engine i listens on http+i, publishes on events+i, replays on replay+i.
    for ((i = 0; i < 8; i++)); do
        for base in "$http" "$events" "$replay"; do port_in_use $((base + i)) && die "port $((base + i)) busy"; done
    done
    "$gantry" mock --port "$http" --engines 8 --num-gpu-blocks "$blocks" \
        --kv-events-port "$events" --kv-replay-port "$replay" --seed 1 > "$tmp/mock-$policy.log" 2>&1 &
    mock_pid=$!; pids+=("$mock_pid")
    wait_until 30 "$mock_pid" "gantry mock" http_ok "http://127.0.0.1:$((http + 7))/health"
    cfg="$tmp/gantry-$policy.toml"
    {
        printf '[server]\nlisten = "127.0.0.1:%s"\n[[model]]\nname = "mock-model"\ntokenizer = "builtin"\n' "$proxy"
        # Below the bench client's 600 s: an engine that never answers shows up as a 504 naming
        # it (a stall on one side or the other can then be told apart).
        printf '[upstream]\nfirst_byte_timeout_ms = 120000\nidle_timeout_ms = 120000\n'
        printf '[[pool]]\nname = "agg-0"\npolicy = "%s"\nindex_path = "%s/index-%s"\n' "$policy" "$tmp" "$policy"
        if [[ "$policy" == kv && -n "$kv_extra" ]]; then
            printf '[pool.kv]\n'
            for kv in $kv_extra; do printf '%s = %s\n' "${kv%%=*}" "${kv#*=}"; done
        fi
        for ((i = 0; i < 8; i++)); do
            printf '[[pool.engine]]\nurl = "http://127.0.0.1:%s"\nmodel = "mock-model"\n' $((http + i))
            printf 'kv_events = "tcp://127.0.0.1:%s"\nkv_replay = "tcp://127.0.0.1:%s"\n' $((events + i)) $((replay + i))
        done
    } > "$cfg"
    "$gantry" serve --config "$cfg" > "$tmp/serve-$policy.log" 2>&1 &
    serve_pid=$!; pids+=("$serve_pid")
    wait_until 30 "$serve_pid" "gantry serve" http_ok "http://127.0.0.1:$proxy/health"
    metrics=()
    for ((i = 0; i < 8; i++)); do metrics+=("http://127.0.0.1:$((http + i))"); done
    log "$policy: replaying $requests requests at ${speed}x, token scale $scale"
    "$gantry" bench replay "$trace" --url "http://127.0.0.1:$proxy" --model mock-model \
        --speed "$speed" --token-scale "$scale" --max-requests "$requests" \
        --engine-metrics "${metrics[@]}" --report "$out/$policy" --quiet
    curl -s "http://127.0.0.1:$proxy/metrics" | grep -E '^gantry_(route|pool)_' > "$out/$policy/gantry-metrics.txt" || true
    stop_pid "$serve_pid"; stop_pid "$mock_pid"
done

block_tokens=$(python3 -c "print(round(512 * $scale))")
runs=()
for policy in $policies; do runs+=("$policy=$out/$policy/requests.jsonl"); done
python3 scripts/ideal_hit_rate.py "$trace" "$requests" "$block_tokens" $((8 * blocks * 16)) "${runs[@]}" > "$out/ideal.json"
python3 - "$out" "$policies" <<'PY'
import json, sys, os
out, policies = sys.argv[1], sys.argv[2].split()
ideal = json.load(open(os.path.join(out, "ideal.json")))
rows, reports = [], {}
for p in policies:
    r = json.load(open(os.path.join(out, p, "report.json")))
    reports[p] = r
hdr = ("| policy | requests | errors | engine prefix hit rate | / ideal (pooled LRU) | ideal under this run's load "
       "| TTFT p50 ms | TTFT p99 ms | e2e p50 ms |")
lines = [hdr, "|---|---|---|---|---|---|---|---|---|"]
for p, r in reports.items():
    hit = r.get("prefix_hit_rate")
    loaded = ideal.get("pooled_lru_under_load", {}).get(p)
    loaded = f"{loaded:.3f}" if loaded is not None else "—"
    lines.append(f"| {p} | {r['requests']} | {r['errors']} | {hit:.3f} | {hit / ideal['pooled_lru']:.2f} | {loaded} | "
                 f"{r['ttft_ms']['p50']:.1f} | {r['ttft_ms']['p99']:.1f} | {r['e2e_ms']['p50']:.1f} |")
lines.append("")
lines.append(f"Ideal on the same {ideal['requests']} requests: infinite cache {ideal['infinite']:.3f} (no router can do better), "
             f"pooled LRU of the fleet's {int(ideal['capacity_tokens'])} tokens {ideal['pooled_lru']:.3f} (an ideal router's estimate); "
             "under this run's load: the same with each decoding request's blocks held (scripts/ideal_hit_rate.py).")
if "kv" in reports and "round_robin" in reports:
    ratio = reports["kv"]["ttft_ms"]["p50"] / reports["round_robin"]["ttft_ms"]["p50"]
    lines.append(f"kv TTFT p50 / round_robin TTFT p50 = {ratio:.2f}")
text = "\n".join(lines)
open(os.path.join(out, "summary.md"), "w").write(text + "\n")
print(text)
PY
