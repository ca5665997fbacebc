#!/usr/bin/env bash
# Builds the offline bundle for a GPU node without network: see scripts/build_offline_bundle.py --help
# and docs/evaluation.md ("Offline GPU node"). Needs network, Python 3.11+ with vla_accel[libero], apt-get.
#   VLA_ACCEL_LIBERO_ASSETS=/path/to/libero-assets bash scripts/build_offline_bundle.sh [--python-version 3.12] ...
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/build_offline_bundle.py "$@"
