#!/usr/bin/env bash
# The 4 x H100 scaling run of 2026-11-28 (issue 6), with single-GPU lanes on the GPUs it leaves
# idle: phase 1 runs tp=1 / tp=2 configs on GPUs 0-1 beside two lanes on GPUs 2-3; phase 2 runs
# the all-reduce sweep and the tp=4 configs on all four.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-out}; s=/tmp/scaling; mkdir -p "$out" $s
FIRST_GPU=2 bash benchmarks/lanes.sh 230 benchmarks/lanes/gpu2_fp8_throughput.txt \
    benchmarks/lanes/gpu3_kernel_tests.txt > /dev/null 2>&1 &
python3 benchmarks/scaling.py --preset h100x4 --only '8b-lat-tp1|8b-lat-tp2|8b-thr-tp1' \
    --skip-allreduce --out $s/p1 --budget-s 230 > "$out/phase1.log" 2>&1
wait
python3 benchmarks/scaling.py --preset h100x4 --only 'allreduce|8b-lat-tp4|70b-lat-tp4' \
    --out $s/p2 --budget-s 255 > "$out/phase2.log" 2>&1
python3 benchmarks/scaling.py merge $s/p1 $s/p2 --out $s/all > /dev/null 2>&1
cp $s/all/scaling.md $s/all/results.json $s/p2/allreduce.json "$out/" 2>/dev/null
tar czf "$out/scaling_logs.tgz" -C $s . 2>/dev/null
cat $s/all/scaling.md 2>/dev/null; tail -n 30 "$out"/lane*.log
