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
# libFuzzer makes inputs of at most 4096 bytes by default (-max_len; more
# only when the corpus already holds longer ones), which is shorter than
# some inputs a decoder must take: an HTTP envelope may carry a path of
# 8 KiB and a header block of 16 KiB (24,601 bytes with the fixed header and
# the target's fragment-size byte, then padding and body), and a mesh frame
# may be MAX_MESH_FRAME (4,120) bytes. The other targets keep the default:
# their decoders take at most 4,080 bytes (control frames), or a longer
# input only repeats what a shorter one holds (more records, more payload,
# more cluster entries; the cluster limits within reach, such as a chain of
# 255 functions, fit in 4 KiB, and the others, such as 65,535 nodes, need
# far more than 32 KiB).
max_len() {
  case "$1" in
    http_envelope) echo "-max_len=32768" ;;
    mesh_frame) echo "-max_len=8192" ;;
  esac
}
if cargo fuzz --version >/dev/null 2>&1 && rustup run nightly rustc --version >/dev/null 2>&1; then
  for t in "${targets[@]}"; do
    echo "==> fuzz $t for ${secs}s (coverage-guided)"
    # shellcheck disable=SC2046 # max_len prints one word or none
    cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -use_value_profile=1 $(max_len "$t")
  done
else
  echo "WARNING: cargo-fuzz or a nightly toolchain is missing: running without coverage guidance" >&2
  cargo build --manifest-path fuzz/Cargo.toml --release --bins
  for t in "${targets[@]}"; do
    echo "==> fuzz $t for ${secs}s (no coverage guidance)"
    mkdir -p "fuzz/corpus/$t"
    # shellcheck disable=SC2046 # max_len prints one word or none
    "fuzz/target/release/$t" -max_total_time="$secs" $(max_len "$t") "fuzz/corpus/$t"
  done
fi
