#!/usr/bin/env bash
# DeepSpeed inference with APB: DeepSpeed shards a Hugging Face Llama-family model
# (tensor_parallel.tp_size, by its AutoTP), megatron_apb splits the prompt
# over apb.cp_size ranks.  4 GPUs = DeepSpeed TP 2 x APB CP 2 with ds_config_apb.json.
#
#   MODEL=/models/Llama-3.1-8B-Instruct bash examples/deepspeed/generate.sh
#   DS_CONFIG=my_config.json GPUS_PER_NODE=8 MODEL=... bash examples/deepspeed/generate.sh
#   bash examples/deepspeed/generate.sh --cpu        # 4 CPU processes, tiny model, fp32
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh" "$@"

GPUS_PER_NODE=${GPUS_PER_NODE:-4}
DS_CONFIG=${DS_CONFIG:-$EXAMPLES_DIR/deepspeed/ds_config_apb.json}
MODEL=${MODEL:-/models/Llama-3.1-8B-Instruct}
HAYSTACK_TOKENS=${HAYSTACK_TOKENS:-32000}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-32}

if [ "$CPU" != 1 ] && [ ! -d "$MODEL" ]; then
  echo "MODEL=$MODEL is not a Hugging Face model directory (or run with --cpu)" >&2
  exit 2
fi

set -x
$(launcher "$GPUS_PER_NODE") "$EXAMPLES_DIR/deepspeed/generate.py" \
  --model "$MODEL" --ds-config "$DS_CONFIG" --dtype "$DTYPE" \
  --haystack-tokens "$HAYSTACK_TOKENS" --max-new-tokens "$MAX_NEW_TOKENS" \
  ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
