#!/usr/bin/env bash
# Coverage-guided fuzzing on a stable toolchain: the same instrumentation cargo-fuzz adds
# (sanitizer coverage, trace-compares), without AddressSanitizer (nightly-only).
#   fuzz/run.sh TARGET [SECONDS]      e.g. fuzz/run.sh chunked_body 60
# With a nightly toolchain, `cargo fuzz run TARGET` works too.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?usage: fuzz/run.sh TARGET [SECONDS]}
secs=${2:-60}
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps the instrumentation out of build scripts and proc macros.
triple=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --target "$triple" --target-dir target/cov --bin "$target"
mkdir -p "corpus/$target"
exec "target/cov/$triple/release/$target" -max_total_time="$secs" "corpus/$target" "seeds/$target"
