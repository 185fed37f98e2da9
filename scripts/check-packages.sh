#!/usr/bin/env bash
# Builds DNE's Debian packages (scripts/package.sh) and checks what can be
# checked without a BlueField:
#
#  1. both packages build; dpkg-deb shows the right name, architecture,
#     dependencies and contents; the maintainer scripts parse
#  2. `systemd-analyze verify` passes on both units, in a scratch root that
#     holds the unpacked packages (so ExecStart= binaries exist) and a copy
#     of this machine's system units (so the targets they name exist)
#  3. the amd64 package, unpacked into a scratch root, lets gcc compile and
#     link functions/c/upper_fn.c with nothing but pkg-config (pointed into
#     the scratch root) and the installed header, against the shared and
#     the static library; both programs start and print their usage
#  4. the arm64 agent from the package runs `--version` and `check-config`
#     of the shipped default config under qemu-aarch64
#  5. the start wrappers pass the settings of /etc/default/* through
#     (including the CPU pinning), refuse a missing node name with status
#     78; the sysusers file parses; the bf.cfg hook writes the node name
#     into an unpacked image; the bfb-build helper edits a bfb-build layout
#
#   scripts/check-packages.sh        (run by scripts/test.sh)
#
# Needs: scripts/install-deps.sh base cross (dpkg-deb, systemd-analyze,
# pkg-config, gcc, qemu-user, the aarch64 cross toolchain).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

work=$(mktemp -d "${TMPDIR:-/tmp}/dne-check-packages.XXXXXX")
trap 'rm -rf "$work"' EXIT
fail() { echo "check-packages: FAIL: $*" >&2; exit 1; }
ok() { echo "check-packages: ok: $*"; }

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml)
multiarch=x86_64-linux-gnu

# ------------------------------------------------------------ 1. packages
bash scripts/package.sh --out "$work/debs"
agent_deb="$work/debs/dpu-agent_${version}_arm64.deb"
shim_deb="$work/debs/host-shim_${version}_amd64.deb"
[ -f "$agent_deb" ] || fail "no $agent_deb"
[ -f "$shim_deb" ] || fail "no $shim_deb"

# check_deb DEB PACKAGE ARCH PATH...: fields and required contents.
check_deb() {
  local deb=$1 pkg=$2 arch=$3 info list path
  shift 3
  info=$(dpkg-deb -I "$deb")
  list=$(dpkg-deb -c "$deb" | awk '{print $1, $6}')
  echo "$info" | grep -qx " Package: $pkg" || fail "$deb: Package is not $pkg"
  echo "$info" | grep -qx " Architecture: $arch" || fail "$deb: Architecture is not $arch"
  echo "$info" | grep -qx " Version: $version" || fail "$deb: Version is not $version"
  echo "$info" | grep -q '^ Depends: libc6 (>= 2\.[0-9]*), libgcc-s1' || fail "$deb: Depends lacks libc6/libgcc-s1"
  for path in "$@"; do
    echo "$list" | grep -q " \./${path#/}\$" || fail "$deb: $path is missing; contents:
$list"
  done
  # Everything is owned by root, nothing is group or world writable.
  if dpkg-deb -c "$deb" | awk '{print $2}' | grep -vqx 'root/root'; then fail "$deb: files not owned by root"; fi
  if echo "$list" | awk '{print $1}' | grep -q '^.....w\|^........w'; then fail "$deb: writable by group or others"; fi
  ok "$(basename "$deb"): $pkg $arch $version, $(echo "$list" | grep -c '^-') files"
}
check_deb "$agent_deb" dpu-agent arm64 \
  /usr/bin/dpu-agent /usr/lib/dne/dpu-agent-start /usr/lib/systemd/system/dpu-agent.service \
  /etc/dne/cluster.toml /etc/default/dpu-agent /usr/share/doc/dpu-agent/README.md \
  /usr/share/doc/dpu-agent/copyright /usr/share/doc/dpu-agent/changelog.gz \
  /usr/share/doc/dpu-agent/bf.cfg.example
check_deb "$shim_deb" host-shim amd64 \
  /usr/bin/host-shimd /usr/lib/dne/host-shimd-start /usr/lib/systemd/system/host-shimd.service \
  "/usr/lib/$multiarch/libdne_shim.so" "/usr/lib/$multiarch/libdne_shim.a" /usr/include/dne_shim.h \
  "/usr/lib/$multiarch/pkgconfig/dne-shim.pc" /usr/lib/sysusers.d/dne.conf /etc/default/host-shimd \
  /usr/share/doc/host-shim/README.md /usr/share/doc/host-shim/copyright /usr/share/doc/host-shim/changelog.gz \
  /usr/share/doc/host-shim/examples/cluster.toml /usr/share/doc/host-shim/examples/upper_fn.c

for deb in "$agent_deb" "$shim_deb"; do
  name=$(dpkg-deb -f "$deb" Package)
  dpkg-deb -e "$deb" "$work/control-$name"
  for s in postinst prerm postrm; do
    sh -n "$work/control-$name/$s" || fail "$name $s does not parse"
  done
done
grep -qx '/etc/dne/cluster.toml' "$work/control-dpu-agent/conffiles" || fail "cluster.toml is not a conffile"
grep -qx '/etc/default/host-shimd' "$work/control-host-shim/conffiles" || fail "/etc/default/host-shimd is not a conffile"
grep -qx 'activate-noawait ldconfig' "$work/control-host-shim/triggers" || fail "host-shim does not trigger ldconfig"
ok "maintainer scripts parse, conffiles and the ldconfig trigger listed"

# The scratch root: both packages unpacked.
sr="$work/root"
dpkg-deb -x "$agent_deb" "$sr"
dpkg-deb -x "$shim_deb" "$sr"
file -b "$sr/usr/bin/dpu-agent" | grep -q 'ARM aarch64' || fail "dpu-agent is not aarch64: $(file -b "$sr/usr/bin/dpu-agent")"
file -b "$sr/usr/bin/host-shimd" | grep -q 'x86-64' || fail "host-shimd is not x86-64"
file -b "$sr/usr/lib/$multiarch/libdne_shim.so" | grep -q 'shared object, x86-64' || fail "libdne_shim.so is not an x86-64 shared object"

# --------------------------------------------------------- 2. systemd units
units="$sr/usr/lib/systemd/system"
for d in /usr/lib/systemd/system /lib/systemd/system; do
  [ -d "$d" ] && cp -rn "$d/." "$units/"
done
[ -f "$units/multi-user.target" ] || fail "this machine has no systemd units to verify against (install systemd)"
out=$(systemd-analyze verify --root="$sr" dpu-agent.service host-shimd.service 2>&1) ||
  fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify warns: $out"
for u in dpu-agent host-shimd; do
  for key in 'Restart=on-failure' 'LimitMEMLOCK=infinity' 'NoNewPrivileges=yes' 'ProtectSystem=strict' \
    'EnvironmentFile=-/etc/default/'"$u" 'WantedBy=multi-user.target'; do
    grep -qx "$key" "$units/$u.service" || fail "$u.service lacks $key"
  done
done
grep -qx 'RuntimeDirectory=dne' "$units/host-shimd.service" || fail "host-shimd.service lacks RuntimeDirectory=dne"
ok "systemd-analyze verify: dpu-agent.service host-shimd.service ($(systemd-analyze --version | head -1))"
# For the record (not a check): systemd's own exposure score of each unit.
systemd-analyze security --offline=yes --root="$sr" dpu-agent.service host-shimd.service 2>/dev/null |
  sed -n 's/^→ Overall exposure level for /check-packages: exposure (systemd-analyze security): /p' || true

# ------------------------------------------- 3. C function against the package
export PKG_CONFIG_SYSROOT_DIR="$sr"
export PKG_CONFIG_LIBDIR="$sr/usr/lib/$multiarch/pkgconfig"
unset PKG_CONFIG_PATH
[ "$(pkg-config --modversion dne-shim)" = "$version" ] || fail "pkg-config dne-shim version is not $version"
read -r -a cflags <<<"$(pkg-config --cflags dne-shim)"
read -r -a libs <<<"$(pkg-config --libs dne-shim)"
read -r -a static_libs <<<"$(pkg-config --static --libs dne-shim | sed 's/-ldne_shim\b/-l:libdne_shim.a/')"
[ "${cflags[*]}" = "-I$sr/usr/include" ] || fail "pkg-config --cflags: ${cflags[*]}"
gcc -std=c11 -Wall -Wextra -O2 "${cflags[@]}" -MD -MF "$work/upper_fn.d" -c functions/c/upper_fn.c -o "$work/upper_fn.o"
grep -q "$sr/usr/include/dne_shim.h" "$work/upper_fn.d" || fail "upper_fn.c did not use the installed dne_shim.h"
gcc "$work/upper_fn.o" "${libs[@]}" -o "$work/upper_fn"
gcc "$work/upper_fn.o" "${static_libs[@]}" -o "$work/upper_fn_static"
readelf -d "$work/upper_fn" | grep -q 'NEEDED.*\[libdne_shim\.so\]' || fail "upper_fn does not link libdne_shim.so"
if readelf -d "$work/upper_fn_static" | grep -q 'libdne_shim'; then fail "upper_fn_static links the shared library"; fi
# With no arguments the function prints its usage and exits 2; run it with
# every symbol bound at start, from the scratch root's library.
for prog in upper_fn upper_fn_static; do
  set +e
  msg=$(LD_BIND_NOW=1 LD_LIBRARY_PATH="$sr/usr/lib/$multiarch" "$work/$prog" 2>&1)
  rc=$?
  set -e
  [ $rc -eq 2 ] && echo "$msg" | grep -q '^usage: ' || fail "$prog: exit $rc: $msg"
done
unset PKG_CONFIG_SYSROOT_DIR PKG_CONFIG_LIBDIR
ok "upper_fn.c built with pkg-config dne-shim (shared and static) from the unpacked host-shim package, and runs"

# ------------------------------------------------ 4. the arm64 agent under qemu
qemu=(env DNE_QEMU_USER=1 qemu-aarch64 -L /)
v=$("${qemu[@]}" "$sr/usr/bin/dpu-agent" --version)
[ "$v" = "dpu-agent $version (aarch64-unknown-linux-gnu)" ] || fail "dpu-agent --version: $v"
c=$("${qemu[@]}" "$sr/usr/bin/dpu-agent" check-config "$sr/etc/dne/cluster.toml") ||
  fail "the shipped /etc/dne/cluster.toml does not pass check-config"
echo "$c" | grep -q ': ok: ' || fail "check-config: $c"
ok "qemu-aarch64: $v; default config: ${c#*: }"

# ------------------------------------------------- 5. wrappers, users, hooks
# A stand-in for the binaries: prints its arguments and its CPU affinity.
fake="$work/fake-bin"
printf '#!/bin/sh\necho "args: $*"\ngrep Cpus_allowed_list /proc/self/status\n' > "$fake"
chmod +x "$fake"
first_cpu=$(sed 's/[-,].*//' /sys/fs/cgroup/cpuset.cpus.effective 2>/dev/null || true)
[ -n "$first_cpu" ] || first_cpu=$(taskset -pc $$ | sed 's/.*: //; s/[-,].*//')
set +e
msg=$(env -i PATH="$PATH" DNE_AGENT_BIN="$fake" sh "$sr/usr/lib/dne/dpu-agent-start" 2>&1)
rc=$?
set -e
[ $rc -eq 78 ] && echo "$msg" | grep -q 'DNE_NODE is empty' || fail "dpu-agent-start without DNE_NODE: exit $rc: $msg"
# The packaged defaults file, with a node name and a CPU filled in.
sed -e 's/^DNE_NODE=.*/DNE_NODE=node-a/' -e "s/^DNE_CPUS=.*/DNE_CPUS=$first_cpu/" \
  -e 's/^DNE_AGENT_ARGS=.*/DNE_AGENT_ARGS="--busy"/' "$sr/etc/default/dpu-agent" > "$work/agent.env"
msg=$(env -i PATH="$PATH" DNE_AGENT_BIN="$fake" sh -c "set -a; . '$work/agent.env'; exec sh '$sr/usr/lib/dne/dpu-agent-start'")
echo "$msg" | grep -qx "args: run --config /etc/dne/cluster.toml --node node-a --cores 1 --busy" ||
  fail "dpu-agent-start passed: $msg"
sed -i 's/^DNE_METRICS=.*/DNE_METRICS=127.0.0.1:9477/' "$work/agent.env"
msg=$(env -i PATH="$PATH" DNE_AGENT_BIN="$fake" sh -c "set -a; . '$work/agent.env'; exec sh '$sr/usr/lib/dne/dpu-agent-start'")
echo "$msg" | grep -qx "args: run --config /etc/dne/cluster.toml --node node-a --cores 1 --busy --metrics 127.0.0.1:9477" ||
  fail "dpu-agent-start with DNE_METRICS passed: $msg"
echo "$msg" | grep -qP "^Cpus_allowed_list:\s+$first_cpu\$" || fail "dpu-agent-start did not pin to CPU $first_cpu: $msg"
sed -e 's/^DNE_NODE=.*/DNE_NODE=node-a/' -e "s/^DNE_CPUS=.*/DNE_CPUS=$first_cpu/" "$sr/etc/default/host-shimd" > "$work/shimd.env"
msg=$(env -i PATH="$PATH" DNE_SHIMD_BIN="$fake" sh -c "set -a; . '$work/shimd.env'; exec sh '$sr/usr/lib/dne/host-shimd-start'")
echo "$msg" | grep -qx "args: --config /etc/dne/cluster.toml --node node-a" || fail "host-shimd-start passed: $msg"
echo "$msg" | grep -qP "^Cpus_allowed_list:\s+$first_cpu\$" || fail "host-shimd-start did not pin to CPU $first_cpu: $msg"
ok "start wrappers: settings passed through, pinned to CPU $first_cpu, missing node refused (78)"

mkdir -p "$work/sysroot/etc"
systemd-sysusers --root="$work/sysroot" "$sr/usr/lib/sysusers.d/dne.conf" 2>/dev/null ||
  fail "systemd-sysusers rejects dne.conf"
grep -q '^dne:x:[0-9]*:[0-9]*:DNE host-shimd:/nonexistent:/usr/sbin/nologin$' "$work/sysroot/etc/passwd" ||
  fail "sysusers did not create user dne: $(cat "$work/sysroot/etc/passwd")"
grep -q '^dne:x:' "$work/sysroot/etc/group" || fail "sysusers did not create group dne"
ok "sysusers.d/dne.conf creates user and group dne"

# bf.cfg's hook against the unpacked agent package.
(
  set -e
  # shellcheck source=images/bf.cfg
  . images/bf.cfg
  DNE_NODE=node-b DNE_CPUS=2-3 DNE_TARGET_ROOT="$sr" bfb_modify_os >/dev/null
)
grep -qx 'DNE_NODE=node-b' "$sr/etc/default/dpu-agent" && grep -qx 'DNE_CPUS=2-3' "$sr/etc/default/dpu-agent" &&
  grep -qx 'DNE_METRICS=192.168.100.2:9477' "$sr/etc/default/dpu-agent" ||
  fail "bf.cfg's bfb_modify_os did not set the node: $(grep '^DNE_' "$sr/etc/default/dpu-agent")"
ok "bf.cfg: bfb_modify_os writes the node name, CPUs and metrics address (tmfifo) into the image"

# The bfb-build helper, on a directory laid out like bfb-build's
# ubuntu/<version>/ (its Dockerfile, and its script's copy list).
bb="$work/bfb-build/ubuntu/24.04"
mkdir -p "$bb"
printf 'FROM scratch\nRUN true\n' > "$bb/Dockerfile"
printf '#!/bin/bash -e\ncp -a \\\n\tDockerfile \\\n\tcreate_bfb \\\n\tinstall.sh \\\n\trepos \\\n\t$WDIR\n' > "$bb/bfb-build"
for _ in 1 2; do bash images/bfb-build-add-dne.sh "$bb" "$agent_deb" >/dev/null; done
[ "$(grep -c '^COPY dne/ ' "$bb/Dockerfile")" -eq 1 ] || fail "bfb-build-add-dne.sh: fragment not added exactly once"
grep -qxP '\tdne \\' "$bb/bfb-build" || fail "bfb-build-add-dne.sh: dne/ not in the copy list"
[ -f "$bb/dne/$(basename "$agent_deb")" ] || fail "bfb-build-add-dne.sh: package not copied"
ok "bfb-build-add-dne.sh: Dockerfile fragment, copy list, package (idempotent)"

echo "check-packages: all checks passed; packages: $(cd "$work/debs" && ls -- *.deb | tr '\n' ' ')"
