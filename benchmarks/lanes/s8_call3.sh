#!/usr/bin/env bash
# Session 8, call 3 on a 2-GPU host: two lanes side by side, then tp=2 at 256 rows on both GPUs.
set -u
bash benchmarks/lanes.sh 300 benchmarks/lanes/s8_gpu0_xla.txt benchmarks/lanes/s8_gpu1_fp8kv_tp1.txt
export NCCL_NVLS_ENABLE=0 PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
echo "=== $(date +%T) tp=2, 256 rows"
CUDA_VISIBLE_DEVICES=0,1 timeout 230 python3 -m imp_jax.cli bench throughput --model random:llama3-8b --num-prompts 1000 --input-len 128 --output-len 128 --no-progress --mesh tp=2 --max-num-seqs 256 --max-num-batched-tokens 2048 --json "$OUT/tp2_256.json" 2>&1 | grep -e '^row' -e rror -e 'warm-up'
echo "=== rc ${PIPESTATUS[0]}"
