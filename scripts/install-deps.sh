#!/usr/bin/env bash
# Installs the Debian packages DNE's builds and tests need, when missing.
# Only Debian's own archive is used (apt-get); nothing is downloaded from
# anywhere else.
#
#   scripts/install-deps.sh [GROUP...]     GROUP: base cross bench rdma (default: base cross)
#
#   base   C toolchain and libclang for bindgen/sideway, iproute2 for the
#          network-namespace tests, systemd (systemd-analyze, systemd-sysusers)
#          for the package checks
#   cross  Debian's Rust toolchain with the arm64 standard library, the
#          aarch64 cross linker and qemu-user (see cross/build-aarch64.sh)
#   bench  load generators and the peers benchmarks compare against
#   rdma   what running the fabric's verbs backend needs (libibverbs and its
#          providers, SoftRoCE's included; ibv_devices): building needs none
set -euo pipefail

groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=(base cross)

pkgs=()
need_arm64=0
for g in "${groups[@]}"; do
  case "$g" in
    base) pkgs+=(gcc g++ make pkg-config cmake libclang-dev iproute2 procps file systemd) ;;
    cross) pkgs+=(rustc-web cargo-web rust-web-clippy libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu
                  libc6-dev-arm64-cross qemu-user)
           need_arm64=1 ;;
    bench) pkgs+=(nginx-light wrk hyperfine) ;;
    rdma) pkgs+=(libibverbs1 ibverbs-providers ibverbs-utils) ;;
    *) echo "install-deps: unknown group '$g' (base, cross, bench, rdma)" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${pkgs[@]}"; do
  if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all packages present (${groups[*]})"
  exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then sudo=(sudo); else
    echo "install-deps: missing ${missing[*]}; run as root or install them: apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi
echo "install-deps: installing ${missing[*]}"
if [ $need_arm64 -eq 1 ] && ! dpkg --print-foreign-architectures | grep -qx arm64; then
  "${sudo[@]}" dpkg --add-architecture arm64
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
