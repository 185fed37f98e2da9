#!/usr/bin/env bash
# Builds the release dpu-agent for the BlueField's Arm cores without Docker,
# with Debian's multiarch toolchain (installed when missing), and leaves it at
#   target/aarch64-unknown-linux-gnu/release/dpu-agent
# (under $CARGO_TARGET_DIR instead of target/ when that is set)
#
#   cross/build-aarch64.sh [extra cargo build args, e.g. --features doca/sdk]
#
# With `--features doca/sdk`, point DOCA_SDK_PREFIX_aarch64_unknown_linux_gnu
# at an arm64 DOCA SDK prefix (see README, "Cross-building for BlueField").
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh base cross
# shellcheck source=cross/aarch64.env
. cross/aarch64.env
"$CARGO_BIN" build --release --locked --target "$DNE_AARCH64_TARGET" -p dpu-agent "$@"
bin="${CARGO_TARGET_DIR:-target}/$DNE_AARCH64_TARGET/release/dpu-agent"
file "$bin"
file "$bin" | grep -q "ARM aarch64" || { echo "build-aarch64: $bin is not an aarch64 binary" >&2; exit 1; }
qemu-aarch64 -L / "$bin" --version
