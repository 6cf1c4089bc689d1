#!/usr/bin/env bash
# Session 4, last call on a 4-GPU host: two single-GPU lanes (issues 3, 4, 5) on GPUs 0-1 and
# the 70B FP8 tensor-parallel latency (issue 6; weights generated per leaf now) on GPUs 2-3.
set -u
export NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-out}; budget=${1:-540}; mkdir -p "$out"
nvidia-smi -L > "$out/gpus.txt" 2>&1
bash benchmarks/lanes.sh "$budget" benchmarks/lanes/s4d_gpu0_long.txt \
    benchmarks/lanes/s4d_gpu1_hf_profile.txt > /dev/null 2>&1 &
CUDA_VISIBLE_DEVICES=2,3 python3 benchmarks/scaling.py --preset h100x4-more \
    --only '70b-fp8-lat-tp2' --out /tmp/s70 --budget-s "$((budget - 10))" > "$out/s70.log" 2>&1
wait
cp -r /tmp/s70 "$out/" 2>/dev/null
tail -n 12 "$out/s70.log" "$out"/lane*.log
# at most 8 files come back from the device tool: everything in one archive
tar czf /tmp/results.tgz -C "$out" . && rm -rf "${out:?}"/* && mv /tmp/results.tgz "$out/"
