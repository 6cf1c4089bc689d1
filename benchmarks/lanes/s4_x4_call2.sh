#!/usr/bin/env bash
# Session 4, 4-GPU host, call 2 (issue 6): the all-reduce sweep and the tp=4 configurations, alone
# on the host (call 1 ran tp=1 and tp=2 on the same host just before).
set -u
export NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-out}; budget=${1:-480}
nvidia-smi -L > "$out/gpus.txt" 2>&1
python3 benchmarks/scaling.py --preset h100x4 --only 'allreduce|8b-lat-tp4|70b-lat-tp4|8b-thr-tp4' \
    --out "$out/p2" --budget-s "$budget" > "$out/p2.log" 2>&1
tail -n 40 "$out/p2.log"
