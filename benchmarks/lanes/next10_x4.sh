#!/usr/bin/env bash
# Next session, one 4 x H200 (or H100) call of ~400 s (issues 3, 6, 4). Put the tree before
# session 9's host-work change in .snap_old first (git archive 77b8f76 | tar x -C .snap_old) and
# carry it.
#   GPU 0     1000 x 128/128 at 1024 rows: 77b8f76 then this tree, back to back (host work per
#             decode block 34 -> 7 ms on CPU; on the GPU untimed)
#   GPUs 1-2  tp=2 at 1024 rows, this tree (18,826 in session 9 with the old host path), then
#             the e4m3 64 x 4k decode sweep that disagreed with session 8 (435.9 vs 335.8 us)
#   GPU 3     fused_quant kernels vs XLA (benchmarks/gemm.py --part fused_quant) + GPU tests,
#             then an 8192-token FP8 prompt step with IMP_JAX_FUSED_QUANT=0 and =1
# then all four GPUs: tp=4 at 1024 rows (24,798 before). Other calls: the 8B tp check
# (`scaling.py --preset h200x4-check --only check --budget-s 300`, ~250 s on 4 GPUs) and FP8 +
# FP8 KV at 1000/1000 (`next10_fp8_1k1k.txt`, ~500 s on one GPU: its warm-up took 353 s).
budget=${1:-420}
source "$(dirname "$0")/jobs.sh"
( cd ../.snap_old && PYTHONPATH=/tmp/site:$PWD run tp1_old 0 $THR --json "$out/res/tp1_old.json"
  cd - > /dev/null && run tp1 0 $THR --json "$out/res/tp1.json" ) &
( run tp2 1,2 $THR --mesh tp=2 --json "$out/res/tp2.json"
  run fp8_sweep 1 python3 benchmarks/kernels.py --mgpu-only --kv fp8 --mgpu-sweep \
      --shapes 64x4096 --reps 10 --budget-s 60 --out "$out/res/kern_fp8" ) &
# GPU 3: session 10's fused W8A8 activation quantization, kernels against XLA, then its GPU tests
( run fused_quant 3 python3 benchmarks/gemm.py --part fused_quant --budget-s 90 \
      --out "$out/res/fused_quant.json"
  run fused_tests 3 python3 -m pytest -q -m gpu tests/test_fused_quant.py -p no:cacheprovider
  # one 8192-token FP8 prompt program end to end, fused quantization off then on
  for f in 0 1; do
    IMP_JAX_FUSED_QUANT=$f run fp8_prompt_fused$f 3 python3 benchmarks/mixed_step.py \
        --model random:llama3-8b --quantization fp8 --prompts 64 --decode 0 --modes all \
        --reps 5 --json "$out/res/fp8_prompt_fused$f.json"
  done ) &
wait
run tp4 0,1,2,3 $THR --mesh tp=4 --json "$out/res/tp4.json"
pack
