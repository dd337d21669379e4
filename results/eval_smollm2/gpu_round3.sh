#!/usr/bin/env bash
# Third accuracy round on 4xH200 (run from the repository root on the GPU machine), with
# decoding on the last rank alone: retrains the SmolLM2 retaining heads (the earlier rounds'
# heads were not kept, so every apb-retaining_head answer is redone with the new ones),
# continues the other methods where the earlier rounds stopped, and runs APB with the heads.
# Resumable: run it again with R=2, 3... and it skips everything already under /tmp/r3.
#   SAMPLES  `megatron-apb tasks --lengths 4096,8192 --samples 12 --seed 0 --output samples_4k_8k.jsonl`
#   TRAIN / HELDOUT  prompt/answer JSONL from megatron_apb.training.data.builtin_records
#                    (256 training prompts, seed 0; 16 held-out, seed 1; 4096 tokens)
#   MODEL    SmolLM2-135M-Instruct converted with `megatron-apb convert` (fp32)
#   PRIOR    records.json of the earlier rounds
#   BUDGET_S seconds for this run (default 520); OUT: where heads, logs and records go
set -u
: "${SAMPLES:?}" "${TRAIN:?}" "${HELDOUT:?}" "${MODEL:?}" "${PRIOR:?}" "${OUT:?}"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
R=${R:-1}
work=/tmp/r3; mkdir -p "$work"
deadline=$((SECONDS + ${BUDGET_S:-520}))
python3 - "$PRIOR" /tmp/prior_other.json <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
keep = [r for r in data["records"] if r["method"] != "apb-retaining_head"]
json.dump(dict(meta=data["meta"], records=keep), open(sys.argv[2], "w"))
print(f"earlier rounds: {len(keep)} records kept, {len(data['records']) - len(keep)} retaining-head records to redo")
EOF
skip_from() { echo /tmp/prior_other.json $(ls "$work"/*.json 2>/dev/null | grep -v report); }
if [ ! -f /tmp/heads/heads.safetensors ]; then
  (CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m megatron_apb.cli train-heads --model "$MODEL" \
    --data "$TRAIN" --eval-data "$HELDOUT" --steps 400 --hidden 128 --dtype fp32 \
    --eval-every 200 --save-every 100 --log-every 50 --max-length 4400 --output /tmp/heads \
    > "$work/train.log" 2>&1; echo "train-heads exit $?" >> "$work/train.log") &
  train=$!
else
  train=
fi
MODEL=$MODEL FULL=0 JOBS=${JOBS_A:-4} LIMIT_S=$((deadline - SECONDS)) TAG=a${R}_ SKIP_FROM="$(skip_from)" \
  bash tools/eval_suite.sh "$work" "$SAMPLES" --modes exact,star,apb --compressors query_attention,random \
  > "$work/a${R}.out" 2>&1 &
suite_a=$!
[ -n "$train" ] && wait "$train"
tail -3 "$work/train.log" 2>/dev/null
if [ -f /tmp/heads/heads.safetensors ]; then
  sha256sum /tmp/heads/heads.safetensors | tee "$work/heads.sha256"
  MODEL=$MODEL HEADS=/tmp/heads/heads.safetensors FULL=0 JOBS=${JOBS_B:-3} LIMIT_S=$((deadline - SECONDS)) \
    TAG=b${R}_ SKIP_FROM="$(skip_from)" \
    bash tools/eval_suite.sh "$work" "$SAMPLES" --modes apb --compressors retaining_head > "$work/b${R}.out" 2>&1
fi
wait "$suite_a"
cp /tmp/heads/train_log.json "$OUT/" 2>/dev/null
cp /tmp/heads/heads.safetensors "$OUT/" 2>/dev/null
tar czf "$OUT/r3.tgz" -C "$work" --exclude=report.md .
tail -n 2 "$work"/*.out
