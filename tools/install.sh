#!/usr/bin/env bash
# Install megatron_apb and its dependencies: the CPU torch wheel first, so nothing pulls a
# CUDA build, then the package with the extras named as arguments (e.g. `test`, `hf`).
#   bash tools/install.sh            # runtime only
#   bash tools/install.sh test hf    # plus test and Hugging Face extras
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
extras=$(IFS=,; echo "$*")
"$PY" -m pip install -q -e ".${extras:+[$extras]}"
