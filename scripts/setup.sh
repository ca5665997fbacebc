#!/usr/bin/env bash
# Installs vla_accel with everything it needs on a fresh Debian/Ubuntu machine (CPU or GPU).
#   bash scripts/setup.sh          # the package + LIBERO simulation + launchers + the policy server
#   bash scripts/setup.sh --dev    # ... + Triton and the test tools
# torch is pinned through constraints-ci.txt (2.13.0, the CPU wheel on CI machines); change that
# file, or install torch first, to use another build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="libero,launchers,serve"
[ "${1:-}" = "--dev" ] && extras="libero,launchers,serve,kernels,dev"

# Headless MuJoCo rendering (MUJOCO_GL=egl) needs Mesa's EGL.
if command -v apt-get >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q libEGL_mesa; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq libegl1 libegl-mesa0 libgl1 >/dev/null
fi

python3 -m pip install -q -c constraints-ci.txt -e ".[${extras}]"
echo "vla_accel installed (extras: ${extras})"
