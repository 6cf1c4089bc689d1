#!/usr/bin/env bash
# Next session on a 4-GPU host (issue 6): the 1000-prompt throughput at tp=1, 2, 4 (the half of
# the TP table not run yet), then batch-64 latency at tp=4, all on one host. tp=1 and tp=2 run
# side by side on GPUs 0 and 1-2 (GPU 3 idle: the host's CPU is shared, no other lane); tp=4 alone.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-out}; s=/tmp/scaling; mkdir -p "$out" $s
budget=${1:-540}; deadline=$(( $(date +%s) + budget ))
left() { echo $(( deadline - $(date +%s) )); }
nvidia-smi -L > "$s/gpus.txt" 2>&1
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/scaling.py --preset h100x4 --only '8b-thr-tp1' \
    --skip-allreduce --out $s/t1 --budget-s 250 > $s/t1.log 2>&1 &
CUDA_VISIBLE_DEVICES=1,2 python3 benchmarks/scaling.py --preset h100x4-more --only '8b-thr-tp2$' \
    --out $s/t2 --budget-s 250 > $s/t2.log 2>&1 &
wait
python3 benchmarks/scaling.py --preset h100x4 --only 'allreduce|8b-thr-tp4' --out $s/t4 \
    --budget-s "$(left)" > $s/t4.log 2>&1
# 70B with FP8 weights and an FP8 KV cache at tp=2 (8-bit pools on a mesh are new in session 4),
# if ~2 minutes are left (otherwise run it first in a call of its own)
if (( $(left) > 120 )); then
    CUDA_VISIBLE_DEVICES=0,1 timeout "$(left)" python3 -m imp_jax.cli bench latency \
        --model random:llama3-70b --mesh tp=2 --quantization fp8 --kv-cache-dtype fp8 \
        --batch 1,64 --input-len 128 --output-len 64 --json $s/70b_fp8_fp8kv_tp2.json \
        > $s/70b_fp8kv.log 2>&1
fi
python3 benchmarks/scaling.py merge $s/t1 $s/t2 $s/t4 --out $s/all > /dev/null 2>&1
cat $s/all/scaling.md 2>/dev/null | sed -n '/## imp-jax bench/,/^tok/p'
tar czf "$out/scaling.tgz" -C /tmp scaling   # at most 8 files come back: one archive
