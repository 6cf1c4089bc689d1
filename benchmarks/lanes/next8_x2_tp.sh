#!/usr/bin/env bash
# Next session on a 2-GPU host (issue 6): tp=1 against tp=2 after session 7's warm-up fix.
# Session 6's 5,522 (tp=1) and 5,405 (tp=2) at 256 rows both carried prompt programs compiled
# mid-run; rows now report `compiles` (0 expected). Runs one after another (tp=2 takes both GPUs).
set -u
export NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-out}; mkdir -p "$out"
B="python3 -m imp_jax.cli bench throughput --model random:llama3-8b --num-prompts 1000 --input-len 128 --output-len 128 --no-progress"
CUDA_VISIBLE_DEVICES=0 timeout 200 $B --max-num-seqs 256 --max-num-batched-tokens 2048 --json "$out/tp1_256.json" 2>&1 | grep -e '^row' -e rror
CUDA_VISIBLE_DEVICES=0,1 timeout 220 $B --mesh tp=2 --max-num-seqs 256 --max-num-batched-tokens 2048 --json "$out/tp2_256.json" 2>&1 | grep -e '^row' -e rror
CUDA_VISIBLE_DEVICES=0,1 timeout 220 $B --mesh tp=2 --max-num-seqs 1024 --max-num-batched-tokens 8192 --gpu-memory-utilization 0.85 --json "$out/tp2_1024.json" 2>&1 | grep -e '^row' -e rror
