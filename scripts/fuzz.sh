#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for a while (default 60 s each).
#   scripts/fuzz.sh [SECONDS] [TARGET...]
# With cargo-fuzz and a nightly toolchain, targets run coverage-guided
# (`cargo +nightly fuzz run`) with libFuzzer's value profile, which counts
# a comparison's operands coming closer as new coverage. libFuzzer's
# comparison-driven mutations use only 32- and 64-bit comparisons, so
# without it a 16-bit magic (FABRIC_MAGIC) is a wall: fabric_header and
# fabric_recv never got past it in 240 s. Otherwise the stable-built
# libFuzzer binaries run without coverage feedback (random inputs only),
# which is said loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}; shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  # Every target of fuzz/ (each decoder of untrusted bytes has one).
  for f in fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi
if cargo fuzz --version >/dev/null 2>&1 && rustup run nightly rustc --version >/dev/null 2>&1; then
  for t in "${targets[@]}"; do
    echo "==> fuzz $t for ${secs}s (coverage-guided)"
    cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -use_value_profile=1
  done
else
  echo "WARNING: cargo-fuzz or a nightly toolchain is missing: running without coverage guidance" >&2
  cargo build --manifest-path fuzz/Cargo.toml --release --bins
  for t in "${targets[@]}"; do
    echo "==> fuzz $t for ${secs}s (no coverage guidance)"
    mkdir -p "fuzz/corpus/$t"
    "fuzz/target/release/$t" -max_total_time="$secs" "fuzz/corpus/$t"
  done
fi
