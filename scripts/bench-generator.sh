#!/usr/bin/env bash
# The load generator's own speed: `gantry bench load` pinned to core 0 against a zero-delay
# `gantry mock` pinned to core 1, closed loop of 64, short requests, streaming and not.
# Prints req/s and requests per generator CPU-second (user+sys of the generator process alone,
# which stays meaningful when the mock, not the generator, is the bottleneck).
# Usage: scripts/bench-generator.sh [REQUESTS] [DRIVER]   (after cargo build --release)
set -euo pipefail
prog=bench-generator
# shellcheck source=scripts/bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench/common.sh"
cd "$(dirname "$0")/.."
bin=${CARGO_TARGET_DIR:-target}/release/gantry
[[ -x "$bin" ]] || die "$bin not found: run cargo build --release first"
requests=${1:-200000}
driver=${2:-auto}
free_port port
GANTRY_LOG=warn taskset -c 1 "$bin" mock --port "$port" --speedup 0 --workers 1 &
mock=$!
trap 'stop_pid "$mock"' EXIT
wait_until 10 "$mock" "gantry mock" http_ok "http://127.0.0.1:$port/health"
for mode in --no-stream --stream; do
    flag=$([ "$mode" = --no-stream ] && echo --no-stream || true)
    for run in 1 2 3; do
        out=$( { /usr/bin/time -f "cpu %U %S" taskset -c 0 "$bin" bench load --url "http://127.0.0.1:$port" \
            --concurrency 64 --requests "$requests" --warmup 1000 --isl 16 --osl 1 --driver "$driver" $flag --quiet; } 2>&1)
        rps=$(grep -oP '\| throughput \(req/s\) \| \K[0-9.]+' <<< "$out") || die "no throughput in the bench output: $out"
        failed=$(grep -oP '\| failed \| \K[0-9]+' <<< "$out")
        cpu=$(grep -oP 'cpu \K[0-9.]+ [0-9.]+' <<< "$out" | awk '{print $1 + $2}')
        per_cpu=$(awk -v n="$requests" -v c="$cpu" 'BEGIN {printf "%.0f", n / c}')
        echo "$mode run $run: $rps req/s, $failed failed, generator CPU ${cpu}s = $per_cpu req per generator CPU-second"
    done
done
