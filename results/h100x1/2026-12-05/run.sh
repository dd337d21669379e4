#!/usr/bin/env bash
# One GPU call on the merged tree, most valuable first (a run cut short keeps what it wrote):
# decoding (issue 15), the emulator (issue 20), DeepSpeed on one GPU (issue 19), the
# emulator's validation, 8B loading + 128K generate (issue 16), the new kernels' GPU tests.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD
L=$OUT/log.txt
sec() { echo "=== $(date +%T) $*" | tee -a $L; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $L; df -h /tmp | tail -1 | tee -a $L
(timeout 400 python3 tools/make_random_checkpoint.py --shape llama3-8b --tokenizer TOKENIZER_DIR --out /tmp/llama3-8b-random > $OUT/make_ckpt.txt 2>&1 &)
sec decode; timeout 150 python3 tools/bench_decode_model.py --lengths 8192 32768 131072 --steps 16 --warmup 3 --batch-sizes 1 8 32 --batch-length 32768 --modes ours hf --out $OUT/decode_1gpu.json 2>&1 | grep -v -i warn | cut -c1-300 | tee -a $L
sec emulator; timeout 80 python3 tools/emulate_prefill.py --world 4 --lengths 131072 --layers 4 --modes exact star apb --partition equal balanced --out $OUT/emulator_cp4_128k.json 2>&1 | grep -v -i warn | tail -20 | tee -a $L
sec deepspeed; python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site WHEELS/*.whl 2>&1 | tail -2; DS_BUILD_OPS=0 timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k deepspeed 2>&1 | tail -8 | tee $OUT/gpu_tests_deepspeed.txt | tee -a $L
sec validation; timeout 55 python3 tools/emulate_prefill.py --world 4 --lengths 131072 --layers 4 --modes exact ulysses star apb --partition equal --no-fused --validate results/h200x4/prefill_cp4_128k.json results/h200x4/prefill_cp4_peer.json --out $OUT/emulator_cp4_validation.json 2>&1 | grep -v -i warn | tail -20 | tee -a $L
sec load; for i in $(seq 30); do [ -f /tmp/llama3-8b-random/model.safetensors.index.json ] && ! pgrep -f make_random_checkpoint >/dev/null && break; sleep 2; done; tail -3 $OUT/make_ckpt.txt | tee -a $L
timeout 150 python3 tools/bench_load.py --model /tmp/llama3-8b-random --generate-tokens 128000 --max-new-tokens 16 --out $OUT/load_llama3_8b.json 2>&1 | grep -v -i warn | tail -30 | tee -a $L
sec gpu-tests; timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "sparse or decode or split_kv" 2>&1 | tail -12 | tee $OUT/gpu_tests.txt | tee -a $L
sec end
