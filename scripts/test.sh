#!/usr/bin/env bash
# Runs every check of the project, on a fresh Debian 12 machine too:
#   bash scripts/test.sh
#
#  1. installs missing Debian packages (scripts/install-deps.sh; apt-get only)
#  2. reserves 2 MiB huge pages when root, so the hugetlb pool path is tested
#  3. rustfmt check, clippy -D warnings (x86_64), the API docs with rustdoc
#     warnings as errors (broken links, links to private items)
#  4. builds the workspace binaries (system tests start them as processes)
#     and runs every test
#  5. model-checks the lock-free allocator and ring with loom, builds the
#     fuzz targets (running them is for benchmarks: scripts/fuzz.sh)
#  6. checks that doca-sys with the `sdk` feature fails loudly without the SDK,
#     and type-checks the workspace over the DOCA sdk backend against
#     doca-sys's hand-written DOCA declarations (`doca/sdk-decls`)
#  7. cross-builds the DPU crates for aarch64 with Debian's toolchain, runs
#     clippy for aarch64 and their unit tests under qemu-aarch64, and checks
#     that the aarch64 agent prints the same wire layouts as the x86_64 build
#  8. builds the Debian packages and checks them (scripts/check-packages.sh)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

declare -a times=()
t_start=$(date +%s)
step() {
  local now; now=$(date +%s)
  [ -n "${cur:-}" ] && times+=("$(printf '%5ss  %s' $((now - t_step)) "$cur")")
  cur="$*"; t_step=$now
  printf '\n==> %s\n' "$*"
}

step "install Debian packages"
bash scripts/install-deps.sh base cross

step "huge pages"
if [ "$(id -u)" -eq 0 ] && [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 64 ]; then
  echo 64 > /proc/sys/vm/nr_hugepages || true
fi
grep -E '^HugePages_(Total|Free)' /proc/meminfo

step "rustfmt"
cargo fmt --all --check
cargo fmt --manifest-path fuzz/Cargo.toml --check
# doca-sys reaches its declarations through include!, which cargo fmt skips.
rustfmt --edition 2024 --check doca-sys/src/decls.rs

step "clippy x86_64"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "rustdoc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "verbs backend (fabric, agent): clippy (no RDMA device needed; its tests need one, see README)"
cargo clippy -p fabric --features verbs-hw --all-targets --locked -- -D warnings
cargo clippy -p dpu-agent --features verbs --all-targets --locked -- -D warnings
cargo build -p fabric --features verbs --locked

step "build binaries and libraries (system tests start and link them)"
cargo build --workspace --locked

step "tests x86_64"
cargo test --workspace --locked

step "loom models (shm allocator and ring)"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="$root/target/loom" cargo test --locked --release -p shm --lib loom

step "fuzz targets build"
cargo build --manifest-path fuzz/Cargo.toml --locked --bins

step "doca-sys sdk without SDK fails loudly"
if out=$(cargo build -p doca-sys --features sdk --locked 2>&1); then
  echo "doca-sys built with the sdk feature: is a DOCA SDK installed? (expected a failure here)"
  pkg-config --exists doca-common || { echo "$out" | tail -20; exit 1; }
else
  echo "$out" | grep -q "the NVIDIA DOCA SDK was not found" || { echo "$out" | tail -30; exit 1; }
  echo "ok: the build stops and says what to install and which variable to set"
fi

step "DOCA sdk backend type-check (x86_64) against the written declarations"
# The hand-written DOCA 3.0 declarations (doca-sys/src/decls.rs) stand in for
# the generated bindings in check builds; nothing is generated or linked.
# With `doca/sdk-decls` the whole workspace (agent, fabric, host-shim, their
# tests) is built over the SDK backend (doca/src/sdk/) and must pass clippy.
cargo clippy -p doca-sys --features decls --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --features doca/sdk-decls --locked -- -D warnings

# shellcheck source=cross/aarch64.env
. cross/aarch64.env
step "clippy aarch64 (Debian toolchain)"
"$CARGO_BIN" clippy --locked --target "$DNE_AARCH64_TARGET" $DNE_AARCH64_PACKAGES --all-targets -- -D warnings
# The agent as a BlueField runs it: over the SDK backend, type-checked against
# the written declarations (c_char is unsigned here, unlike on x86_64).
"$CARGO_BIN" check --locked --target "$DNE_AARCH64_TARGET" -p dpu-agent --features doca/sdk-decls

step "cross-build dpu-agent for aarch64"
"$CARGO_BIN" build --release --locked --target "$DNE_AARCH64_TARGET" -p dpu-agent
agent="$root/target/$DNE_AARCH64_TARGET/release/dpu-agent"
agent_file=$(file "$agent")
echo "$agent_file"
grep -q "ARM aarch64" <<<"$agent_file"

step "unit tests aarch64 under qemu"
"$CARGO_BIN" test --locked --target "$DNE_AARCH64_TARGET" $DNE_AARCH64_PACKAGES

step "aarch64 agent layouts match x86_64"
# Back to rustup's toolchain for the x86_64 test binary.
env -u RUSTC -u RUSTDOC PATH="${PATH#/usr/bin:}" DNE_AARCH64_AGENT="$agent" \
  cargo test --locked -p dne-tests --test layout -- --ignored aarch64_agent_agrees_with_the_host_layout

step "Debian packages: build and check (scripts/check-packages.sh)"
bash scripts/check-packages.sh

step "done"
printf '\n==> step times\n'
printf '%s\n' "${times[@]}"
echo "ALL CHECKS PASSED in $(( $(date +%s) - t_start ))s"
