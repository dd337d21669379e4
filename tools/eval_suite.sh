#!/usr/bin/env bash
# The accuracy suite on one machine: the single-process `full` reference and every method at
# each rank count, with the samples split over parallel jobs.  Ranks talk through gloo, so
# they may outnumber the GPUs (jobs are spread round-robin over the GPUs there are) or run on
# CPU.  Ends with the markdown table of everything under OUT_DIR.
#
#   bash tools/eval_suite.sh OUT_DIR SAMPLES.jsonl [extra `megatron-apb eval` flags...]
#
# env: MODEL (default: the embedded SmolLM2), HEADS (retaining heads; adds apb-retaining_head),
#      RANKS ("2 4 8"), FULL (1: also the one-process reference), JOBS (parallel jobs per rank
#      count, default 1), DTYPE (fp32), LIMIT_S (per-job time limit in seconds; a job cut
#      short keeps the samples it finished), SKIP_FROM (earlier outputs, not run again),
#      TAG (file-name prefix), MPS (1: run NVIDIA MPS so the processes sharing a GPU run
#      concurrently instead of time-sliced).
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n 2,12p "$0" >&2
  exit 2
fi
out=$1; samples=$2; shift 2
mkdir -p "$out"
ranks=${RANKS:-"2 4 8"}
jobs=${JOBS:-1}
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L | wc -l); fi
model_args=()
[ -n "${MODEL:-}" ] && model_args+=(--model "$MODEL")
[ -n "${HEADS:-}" ] && model_args+=(--heads "$HEADS")
limit=${LIMIT_S:-0}
tag=${TAG:-}
skip=()
[ -n "${SKIP_FROM:-}" ] && skip=(--skip-from $SKIP_FROM)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mps=0
if [ "${MPS:-0}" = 1 ] && [ "$gpus" -gt 0 ] && command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
  if nvidia-cuda-mps-control -d; then mps=1; echo "MPS daemon started"; fi
fi

launch() {  # launch NPROC JOB_INDEX NAME ARGS...
  local nproc=$1 job=$2 name=$3; shift 3
  local env_gpu=()
  if [ "$gpus" -gt 0 ]; then  # rotate the visible GPUs so that jobs start on different ones
    local order=()
    for ((g = 0; g < gpus; g++)); do order+=($(((g + job) % gpus))); done
    env_gpu=(env "CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${order[*]}")")
  fi
  local runner=(python -m megatron_apb.cli)
  [ "$nproc" -gt 1 ] && runner=(python -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m megatron_apb.cli)
  local tl=()
  [ "$limit" -gt 0 ] && tl=(timeout "$limit")
  "${tl[@]}" "${env_gpu[@]}" "${runner[@]}" eval --samples-file "$samples" --comm-backend gloo \
    --dtype "${DTYPE:-fp32}" "${model_args[@]}" "${skip[@]}" "$@" --output "$out/$tag$name.json" >"$out/$tag$name.log" 2>&1 &
}

job=0
for ((k = 0; k < jobs; k++)); do
  if [ "${FULL:-1}" = 1 ]; then launch 1 $job "full_s$k" --shard "$k/$jobs" "$@"; job=$((job + 1)); fi
  for r in $ranks; do
    launch "$r" $job "cp${r}_s$k" --shard "$k/$jobs" "$@"; job=$((job + 1))
  done
done
status=0
wait || status=$?
if [ "$mps" = 1 ]; then echo quit | nvidia-cuda-mps-control || true; fi
for log in "$out"/$tag*.log; do
  if ! grep -q "^wrote .* records" "$log"; then
    echo "== $log did not finish (time limit or error):" >&2
    grep -E "error|Error" "$log" | grep -v -i warn | tail -3 >&2 || true
  fi
done
python -m megatron_apb.cli eval-report "$out"/*.json --output "$out/report.md"
exit $status
