#!/usr/bin/env bash
# Session 9, call 4, 2 x H200 (issue 6): where a tp=2 decode step at ~1024 rows goes (call 3: 33 ms
# per step at tp=2 against 35 ms at tp=1, while the mixed steps scaled 1.46x). Profiled, 32 output
# tokens (4 decode blocks) to keep the traces small; summarised on the machine.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-out}; mkdir -p "$out"
CUDA_VISIBLE_DEVICES=0,1 timeout 170 python3 -m imp_jax.cli bench throughput --model random:llama3-8b \
    --num-prompts 1024 --input-len 128 --output-len 32 --max-num-seqs 1024 \
    --max-num-batched-tokens 8192 --decode-steps 8 --gpu-memory-utilization 0.85 --no-progress \
    --mesh tp=2 --profile /tmp/tr --json "$out/tp2_profiled.json" 2>&1 | grep -e '^row' -e warm-up -e rror
timeout 45 python3 benchmarks/trace_summary.py /tmp/tr --top 40 --gaps 8 > "$out/trace_tp2.txt" 2>&1
echo "summary rc $?"; head -c 3000 "$out/trace_tp2.txt"
