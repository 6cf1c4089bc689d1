#!/usr/bin/env bash
# Session 9, call 3, 4 x H200 (issue 6): throughput at tp=1/2/4 on one host at the 1024-row
# settings (1000 x 128/128), NCCL's all-reduce in the same call, then the engine's tp=2/4 outputs
# against one device's (scaling.py check). Phase 1: tp=1 (GPU 0) beside tp=2 (GPUs 1-2); phase
# 2: all four GPUs, one job at a time.
budget=${1:-540}
source "$(dirname "$0")/jobs.sh"
nvidia-smi topo -m > "$out/res/topo.txt" 2>&1
run tp1 0 $THR --json "$out/res/tp1.json" &
run tp2 1,2 $THR --mesh tp=2 --json "$out/res/tp2.json" &
wait
run allreduce 0,1,2,3 python3 benchmarks/scaling.py --preset h100x4 --only allreduce \
    --out "$out/res/ar" --budget-s 90
run tp4 0,1,2,3 $THR --mesh tp=4 --json "$out/res/tp4.json"
run check 0,1,2,3 python3 benchmarks/scaling.py --preset h200x4-check --only check \
    --out "$out/res/check" --budget-s "$(left)"
pack
