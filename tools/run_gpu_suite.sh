#!/usr/bin/env bash
# On the GPU machine: GPU tests, the attention-kernel benchmark and the prefill benchmarks.
#   OUT=results/h200x4 bash tools/run_gpu_suite.sh [stage ...]
# Stages: tests attention cp long single peer tp2cp2 fused grid (default: the first five);
#   together   the multi-GPU run of balanced APB, sparse local attention and distributed
#              decoding side by side (3 timed runs each), with the one-GPU emulator's
#              predictions of the same cases for the predicted-vs-measured table.
#   onegpu1    one GPU (H200 for the targets): the decode and sparse kernels' GPU tests, decoding
#              (ours, HF sdpa, the bound) at 8K-512K with batch 1/8 at 32K, the sparse kernels vs
#              dense at 128K-512K.  onegpu2: sparse prefill vs dense at 128K-512K (8B shape), 1M
#              tokens with SnapKV, the emulator's balanced blocks refined from measured rank times
#              (128K), and at 256K/512K against the committed 4xH200 figures.
#              Each fits one 10-minute call.  Each stage has a time limit so one
# failure cannot eat the machine's time.  NVLink multicast stays off (shared hosts).
set -u
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
NG=$(python3 -c "import torch; print(torch.cuda.device_count())")
CP_LENGTHS=${CP_LENGTHS:-"32768 131072"}
SINGLE_LENGTHS=${SINGLE_LENGTHS:-"32768 131072"}
LONG_LENGTHS=${LONG_LENGTHS:-"524288"}
stages=${*:-tests attention cp long single}
TR="torchrun --standalone --nproc-per-node $NG"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }
for stage in $stages; do
  case $stage in
    tests)
      log "GPU tests on $NG GPUs"
      timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q tests/test_gpu.py ${TEST_ARGS:-} 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt" ;;
    attention)
      log "attention kernels"
      timeout 120 python3 tools/bench_attention.py --out "$OUT/attention.json" 2>&1 | tail -12 | tee -a "$OUT/log.txt" ;;
    cp)
      log "prefill on $NG GPUs: $CP_LENGTHS"
      timeout ${CP_TIMEOUT:-300} $TR tools/bench_prefill.py \
        --lengths $CP_LENGTHS --modes exact ulysses star apb --breakdown --decode 20 ${BENCH_ARGS:-} \
        --out "$OUT/prefill_cp$NG.json" 2>&1 | grep -v Warning | tail -20 | tee -a "$OUT/log.txt" ;;
    long)
      log "prefill on $NG GPUs, long: $LONG_LENGTHS (one timed run each)"
      timeout ${LONG_TIMEOUT:-240} $TR tools/bench_prefill.py \
        --lengths $LONG_LENGTHS --modes apb star ulysses --iters 1 --warmup 0 \
        --out "$OUT/prefill_cp${NG}_long.json" 2>&1 | grep -v Warning | tail -8 | tee -a "$OUT/log.txt" ;;
    single)
      log "prefill on 1 GPU: $SINGLE_LENGTHS"
      timeout ${SINGLE_TIMEOUT:-240} python3 tools/bench_prefill.py --lengths $SINGLE_LENGTHS \
        --modes exact --hf --decode 20 --decode-mode exact --out "$OUT/prefill_1gpu.json" 2>&1 | grep -v Warning | tail -10 | tee -a "$OUT/log.txt" ;;
    peer)
      log "PyTorch context_parallel peer and APB, profiled per rank"
      timeout ${PEER_TIMEOUT:-240} $TR tools/bench_prefill.py --lengths $CP_LENGTHS --modes torch_cp apb \
        --iters 2 --warmup 1 --breakdown --top-kernels 15 --out "$OUT/prefill_cp${NG}_peer.json" 2>&1 \
        | grep -E "^\{|torch_cp|rror" | cut -c1-300 | tee -a "$OUT/log.txt" ;;
    tp2cp2)
      log "TP2 x CP$((NG / 2)), ${TP_SHAPE:-qwen2.5-14b} shape"
      timeout ${TP_TIMEOUT:-300} $TR tools/bench_prefill.py --shape ${TP_SHAPE:-qwen2.5-14b} --tp 2 \
        --lengths $CP_LENGTHS --modes exact ulysses star apb --iters 1 --warmup 1 --breakdown \
        --out "$OUT/prefill_tp2cp$((NG / 2))_${TP_SHAPE:-qwen2.5-14b}.json" 2>&1 | grep -E "^\{|rror" | cut -c1-300 | tee -a "$OUT/log.txt" ;;
    fused)
      log "before/after: fused RMSNorm, RoPE, SwiGLU (same lengths, same call)"
      for f in --no-fused --fused; do
        timeout ${FUSED_TIMEOUT:-200} $TR tools/bench_prefill.py --lengths ${FUSED_LENGTHS:-131072} --modes ulysses apb \
          --iters 2 --warmup 1 --breakdown --top-kernels 15 $f --out "$OUT/prefill_cp${NG}_${f#--}.json" 2>&1 \
          | grep -E "^\{|rror" | cut -c1-300 | tee -a "$OUT/log.txt"
      done ;;
    grid)
      log "the rest of the grid: 64K, exact at 256K/512K, 1M"
      timeout ${GRID_TIMEOUT:-420} $TR tools/bench_prefill.py --lengths 65536 --modes exact ulysses star apb torch_cp \
        --out "$OUT/prefill_cp${NG}_64k.json" 2>&1 | grep -E "^\{|rror" | cut -c1-300 | tee -a "$OUT/log.txt"
      timeout ${GRID_TIMEOUT:-420} $TR tools/bench_prefill.py --lengths 262144 524288 --modes exact --iters 1 --warmup 0 \
        --out "$OUT/prefill_cp${NG}_long_exact.json" 2>&1 | grep -E "^\{|rror" | cut -c1-300 | tee -a "$OUT/log.txt"
      timeout ${GRID_TIMEOUT:-420} $TR tools/bench_prefill.py --lengths 1048576 --modes apb --iters 1 --warmup 0 \
        --out "$OUT/prefill_cp${NG}_1m.json" 2>&1 | grep -E "^\{|rror|memory" | cut -c1-300 | tee -a "$OUT/log.txt" ;;
    together)
      log "grid on $NG GPUs: equal and balanced APB, sparse local attention, the peers (3 runs each)"
      for part in equal balanced; do
        modes="apb"; [ $part = equal ] && modes="exact ulysses star apb apb+minference torch_cp"
        timeout ${TOGETHER_TIMEOUT:-600} $TR tools/bench_prefill.py --lengths ${TOGETHER_LENGTHS:-32768 131072 524288} \
          --modes $modes --partition $part --iters 3 --warmup 1 --out "$OUT/prefill_cp${NG}_${part}.json" 2>&1 \
          | grep -E "^\{|rror" | cut -c1-300 | tee -a "$OUT/log.txt"
      done
      log "decoding after 128K on $NG GPUs (exact and APB prefill) and on one GPU (ours and HF)"
      timeout 300 $TR tools/bench_prefill.py --lengths 131072 --modes exact apb --iters 1 --warmup 1 --decode 32 \
        --out "$OUT/decode_cp${NG}_128k.json" 2>&1 | grep -E "^\{|rror" | cut -c1-300 | tee -a "$OUT/log.txt"
      timeout 300 python3 tools/bench_decode_model.py --lengths 131072 --steps 32 --batch-sizes --out "$OUT/decode_1gpu_128k.json" \
        2>&1 | grep -v -i warn | cut -c1-300 | tee -a "$OUT/log.txt"
      log "the emulator's predictions of the same cases (one GPU)"
      timeout 600 python3 tools/emulate_prefill.py --world $NG --lengths ${TOGETHER_LENGTHS:-32768 131072 524288} \
        --layers-at 32768=8 131072=8 524288=2 --modes exact ulysses star apb --partition equal balanced \
        --validate "$OUT/prefill_cp${NG}_equal.json" "$OUT/prefill_cp${NG}_balanced.json" \
        --out "$OUT/emulator_cp${NG}.json" 2>&1 | grep -v -i warn | tail -30 | tee -a "$OUT/log.txt" ;;
    onegpu1)
      log "GPU tests of the decode and sparse kernels (bf16)"
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "sparse or decode or split_kv" 2>&1 \
        | tail -12 | tee "$OUT/gpu_tests_kernels.txt" | tee -a "$OUT/log.txt"
      log "decoding after 8K-512K: ours, HF sdpa, the bound; batch 1 and 8 at 32K"
      timeout 270 python3 tools/bench_decode_model.py --lengths 8192 32768 131072 524288 --steps 32 --batch-sizes 1 8 \
        --batch-length 32768 --modes ours hf --out "$OUT/decode_1gpu.json" 2>&1 | grep -v -i warn | cut -c1-300 | tee -a "$OUT/log.txt"
      log "sparse kernels vs dense attention, one layer, 128K-512K"
      timeout 150 python3 tools/bench_sparse.py --lengths 131072 262144 524288 --block-topk 64 256 \
        --vertical-slash 1024:3072 --a-shape 128:4096 --out "$OUT/sparse_kernels.json" 2>&1 | grep -v -i warn | tail -12 | tee -a "$OUT/log.txt" ;;
    onegpu2)
      log "sparse prefill (minference) vs dense (exact), one GPU, 8B shape (4 of its layers), 128K-512K"
      timeout 200 python3 tools/bench_prefill.py --layers 4 --lengths 131072 262144 524288 --modes exact minference --iters 1 --warmup 1 \
        --out "$OUT/prefill_1gpu_sparse.json" 2>&1 | grep -E "^\{|rror" | cut -c1-300 | tee -a "$OUT/log.txt"
      log "1M tokens on one GPU: sparse prefill, SnapKV cache, 16 decoded tokens (4 of 32 layers, scaled)"
      timeout 150 python3 tools/bench_long_prefill.py --length 1048576 --layers 4 --sparse minference --kv-budget 4096 \
        --kv-window 64 --decode 16 --out "$OUT/long_prefill_1m.json" 2>&1 | grep -v -i warn | tail -12 | tee -a "$OUT/log.txt"
      log "the emulator, CP4 at 128K: equal vs balanced blocks, then rebalanced from the measured rank times"
      timeout 120 python3 tools/emulate_prefill.py --world 4 --lengths 131072 --layers 4 --modes apb \
        --partition equal balanced --refine 2 --refine-below 1.03 --out "$OUT/emulator_cp4_128k_refined.json" 2>&1 \
        | grep -v -i warn | tail -12 | tee -a "$OUT/log.txt"
      log "the emulator at 256K and 512K against the committed 4xH200 figures (unfused, as they ran)"
      timeout 100 python3 tools/emulate_prefill.py --world 4 --lengths 262144 524288 --layers 2 --modes ulysses star apb \
        --partition equal --no-fused --validate results/h200x4/prefill_cp4_long.json results/h200x4/prefill_cp4_long_star.json \
        --out "$OUT/emulator_cp4_long_validation.json" 2>&1 | grep -v -i warn | tail -20 | tee -a "$OUT/log.txt" ;;
    *)
      echo "unknown stage $stage (see the top of this script)" >&2; exit 2 ;;
  esac
done
log done
