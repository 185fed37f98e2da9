#!/usr/bin/env bash
# Adds the DNE agent to a checkout of NVIDIA's bfb-build, so that the BFB it
# builds carries dpu-agent with its service enabled:
#
#   images/bfb-build-add-dne.sh BFB_BUILD/ubuntu/24.04 target/debian/dpu-agent_<version>_arm64.deb
#
# It (1) copies the package into <distro dir>/dne/, (2) appends
# images/Dockerfile.dne to that directory's Dockerfile (and to Dockerfile.j2
# when the checkout renders the Dockerfile from that template), and (3) adds
# dne/ to the files bfb-build copies into its docker build context. Running
# it again replaces the package and leaves the rest as it is. Then build as
# bfb-build's README says, e.g.  cd BFB_BUILD && ./bfb-build ubuntu 24.04
#
# Every edit is checked; when a bfb-build version no longer has the line
# this script edits, it stops and says which file to edit by hand.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

[ $# -eq 2 ] || { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
dir=$1
deb=$2
[ -f "$dir/Dockerfile" ] && [ -f "$dir/bfb-build" ] ||
  { echo "bfb-build-add-dne: $dir has no Dockerfile and bfb-build; give a <distro>/<version> directory of bfb-build" >&2; exit 1; }
[ -f "$deb" ] || { echo "bfb-build-add-dne: no package $deb (build it with scripts/package.sh)" >&2; exit 1; }
if [ "$(dpkg-deb -f "$deb" Package)" != dpu-agent ] || [ "$(dpkg-deb -f "$deb" Architecture)" != arm64 ]; then
  echo "bfb-build-add-dne: $deb is not the arm64 dpu-agent package" >&2
  exit 1
fi

# 1. The package, alone in dne/ (the fragment installs dne/dpu-agent_*_arm64.deb).
rm -rf "$dir/dne"
mkdir -p "$dir/dne"
cp "$deb" "$dir/dne/"

# 2. The Dockerfile fragment, once, between markers.
begin="# >>> DNE dpu-agent (images/bfb-build-add-dne.sh)"
end="# <<< DNE dpu-agent"
for f in "$dir/Dockerfile" "$dir/Dockerfile.j2"; do
  [ -f "$f" ] || continue
  if ! grep -qxF "$begin" "$f"; then
    { printf '\n%s\n' "$begin"; cat "$here/Dockerfile.dne"; printf '%s\n' "$end"; } >> "$f"
  fi
  grep -qxF "$end" "$f" || { echo "bfb-build-add-dne: $f has the DNE start marker but no end marker; fix it by hand" >&2; exit 1; }
done

# 3. dne/ into the build context: bfb-build copies a fixed list of files
#    (`cp -a Dockerfile ... install.sh ... $WDIR`); add dne after install.sh.
if ! grep -qE '^[[:space:]]+dne \\$' "$dir/bfb-build"; then
  sed -i -E 's/^([[:space:]]+)install\.sh \\$/\1install.sh \\\n\1dne \\/' "$dir/bfb-build"
fi
grep -qE '^[[:space:]]+dne \\$' "$dir/bfb-build" || {
  echo "bfb-build-add-dne: could not add dne/ to the copy list in $dir/bfb-build; add a line 'dne \\' to its 'cp -a' list by hand" >&2
  exit 1
}
bash -n "$dir/bfb-build"

echo "bfb-build-add-dne: $dir now installs $(basename "$deb") and enables dpu-agent.service"
