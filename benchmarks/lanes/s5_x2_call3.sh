#!/usr/bin/env bash
# Session 5, call 3, on a 2-GPU host. Phase 1 side by side: GPU 0 profiles a ~1000-row run with
# the Python tracer on (IMP_JAX_PROFILE_PYTHON=1), so trace_summary names the host work in each
# idle gap (issue 3); GPU 1 runs the 1000-prompt throughput at tp=1 (issue 6). Phase 2: NCCL
# all-reduce and the same throughput at tp=2 over both GPUs.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-out}; s=/tmp/scaling; mkdir -p "$out" $s
budget=${1:-540}; deadline=$(( $(date +%s) + budget ))
left() { echo $(( deadline - $(date +%s) )); }
(CUDA_VISIBLE_DEVICES=0 IMP_JAX_PROFILE_PYTHON=1 timeout 250 python3 -m imp_jax.cli bench throughput \
    --model random:llama3-8b --num-prompts 1024 --input-len 128 --output-len 24 --max-num-seqs 1024 \
    --max-num-batched-tokens 8192 --decode-steps 8 --gpu-memory-utilization 0.85 --no-progress \
    --profile /tmp/trace --json "$out/thr_profiled_py.json" > "$out/profile.log" 2>&1 \
    && python3 benchmarks/trace_summary.py /tmp/trace --top 12 --gaps 30 > "$out/trace_gaps_py.txt" 2>&1) &
CUDA_VISIBLE_DEVICES=1 python3 benchmarks/scaling.py --preset h100x2 --only '8b-thr-tp1$' \
    --skip-allreduce --out $s/t1 --budget-s 250 > $s/t1.log 2>&1 &
wait
python3 benchmarks/scaling.py --preset h100x2 --only 'allreduce|8b-thr-tp2$' --out $s/t2 \
    --budget-s "$(left)" > $s/t2.log 2>&1
python3 benchmarks/scaling.py merge $s/t1 $s/t2 --out $s/all > /dev/null 2>&1
cat $s/all/scaling.md 2>/dev/null | sed -n '/## imp-jax bench/,/^tok/p'
grep -v "^W1128\|Delay kernel" "$out/profile.log" | tail -3
tar czf "$out/scaling.tgz" -C /tmp scaling
