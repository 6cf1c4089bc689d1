"""One decode_mgpu call per case inside a CUDA profiler range, for Nsight Compute:

    ncu --clock-control none --profile-from-start off --section WarpStateStats ... \
        python3 benchmarks/decode_once.py [--kv fp8,bf16] [--shape 256x2048x64] [--peer]

Inputs are built, the kernel compiled and run once outside the range (ncu then sees no
compiles, copies or warm-up), then each case's kernel runs once between cuProfilerStart and
cuProfilerStop. Why: e4m3 and bf16 pages get through about the same keys per second at large
batch, so e4m3 pages stream at half the bandwidth (docs/kernels_notes.md, session 14); the
warp-stall breakdown of one CTA says where its time goes. --peer profiles the deprecated
`jax.experimental.pallas.ops.gpu.paged_attention` on the same inputs (bf16 pages) after ours,
so the two kernels' durations compare without the benchmark loop's other ops and launch gaps.
Needs a GPU.
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
    ap.add_argument("--peer", action="store_true",
                    help="also the deprecated Pallas paged_attention (bf16 pages)")
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
    if args.peer:
        calls.append(peer_call(B, ctx, page))
    cuda = ctypes.CDLL("libcuda.so.1")
    for kv, fn, case, scales in calls:
        cfg = "peer" if kv == "peer" else decode_mgpu.resolve_config(
            case[0].shape, case[1].shape, case[3].shape, kv_itemsize=case[1].dtype.itemsize)
        print(f"profiled: {kv} pages, B={B} ctx={ctx} page={page}, {cfg}", flush=True)
        cuda.cuProfilerStart()
        fn(*case, **scales).block_until_ready()
        cuda.cuProfilerStop()


def peer_call(B, ctx, page):
    """The deprecated kernel on the bf16 case: pools as [KVH, P, page, D], the softmax scale
    folded into q (it applies none), as benchmarks/kernels.py runs it."""
    from jax.experimental.pallas.ops.gpu import paged_attention as peer

    from kernels import peer_kwargs   # benchmarks/kernels.py (this folder is on sys.path)

    q, kp, vp, pt, lens, _ = bench_like_case(B, ctx, page=page)
    kt, vt = (jnp.transpose(x, (2, 0, 1, 3)) for x in (kp, vp))
    pkw = peer_kwargs(ctx // page, page)
    fn = jax.jit(lambda q, k, v, pt, ln: peer.paged_attention(
        (q * 128 ** -0.5).astype(q.dtype), k, v, pt, ln, **pkw))
    case = (q, kt, vt, pt, lens)
    fn(*case).block_until_ready()
    return "peer", fn, case, {}


if __name__ == "__main__":
    main()
