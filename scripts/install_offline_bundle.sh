#!/usr/bin/env bash
# Installs an offline bundle (scripts/build_offline_bundle.py) on a GPU node without network, then smoke-checks it.
#
#   bash scripts/install_offline_bundle.sh [BUNDLE] [options]     # BUNDLE: default .bundle
#   source BUNDLE/installed/env.sh                                 # in each later shell: the variables to use
#
#   --dest DIR     where the assets, LIBERO's config.yaml and env.sh go (default: BUNDLE/installed)
#   --target       install the wheels into DIR/site (PYTHONPATH in env.sh), not into python3's environment
#   --no-gl        leave the GL loader debs alone (else: dpkg -x each into /, then ldconfig; needs root)
#   --no-project   do not install this checkout (vla_accel) with pip --no-deps
#   --no-smoke     skip the smoke check: one env per installed suite, 256 px cameras, reset, one step,
#                  images not blank (python3 scripts/install_offline_bundle.py smoke --help for more)
#   PYTHON=...     the Python to install into (default: python3)
#
# Steps: sha256 of every present file against manifest.json -> GL loader debs -> wheels -> asset parts ->
# vla_accel -> LIBERO config.yaml + env.sh -> smoke check. Parts of the bundle that were not carried are
# reported and skipped. Re-running is cheap: wheels already installed at their versions and parts already
# unpacked (same sha256) are skipped.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
bundle=".bundle"; dest=""; target=0; gl=1; project=1; smoke=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) dest="${2:?--dest needs a folder}"; shift 2 ;;
    --target) target=1; shift ;;
    --no-gl) gl=0; shift ;;
    --no-project) project=0; shift ;;
    --no-smoke) smoke=0; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "install_offline_bundle: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) bundle="$1"; shift ;;
  esac
done
PYTHON="${PYTHON:-python3}"
[ -f "$bundle/manifest.json" ] || { echo "install_offline_bundle: $bundle/manifest.json not found: pass the bundle folder that build_offline_bundle.py wrote" >&2; exit 2; }
bundle="$(cd "$bundle" && pwd)"
dest="${dest:-$bundle/installed}"
mkdir -p "$dest"; dest="$(cd "$dest" && pwd)"
helper=("$PYTHON" "$here/install_offline_bundle.py")
t0=$(date +%s%N)
elapsed() { local ms=$(( ($(date +%s%N) - t0) / 1000000 )); printf '%d.%d s' $((ms / 1000)) $((ms % 1000 / 100)); }
step() { printf '[install %s] %s\n' "$(elapsed)" "$*"; }

step "checking $bundle against its manifest"
"${helper[@]}" check "$bundle"

if [ "$gl" = 1 ] && compgen -G "$bundle/core/gl/*.deb" >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "install_offline_bundle: unpacking the GL loader debs into / needs root (or pass --no-gl)" >&2; exit 2; }
  step "GL loader libraries: dpkg -x into /, ldconfig"
  for f in "$bundle"/core/gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
  known="$(ldconfig -p)"
  for lib in libEGL.so.1 libOpenGL.so.0; do
    grep -qF "$lib" <<<"$known" || { echo "install_offline_bundle: $lib is still not found by the loader after unpacking the debs" >&2; exit 1; }
  done
fi

site_args=()
if [ "$target" = 1 ]; then
  mkdir -p "$dest/site"
  site_args=(--target "$dest/site" --upgrade)
  export PYTHONPATH="$dest/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if "${helper[@]}" wheels-installed "$bundle"; then
  step "wheels: already installed at the bundle's versions"
else
  step "wheels: pip install --no-index --no-deps ${site_args[*]}"
  "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps "${site_args[@]}" "$bundle"/core/wheels/*.whl
fi

step "assets: unpacking the parts present into $dest/libero-assets"
"${helper[@]}" unpack "$bundle" "$dest/libero-assets"

if [ "$project" = 1 ] && [ -f "$repo/pyproject.toml" ]; then
  if [ "$target" = 1 ]; then
    step "vla_accel: pip install --no-deps --target $dest/site $repo"
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation --upgrade --target "$dest/site" "$repo"
  elif (cd / && "$PYTHON" -c "import importlib.util, sys; s = importlib.util.find_spec('vla_accel'); sys.exit(0 if s and s.origin.startswith('$repo/') else 1)" 2>/dev/null); then
    step "vla_accel: already installed from $repo"
  else
    step "vla_accel: pip install --no-deps -e $repo"
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation -e "$repo"
  fi
fi

step "LIBERO config.yaml and $dest/env.sh"
"${helper[@]}" configure "$dest" $([ "$target" = 1 ] && echo --target)
cat "$dest/env.sh"
step "installed; in each new shell: source $dest/env.sh"

if [ "$smoke" = 1 ]; then
  # shellcheck disable=SC1091
  source "$dest/env.sh"
  "${helper[@]}" smoke
fi
