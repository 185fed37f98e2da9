#!/usr/bin/env bash
# Builds DNE's Debian packages with dpkg-deb (no debhelper):
#
#   dpu-agent_<version>_<arch>.deb   the engine: /usr/bin/dpu-agent, its
#       systemd unit and start wrapper, /etc/dne/cluster.toml (a commented
#       default), /etc/default/dpu-agent, the BlueField runbook
#   host-shim_<version>_amd64.deb    the host side: libdne_shim.so and .a,
#       dne_shim.h, dne-shim.pc (prefix /usr), /usr/bin/host-shimd, its
#       systemd unit and start wrapper, /etc/default/host-shimd, the "dne"
#       system user (sysusers.d)
#
#   scripts/package.sh [--out DIR] [--agent-arch arm64|amd64] [--only dpu-agent|host-shim]
#
#   --out DIR         where the .deb files go (default: target/debian)
#   --agent-arch      arm64 (default): the BlueField build, cross-built with
#                     Debian's toolchain as cross/build-aarch64.sh does;
#                     amd64: for host mode (the agent on the host CPU)
#   --only PKG        build one package
#
# Extra cargo arguments for the agent (e.g. `--features doca/sdk` with an
# arm64 DOCA SDK, see README) go in DNE_AGENT_CARGO_ARGS. The release builds
# land in the usual target directory (CARGO_TARGET_DIR is honoured); cargo
# only rebuilds what changed, so running this after scripts/test.sh reuses
# its aarch64 agent. File layouts and the design of the units are described
# in packaging/README.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

out="$root/target/debian"
agent_arch=arm64
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --agent-arch) agent_arch=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "package.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$agent_arch" in arm64 | amd64) ;; *) echo "package.sh: --agent-arch is arm64 or amd64" >&2; exit 2 ;; esac
case "$only" in "" | dpu-agent | host-shim) ;; *) echo "package.sh: --only is dpu-agent or host-shim" >&2; exit 2 ;; esac
mkdir -p "$out"
out=$(cd "$out" && pwd)

for tool in dpkg-deb readelf strip gzip; do
  command -v "$tool" >/dev/null || { echo "package.sh: $tool is missing (scripts/install-deps.sh base)" >&2; exit 1; }
done

# The workspace version (Cargo.toml, [workspace.package]).
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml)
[ -n "$version" ] || { echo "package.sh: no version in Cargo.toml [workspace.package]" >&2; exit 1; }
maintainer=${DNE_MAINTAINER:-"DNE developers <dne@users.noreply.github.com>"}
commit=$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
# Reproducible timestamps: the last commit's time.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)}

# The x86_64 builds use the project's main toolchain (rustup's when present),
# even when the caller sourced cross/aarch64.env (scripts/test.sh does).
host_cargo() {
  env -u RUSTC -u RUSTDOC PATH="${PATH#/usr/bin:}" cargo "$@"
}

# Prints the value of "key":"..." from cargo's JSON messages on stdin whose
# line matches PATTERN.
json_field() { # PATTERN KEY
  grep -F -- "$1" | sed -n "s/.*\"$2\":\"\([^\"]*\)\".*/\1/p" | tail -1
}

# Highest GLIBC_x.y symbol version an ELF file needs.
glibc_needed() {
  readelf -W --dyn-syms "$@" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1
}

# Libraries outside libc6 and libgcc-s1 would need more Depends: refuse them.
check_needed() {
  local f lib
  for f in "$@"; do
    for lib in $(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      case "$lib" in
        libc.so.6 | libm.so.6 | libdl.so.2 | libpthread.so.0 | librt.so.1 | ld-linux-*.so.* | libgcc_s.so.1) ;;
        *) echo "package.sh: $f needs $lib; add its package to Depends in scripts/package.sh" >&2; exit 1 ;;
      esac
    done
  done
}

# stage_doc PKGDIR NAME: copyright and changelog under /usr/share/doc/NAME.
stage_doc() {
  local d="$1/usr/share/doc/$2"
  install -d -m 755 "$d"
  sed "s/@YEAR@/$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y)/" packaging/common/copyright > "$d/copyright"
  chmod 644 "$d/copyright"
  {
    printf '%s (%s) unstable; urgency=medium\n\n' "$2" "$version"
    printf '  * Built by scripts/package.sh from DNE commit %s.\n\n' "$commit"
    printf ' -- %s  %s\n' "$maintainer" "$(date -u -R -d "@$SOURCE_DATE_EPOCH")"
  } | gzip -9n > "$d/changelog.gz"   # a native package: changelog.gz
  chmod 644 "$d/changelog.gz"
}

# build_deb PKGDIR: control fields that depend on the staged files, then
# dpkg-deb. The control template is already in PKGDIR/DEBIAN/control.
build_deb() {
  local dir=$1 name arch size deb
  name=$(sed -n 's/^Package: //p' "$dir/DEBIAN/control")
  arch=$(sed -n 's/^Architecture: //p' "$dir/DEBIAN/control")
  size=$(du -sk --exclude=DEBIAN "$dir" | cut -f1)
  printf 'Installed-Size: %s\n' "$size" >> "$dir/DEBIAN/control"
  (cd "$dir" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum > DEBIAN/md5sums)
  chmod 644 "$dir/DEBIAN/control" "$dir/DEBIAN/md5sums"
  [ -f "$dir/DEBIAN/conffiles" ] && chmod 644 "$dir/DEBIAN/conffiles"
  find "$dir" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  deb="$out/${name}_${version}_${arch}.deb"
  dpkg-deb --root-owner-group -Zxz --build "$dir" "$deb" >/dev/null
  echo "package.sh: built $deb"
}

stage=$(mktemp -d "${TMPDIR:-/tmp}/dne-package.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# ---------------------------------------------------------------- dpu-agent
if [ -z "$only" ] || [ "$only" = dpu-agent ]; then
  # shellcheck disable=SC2086 # DNE_AGENT_CARGO_ARGS is a list of words
  if [ "$agent_arch" = arm64 ]; then
    echo "package.sh: building dpu-agent for aarch64 (Debian's toolchain, cross/aarch64.env)"
    agent=$( (
      # shellcheck source=cross/aarch64.env
      . cross/aarch64.env
      "$CARGO_BIN" build --release --locked --target "$DNE_AARCH64_TARGET" -p dpu-agent \
        --message-format=json-render-diagnostics ${DNE_AGENT_CARGO_ARGS:-} |
        grep -F '"kind":["bin"]' | json_field '"reason":"compiler-artifact"' executable
    ) )
    strip_tool=aarch64-linux-gnu-strip
    elf_want="ARM aarch64"
  else
    echo "package.sh: building dpu-agent for x86_64"
    agent=$(host_cargo build --release --locked -p dpu-agent --message-format=json-render-diagnostics \
      ${DNE_AGENT_CARGO_ARGS:-} | grep -F '"kind":["bin"]' | json_field '"reason":"compiler-artifact"' executable)
    strip_tool="strip"
    elf_want="x86-64"
  fi
  [ -n "$agent" ] && [ -x "$agent" ] || { echo "package.sh: cargo did not report the dpu-agent executable" >&2; exit 1; }
  file -b "$agent" | grep -q "$elf_want" || { echo "package.sh: $agent is not $elf_want: $(file -b "$agent")" >&2; exit 1; }
  command -v "$strip_tool" >/dev/null || { echo "package.sh: $strip_tool is missing (scripts/install-deps.sh cross)" >&2; exit 1; }

  p="$stage/dpu-agent"
  install -d -m 755 "$p/DEBIAN" "$p/usr/bin" "$p/usr/lib/dne" "$p/usr/lib/systemd/system" \
    "$p/etc/dne" "$p/etc/default"
  install -m 755 "$agent" "$p/usr/bin/dpu-agent"
  "$strip_tool" --strip-all "$p/usr/bin/dpu-agent"
  install -m 755 packaging/dpu-agent/dpu-agent-start "$p/usr/lib/dne/dpu-agent-start"
  install -m 644 packaging/dpu-agent/dpu-agent.service "$p/usr/lib/systemd/system/dpu-agent.service"
  install -m 644 packaging/common/cluster.toml "$p/etc/dne/cluster.toml"
  install -m 644 packaging/dpu-agent/default "$p/etc/default/dpu-agent"
  stage_doc "$p" dpu-agent
  install -m 644 images/README.md "$p/usr/share/doc/dpu-agent/README.md"
  install -m 644 images/bf.cfg "$p/usr/share/doc/dpu-agent/bf.cfg.example"
  for s in postinst prerm postrm; do install -m 755 "packaging/dpu-agent/$s" "$p/DEBIAN/$s"; done
  printf '/etc/dne/cluster.toml\n/etc/default/dpu-agent\n' > "$p/DEBIAN/conffiles"
  check_needed "$p/usr/bin/dpu-agent"
  glibc=$(glibc_needed "$p/usr/bin/dpu-agent")
  cat > "$p/DEBIAN/control" <<EOF
Package: dpu-agent
Version: $version
Architecture: $agent_arch
Maintainer: $maintainer
Section: net
Priority: optional
Depends: libc6 (>= $glibc), libgcc-s1
Homepage: https://github.com/dne-project/dne
Description: DNE engine for BlueField DPUs (dpu-agent)
 dpu-agent is the network engine of DNE, a data plane for serverless
 function chains. It runs on the Arm cores of an NVIDIA BlueField DPU (or
 on the host CPU in host mode), owns every RDMA resource, moves function
 payloads between nodes with two-sided RDMA straight out of host memory,
 and shares the fabric between tenants by weight.
 .
 This package ships the agent binary, its hardened systemd unit, a
 commented default cluster file in /etc/dne and per-machine settings in
 /etc/default/dpu-agent. The service is not started on installation: set
 DNE_NODE first, then run systemctl enable --now dpu-agent.
EOF
  build_deb "$p"
fi

# ---------------------------------------------------------------- host-shim
if [ -z "$only" ] || [ "$only" = host-shim ]; then
  echo "package.sh: building host-shim for x86_64"
  msgs="$stage/host-shim.json"
  host_cargo build --release --locked -p host-shim --message-format=json-render-diagnostics > "$msgs"
  out_dir=$(json_field '"reason":"build-script-executed"' out_dir < <(grep -F '/host-shim#' "$msgs" || grep -F 'host-shim ' "$msgs"))
  shimd=$(json_field '"reason":"compiler-artifact"' executable < <(grep -F '"name":"host-shimd"' "$msgs"))
  cdylib=$(grep -F '"reason":"compiler-artifact"' "$msgs" | grep -o '"[^"]*/libhost_shim\.so"' | tr -d '"' | tail -1)
  staticlib=$(grep -F '"reason":"compiler-artifact"' "$msgs" | grep -o '"[^"]*/libhost_shim\.a"' | tr -d '"' | tail -1)
  for f in "$out_dir/include/dne_shim.h" "$shimd" "$cdylib" "$staticlib"; do
    [ -n "$f" ] && [ -f "$f" ] || { echo "package.sh: a host-shim build output is missing ('$f')" >&2; exit 1; }
  done

  multiarch=x86_64-linux-gnu
  p="$stage/host-shim"
  install -d -m 755 "$p/DEBIAN" "$p/usr/bin" "$p/usr/lib/dne" "$p/usr/lib/$multiarch/pkgconfig" \
    "$p/usr/include" "$p/usr/lib/systemd/system" "$p/usr/lib/sysusers.d" "$p/etc/default"
  install -m 755 "$shimd" "$p/usr/bin/host-shimd"
  strip --strip-all "$p/usr/bin/host-shimd"
  # Installed under the name of its header and pkg-config file.
  install -m 644 "$cdylib" "$p/usr/lib/$multiarch/libdne_shim.so"
  strip --strip-unneeded "$p/usr/lib/$multiarch/libdne_shim.so"
  install -m 644 "$staticlib" "$p/usr/lib/$multiarch/libdne_shim.a"
  strip --strip-debug --enable-deterministic-archives "$p/usr/lib/$multiarch/libdne_shim.a"
  install -m 644 "$out_dir/include/dne_shim.h" "$p/usr/include/dne_shim.h"
  # The installed pkg-config file, from the template the build tree's copy
  # comes from (host-shim/dne-shim.pc.in); no rpath: the library is in the
  # linker's default path.
  sed -e 's|@PREFIX@|/usr|' -e "s|@LIBDIR@|\${prefix}/lib/$multiarch|" -e 's|@INCLUDEDIR@|${prefix}/include|' \
    -e 's|@RPATH@||' -e "s|@VERSION@|$version|" -e 's|-lhost_shim\b|-ldne_shim|' \
    host-shim/dne-shim.pc.in > "$p/usr/lib/$multiarch/pkgconfig/dne-shim.pc"
  chmod 644 "$p/usr/lib/$multiarch/pkgconfig/dne-shim.pc"
  if grep -q '@[A-Z]*@' "$p/usr/lib/$multiarch/pkgconfig/dne-shim.pc" ||
    ! grep -q -- '-ldne_shim' "$p/usr/lib/$multiarch/pkgconfig/dne-shim.pc"; then
    echo "package.sh: host-shim/dne-shim.pc.in changed; update the substitutions here:" >&2
    cat "$p/usr/lib/$multiarch/pkgconfig/dne-shim.pc" >&2
    exit 1
  fi
  install -m 755 packaging/host-shim/host-shimd-start "$p/usr/lib/dne/host-shimd-start"
  install -m 644 packaging/host-shim/host-shimd.service "$p/usr/lib/systemd/system/host-shimd.service"
  install -m 644 packaging/host-shim/sysusers.conf "$p/usr/lib/sysusers.d/dne.conf"
  install -m 644 packaging/host-shim/default "$p/etc/default/host-shimd"
  stage_doc "$p" host-shim
  install -m 644 packaging/host-shim/README.md "$p/usr/share/doc/host-shim/README.md"
  install -d -m 755 "$p/usr/share/doc/host-shim/examples"
  install -m 644 packaging/common/cluster.toml "$p/usr/share/doc/host-shim/examples/cluster.toml"
  install -m 644 functions/c/upper_fn.c "$p/usr/share/doc/host-shim/examples/upper_fn.c"
  for s in postinst prerm postrm; do install -m 755 "packaging/host-shim/$s" "$p/DEBIAN/$s"; done
  printf '/etc/default/host-shimd\n' > "$p/DEBIAN/conffiles"
  install -m 644 packaging/host-shim/triggers "$p/DEBIAN/triggers"
  check_needed "$p/usr/bin/host-shimd" "$p/usr/lib/$multiarch/libdne_shim.so"
  glibc=$(glibc_needed "$p/usr/bin/host-shimd" "$p/usr/lib/$multiarch/libdne_shim.so")
  cat > "$p/DEBIAN/control" <<EOF
Package: host-shim
Version: $version
Architecture: amd64
Maintainer: $maintainer
Section: libs
Priority: optional
Depends: libc6 (>= $glibc), libgcc-s1, passwd
Suggests: pkg-config, gcc | c-compiler
Homepage: https://github.com/dne-project/dne
Description: DNE host side: function library and host-shimd
 The host side of DNE, a data plane for serverless function chains.
 Functions link the shim library (C ABI: libdne_shim.so or .a, header
 dne_shim.h, pkg-config module dne-shim) to attach to their tenant's
 shared-memory pool, write payloads in place and hand them to the next
 function as 28-byte descriptors, with no copies and no protocol stack.
 .
 host-shimd, the per-host daemon, creates the tenant pools, admits
 functions on /run/dne/shimd.sock (members of group dne), and reclaims the
 buffers of functions that die. Its hardened systemd unit is not started on
 installation: set DNE_NODE in /etc/default/host-shimd first.
EOF
  build_deb "$p"
fi
