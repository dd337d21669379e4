#!/usr/bin/env bash
# A 34B-class model (e.g. Yi-34B-200K, 60 layers, 56 query / 8 KV heads) on 4 GPUs:
# tensor parallelism TP = 2 inside each pair of GPUs, APB context parallelism CP = 2 across
# the pairs.  bf16 weights take ~69 GB, ~34.5 GB per TP rank; each CP rank prefills half the
# document plus the anchor.  Ranks: TP fastest, so TP groups {0,1} {2,3}, CP groups {0,2} {1,3}
# (keep TP pairs on NVLink neighbours).
#
#   MODEL=/models/Yi-34B-200K bash examples/generate_34b_tp2_cp2.sh
#   MODEL=/models/Yi-34B-200K HEADS=/ckpt/yi34b_heads.safetensors bash examples/generate_34b_tp2_cp2.sh
#   bash examples/generate_34b_tp2_cp2.sh --cpu          # 4 CPU processes, tiny model
#
# Convert once to skip the Hugging Face parse on every launch:
#   python -m megatron_apb.cli convert --model /models/Yi-34B-200K --output /ckpt/yi34b --dtype bf16
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"

GPUS_PER_NODE=${GPUS_PER_NODE:-4}
TP=${TP:-2}
CP=${CP:-2}
MODEL=${MODEL:-/models/Yi-34B-200K}
HAYSTACK_TOKENS=${HAYSTACK_TOKENS:-120000}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-32}
# the reference sizes: anchor = block/4, passing = block/8 (defaults when unset)
ANCHOR_LEN=${ANCHOR_LEN:-}
PASSING_LEN=${PASSING_LEN:-}

if [ "$CPU" != 1 ] && [ ! -e "$MODEL" ]; then
  echo "MODEL=$MODEL does not exist: set MODEL to a 34B-class checkpoint (or run with --cpu)" >&2
  exit 2
fi
if [ $((GPUS_PER_NODE * NNODES)) -ne $((TP * CP)) ]; then
  echo "GPUS_PER_NODE x NNODES ($GPUS_PER_NODE x $NNODES) must equal TP x CP ($TP x $CP)" >&2
  exit 2
fi

APB_ARGS=(--model "$MODEL" --tp "$TP" --cp-mode apb --dtype "$DTYPE")
[ -n "$ANCHOR_LEN" ] && APB_ARGS+=(--anchor-len "$ANCHOR_LEN")
[ -n "$PASSING_LEN" ] && APB_ARGS+=(--passing-len "$PASSING_LEN")
[ -n "${HEADS:-}" ] && APB_ARGS+=(--heads "$HEADS")

set -x
$(launcher "$GPUS_PER_NODE") -m megatron_apb.cli generate \
  "${APB_ARGS[@]}" --haystack-tokens "$HAYSTACK_TOKENS" --max-new-tokens "$MAX_NEW_TOKENS" \
  ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
