"""One decode_mgpu call per case inside a CUDA profiler range, for Nsight Compute:

    ncu --clock-control none --profile-from-start off --section WarpStateStats ... \
        python3 benchmarks/decode_once.py [--kv fp8,bf16] [--shape 256x2048x64]

Inputs are built, the kernel compiled and run once outside the range (ncu then sees no
compiles, copies or warm-up), then each case's kernel runs once between cuProfilerStart and
cuProfilerStop. Why: e4m3 and bf16 pages get through about the same keys per second at large
batch, so e4m3 pages stream at half the bandwidth (docs/kernels_notes.md, session 14); the
warp-stall breakdown of one CTA says where its time goes. Needs a GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels import decode_mgpu  # noqa: E402
from tests.test_decode_mgpu import bench_like_case, quantized  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv", default="fp8,bf16", help="comma list of fp8, bf16")
    ap.add_argument("--shape", default="256x2048x64", help="BATCHxCTXxPAGE")
    args = ap.parse_args(argv)
    if jax.default_backend() != "gpu":
        ap.error("needs a GPU (Nsight Compute profiles the compiled kernel)")
    try:
        B, ctx, page = (int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        ap.error(f"--shape {args.shape!r}: expected BATCHxCTXxPAGE, e.g. 256x2048x64")
    kvs = [k for k in args.kv.split(",") if k]
    if bad := [k for k in kvs if k not in ("fp8", "bf16")]:
        ap.error(f"--kv {bad}: allowed fp8, bf16")
    calls = []
    for kv in kvs:
        case = bench_like_case(B, ctx, page=page)
        scales = {}
        if kv == "fp8":
            case, scales = quantized(case)
        fn = jax.jit(lambda *a, **k: decode_mgpu.paged_decode_mgpu(*a, scale=128 ** -0.5, **k))
        fn(*case, **scales).block_until_ready()             # compile + one run, unprofiled
        calls.append((kv, fn, case, scales))
    cuda = ctypes.CDLL("libcuda.so.1")
    for kv, fn, case, scales in calls:
        cfg = decode_mgpu.resolve_config(case[0].shape, case[1].shape, case[3].shape,
                                         kv_itemsize=case[1].dtype.itemsize)
        print(f"profiled: {kv} pages, B={B} ctx={ctx} page={page}, {cfg}", flush=True)
        cuda.cuProfilerStart()
        fn(*case, **scales).block_until_ready()
        cuda.cuProfilerStop()


if __name__ == "__main__":
    main()
