#!/usr/bin/env bash
# Session 4, 4-GPU host, call 1 (issues 6, 3, 5): three independent groups side by side, each on
# its own GPUs (the host's CPUs are shared):
#   GPU 0     scaling baseline, tp=1: batch-1 latency, throughput, batch-64 latency
#   GPUs 1-2  scaling tp=2: batch-1 latency, throughput, 70B FP8 batch-1 latency
#   GPU 3     lane: profile of ~1000-row decode blocks, then batch-1 bf16 / fp8 variants
# Call 2 (s4_x4_call2.sh) runs the all-reduce sweep and the tp=4 configurations alone.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-out}; s=/tmp/scaling; mkdir -p "$out" $s
budget=${1:-500}; deadline=$(( $(date +%s) + budget ))
left() { echo $(( deadline - $(date +%s) )); }
nvidia-smi -L > "$out/gpus.txt" 2>&1
FIRST_GPU=3 bash benchmarks/lanes.sh "$budget" benchmarks/lanes/s4_gpu3_profile_fp8.txt \
    > /dev/null 2>&1 &
( export CUDA_VISIBLE_DEVICES=0
  python3 benchmarks/scaling.py --preset h100x4 --only '8b-lat-tp1|8b-thr-tp1' --skip-allreduce \
      --out $s/g0 --budget-s "$(left)"
  python3 benchmarks/scaling.py --preset h100x4-more --only '8b-lat-b64-tp1' \
      --out $s/g0b --budget-s "$(left)" ) > "$out/g0.log" 2>&1 &
( export CUDA_VISIBLE_DEVICES=1,2
  python3 benchmarks/scaling.py --preset h100x4 --only 'allreduce|8b-lat-tp2' \
      --out $s/g1 --budget-s "$(left)"
  python3 benchmarks/scaling.py --preset h100x4-more --only '8b-thr-tp2$|70b-fp8-lat-tp2' \
      --out $s/g1b --budget-s "$(left)" ) > "$out/g1.log" 2>&1 &
wait
for d in g0 g0b g1 g1b; do mkdir -p "$out/$d"; cp $s/$d/*.json $s/$d/*.md "$out/$d/" 2>/dev/null; done
tail -n 20 "$out"/g0.log "$out"/g1.log "$out"/lane3.log
