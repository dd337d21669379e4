#!/usr/bin/env bash
# Retaining-head training for APB's compressor (Locret's recipe): the model is frozen, the
# heads learn to predict, per layer and KV head, the largest logit each prompt token gets
# from the answer.  Writes $OUTPUT/heads.safetensors (reference layout) and train_log.json;
# then: megatron-apb generate --heads $OUTPUT/heads.safetensors ...
#
#   MODEL=/models/Llama-3.1-8B-Instruct bash examples/train_heads.sh      # 1 GPU, built-in tasks
#   GPUS_PER_NODE=2 TP=2 MODEL=... bash examples/train_heads.sh             # heads sharded over TP 2
#   DATA=train.jsonl bash examples/train_heads.sh                           # {"prompt", "answer"} lines
#   bash examples/train_heads.sh --cpu                 # 2 CPU processes (CP 2), tiny model, 4 steps
#
# Processes beyond TP split each prompt over context-parallel ranks (CP = processes / TP).
# Extra arguments go to `megatron-apb train-heads` (see `python -m megatron_apb.cli train-heads -h`).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

if [ "$CPU" = 1 ]; then
  GPUS_PER_NODE=${GPUS_PER_NODE:-2}
  STEPS=${STEPS:-4}
  SAMPLES=${SAMPLES:-4}
  EVAL_SAMPLES=${EVAL_SAMPLES:-2}
  LENGTH=${LENGTH:-300}
  HIDDEN=${HIDDEN:-32}
  BUILTIN=${BUILTIN:-passkey}
  EVAL_EVERY=${EVAL_EVERY:-2}
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-1}
TP=${TP:-1}
MODEL=${MODEL:-}                       # empty: the embedded SmolLM2-135M-Instruct
OUTPUT=${OUTPUT:-$REPO_ROOT/runs/retaining_heads}
DATA=${DATA:-}                         # JSONL of {"prompt": ..., "answer": ...}; empty: built-in
BUILTIN=${BUILTIN:-tasks}              # built-in data: tasks (RULER-style mix) | passkey
STEPS=${STEPS:-3000}
SAMPLES=${SAMPLES:-512}                # built-in training prompts
EVAL_SAMPLES=${EVAL_SAMPLES:-8}
LENGTH=${LENGTH:-8192}                 # built-in prompt length in tokens
MAX_LENGTH=${MAX_LENGTH:-10240}
HIDDEN=${HIDDEN:-1024}
LR=${LR:-5e-4}
EVAL_EVERY=${EVAL_EVERY:-250}

if [ $(((GPUS_PER_NODE * NNODES) % TP)) -ne 0 ]; then
  echo "TP ($TP) must divide GPUS_PER_NODE x NNODES ($GPUS_PER_NODE x $NNODES)" >&2
  exit 2
fi

TRAIN_ARGS=(--steps "$STEPS" --lr "$LR" --hidden "$HIDDEN" --eval-samples "$EVAL_SAMPLES"
            --eval-every "$EVAL_EVERY" --max-length "$MAX_LENGTH" --tp "$TP" --dtype "$DTYPE" --output "$OUTPUT")
if [ -n "$DATA" ]; then
  TRAIN_ARGS+=(--data "$DATA")
else
  TRAIN_ARGS+=(--builtin-data "$BUILTIN" --samples "$SAMPLES" --length "$LENGTH")
fi
[ -n "$MODEL" ] && TRAIN_ARGS+=(--model "$MODEL")

set -x
$(launcher "$GPUS_PER_NODE") -m megatron_apb.cli train-heads \
  "${TRAIN_ARGS[@]}" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
