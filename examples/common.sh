# Shared set-up of the launch scripts in this folder (sourced, not run).
#
# Megatron-style variables, all overridable from the environment:
#   GPUS_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT   torchrun rendezvous
#   MODEL        HF directory, .gguf file or converted checkpoint (megatron-apb convert)
#   CPU=1        (or --cpu as the first argument) run on CPU processes joined by gloo with
#                a tiny random Llama written by make_tiny_llama.py into TINY_MODEL_DIR
set -euo pipefail

EXAMPLES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$EXAMPLES_DIR/.." && pwd)"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}

CPU=${CPU:-0}
EXTRA_ARGS=()
for arg in "$@"; do
  if [ "$arg" = "--cpu" ]; then CPU=1; else EXTRA_ARGS+=("$arg"); fi
done

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}

free_port() {
  "$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}

if [ "$CPU" = 1 ]; then
  # CPU form: gloo, fp32, a tiny random model, a short built-in pass-key prompt
  TINY_MODEL_DIR=${TINY_MODEL_DIR:-${TMPDIR:-/tmp}/megatron_apb_tiny_llama}
  "$PYTHON" "$EXAMPLES_DIR/make_tiny_llama.py" --out "$TINY_MODEL_DIR" >/dev/null
  MODEL=${MODEL:-$TINY_MODEL_DIR}
  MASTER_ADDR=127.0.0.1
  MASTER_PORT=${MASTER_PORT:-$(free_port)}
  DTYPE=${DTYPE:-fp32}
  HAYSTACK_TOKENS=${HAYSTACK_TOKENS:-400}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export CUDA_VISIBLE_DEVICES=""
else
  MASTER_PORT=${MASTER_PORT:-6000}
  DTYPE=${DTYPE:-bf16}
  # Megatron's usual settings; NVLink SHARP (NVLS) multicast off
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
  export TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
fi

launcher() {  # launcher NPROC: the torchrun command line for NPROC processes per node
  echo torchrun --nproc-per-node "$1" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
}
