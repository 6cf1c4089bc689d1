#!/usr/bin/env bash
# Next session on a 2-GPU host (issue 6): why tp=2 throughput was half of tp=1's in session 5
# (decode blocks 3.1x slower per step at 256 rows). One profiled tp=2 run over both GPUs; the
# summary lists the top kernels per GPU and the idle gaps with the host frames in them.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-out}; mkdir -p "$out"
CUDA_VISIBLE_DEVICES=0,1 timeout 400 python3 -m imp_jax.cli bench throughput \
    --model random:llama3-8b --mesh tp=2 --num-prompts 256 --input-len 128 --output-len 64 \
    --max-num-seqs 256 --max-num-batched-tokens 2048 --no-progress --profile /tmp/trace_tp2 \
    --json "$out/thr_tp2_profiled.json" > "$out/tp2.log" 2>&1
python3 benchmarks/trace_summary.py /tmp/trace_tp2 --top 30 --gaps 10 > "$out/trace_tp2.txt" 2>&1
tail -n 3 "$out/tp2.log"; head -n 60 "$out/trace_tp2.txt"
