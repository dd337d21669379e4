#!/usr/bin/env bash
# Long-context generation on 4 GPUs: APB prefill with context parallelism CP = 4 (TP = 1),
# then exact distributed decoding.  Prints the answer and prefill / first-token timings.
#
#   MODEL=/models/Llama-3.1-8B-Instruct bash examples/generate_cp4.sh
#   bash examples/generate_cp4.sh --cpu                 # 4 CPU processes, tiny model
#   bash examples/generate_cp4.sh --document-file book.txt --question "Who ...?"
#
# Extra arguments go to `megatron-apb generate` (see `python -m megatron_apb.cli generate -h`).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

GPUS_PER_NODE=${GPUS_PER_NODE:-4}
TP=${TP:-1}
CP=${CP:-4}
MODEL=${MODEL:-}                       # empty: the embedded SmolLM2-135M-Instruct
HAYSTACK_TOKENS=${HAYSTACK_TOKENS:-32000}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-32}
CP_MODE=${CP_MODE:-apb}                # apb | star | exact | ulysses
COMPARE=${COMPARE:-exact}              # also run these modes on the same prompt ("" for none)

if [ $((GPUS_PER_NODE * NNODES)) -ne $((TP * CP)) ]; then
  echo "GPUS_PER_NODE x NNODES ($GPUS_PER_NODE x $NNODES) must equal TP x CP ($TP x $CP)" >&2
  exit 2
fi

APB_ARGS=(--cp-mode "$CP_MODE" --tp "$TP" --dtype "$DTYPE")
[ -n "${ANCHOR_LEN:-}" ] && APB_ARGS+=(--anchor-len "$ANCHOR_LEN")
[ -n "${PASSING_LEN:-}" ] && APB_ARGS+=(--passing-len "$PASSING_LEN")
[ -n "${HEADS:-}" ] && APB_ARGS+=(--heads "$HEADS")
[ -n "$COMPARE" ] && APB_ARGS+=(--compare $COMPARE)
[ -n "$MODEL" ] && APB_ARGS+=(--model "$MODEL")
PROMPT_ARGS=(--haystack-tokens "$HAYSTACK_TOKENS" --max-new-tokens "$MAX_NEW_TOKENS")

set -x
$(launcher "$GPUS_PER_NODE") -m megatron_apb.cli generate \
  "${APB_ARGS[@]}" "${PROMPT_ARGS[@]}" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
