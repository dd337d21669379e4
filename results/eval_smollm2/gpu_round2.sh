#!/usr/bin/env bash
# Second accuracy round on 4xH200 (run from the repository root on the GPU machine): trains
# SmolLM2 retaining heads, continues the suite where round 1 (r1/*.json) stopped, then runs
# APB with the trained heads.  Inputs, made on a CPU machine beforehand:
#   SAMPLES  `megatron-apb tasks --lengths 4096,8192 --samples 12 --output samples_4k_8k.jsonl`
#   TRAIN / HELDOUT  prompt/answer JSONL from megatron_apb.training.data.builtin_records
#                    (256 training prompts, seed 0; 16 held-out, seed 1; 4096 tokens)
#   MODEL    SmolLM2-135M-Instruct converted with `megatron-apb convert` (fp32)
# Writes under OUT: heads.safetensors, train_log.json, r2.tgz (records and logs).
set -u
: "${SAMPLES:?}" "${TRAIN:?}" "${HELDOUT:?}" "${MODEL:?}" "${R1:?}" "${OUT:?}"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
work=/tmp/r2; mkdir -p "$work"
if command -v nvidia-cuda-mps-control >/dev/null 2>&1 && nvidia-cuda-mps-control -d; then
  echo "MPS daemon started"; mps=1
else
  echo "no MPS: processes sharing a GPU are time-sliced"; mps=0
fi
# heads: fp32 backbone (as the evaluation), hidden 128 (the reference's 1024 is for 4096-wide
# models; SmolLM2 is 576 wide)
(CUDA_VISIBLE_DEVICES=0 timeout "${TRAIN_LIMIT_S:-170}" python3 -m megatron_apb.cli train-heads --model "$MODEL" \
  --data "$TRAIN" --eval-data "$HELDOUT" --steps "${STEPS:-400}" --hidden 128 --dtype fp32 \
  --eval-every 200 --save-every 100 --log-every 50 --max-length 4400 --output /tmp/heads \
  > "$work/train.log" 2>&1; echo "train-heads exit $?" >> "$work/train.log") &
MODEL=$MODEL JOBS=4 LIMIT_S=${ROUND_A_S:-300} TAG=r2_ SKIP_FROM="$(ls "$R1"/*.json | tr '\n' ' ')" \
  bash tools/eval_suite.sh "$work" "$SAMPLES" 2>&1 | tail -5
wait
tail -4 "$work/train.log"
if [ -f /tmp/heads/heads.safetensors ]; then
  MODEL=$MODEL HEADS=/tmp/heads/heads.safetensors FULL=0 JOBS=2 LIMIT_S=${ROUND_B_S:-200} TAG=r3_ \
    bash tools/eval_suite.sh "$work" "$SAMPLES" --modes apb --compressors retaining_head 2>&1 | tail -5
  cp /tmp/heads/heads.safetensors /tmp/heads/train_log.json "$OUT/"
fi
[ "$mps" = 1 ] && (echo quit | nvidia-cuda-mps-control)
tar czf "$OUT/r2.tgz" -C "$work" .
ls -la "$OUT"
