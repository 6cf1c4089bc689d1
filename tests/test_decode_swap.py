"""Keys-major paged decode (pallas_kernels/decode_swap.py) vs the jnp reference.

CPU: interpret mode on small ragged batches (bf16 and e4m3 pages, GQA 1 / 4 / 16, head_dim 64
/ 128, pages smaller and larger than a block, 1-3 splits incl. splits past a sequence's end,
padding sequences and tokens), one case under the race detector; Hopper lowering at benchmark
shapes; the input checks. GPU (`-m gpu`): the compiled kernel at benchmark shapes.
"""

from __future__ import annotations

import os
import sys

import pytest

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests import mgpu_interpret  # noqa: E402
from tests.test_decode_mgpu import (TOL, bench_like_case, check, make_case,  # noqa: E402
                                    quantized)
from pallas_kernels.decode_swap import (NQ, SwapConfig, choose_config,  # noqa: E402
                                        paged_decode_swap, smem_bytes, supported)

gpu = pytest.mark.gpu
C = SwapConfig

# (name, seq_lens, H, KVH, D, page, S_pad, T_pad, config, kv)
CASES = [
    ("g4_d128_p16", [70, 130, 17, 200], 8, 2, 128, 16, 1, 2, C(64, 2, 1), "bf16"),
    ("g4_d128_p16_split3", [70, 130, 17, 200], 8, 2, 128, 16, 1, 2, C(64, 2, 3), "bf16"),
    ("g4_d128_p16_fp8", [70, 130, 17, 200], 8, 2, 128, 16, 1, 2, C(64, 2, 1), "fp8"),
    ("g4_d128_p16_fp8_split3", [70, 130, 17, 200], 8, 2, 128, 16, 0, 1, C(64, 3, 3), "fp8"),
    ("g1_d64_p8", [33, 64, 90], 2, 2, 64, 8, 0, 0, C(64, 2, 2), "bf16"),
    ("g16_d128_p64", [150, 64, 1], 16, 1, 128, 64, 1, 0, C(64, 2, 1), "bf16"),
    ("g4_d64_p128_split2", [300, 129], 4, 1, 64, 128, 0, 3, C(64, 2, 2), "bf16"),
    ("g4_d128_b128_p16_fp8", [250, 40], 4, 1, 128, 16, 0, 0, C(128, 2, 1), "fp8"),
]


def run_case(case, *, interpret, config="case"):
    name, lens, H, KVH, D, page, S_pad, T_pad, cfg, kv = case
    args = make_case(0, lens, H, KVH, D, page, S_pad, T_pad)
    scales = None
    if kv == "fp8":
        args, scales = quantized(args)
    scale = D ** -0.5
    out = paged_decode_swap(*args, scale=scale, interpret=interpret,
                            config=cfg if config == "case" else config, **(scales or {}))
    return check(args, out, scale, scales)


def _interpret_worker():
    mgpu_interpret.worker(CASES, run_case, [CASES[3]])


interpret_results, test_interpret_vs_reference, test_interpret_no_races = \
    mgpu_interpret.make_tests(__file__, CASES, TOL)


def test_wrong_scales_are_caught():
    """A negative control on e4m3 pages: K's and V's scales exchanged must fail the tolerance
    (the per-key scales of both products are really applied)."""
    case = CASES[2]
    _, lens, H, KVH, D, page, S_pad, T_pad, cfg, _ = case
    args, scales = quantized(make_case(0, lens, H, KVH, D, page, S_pad, T_pad))
    swapped = dict(k_scale=scales["v_scale"], v_scale=scales["k_scale"])
    out = paged_decode_swap(*args, scale=D ** -0.5, interpret=True, config=cfg, **swapped)
    err, _, _ = check(args, out, D ** -0.5, scales)
    assert err > 0.05, err


def lower(B, ctx, *, page=16, H=32, KVH=8, D=128, cfg=None, fp8=False):
    shapes = list(mgpu_interpret.paged_shapes(B, H, KVH, D, B, ctx // page, page))
    kw = {}
    if fp8:
        pool = jax.ShapeDtypeStruct(shapes[1].shape, jnp.float8_e4m3fn)
        shapes[1] = shapes[2] = pool
        sc = jax.ShapeDtypeStruct((pool.shape[0], KVH, page), jnp.float32)
        kw = dict(k_scale=sc, v_scale=sc)
    f = jax.jit(lambda *a, **k: paged_decode_swap(*a, scale=D ** -0.5, config=cfg, **k))
    return f.trace(*shapes, **kw).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("B,ctx,kw", [
    (8, 2048, dict()), (8, 2048, dict(fp8=True)), (256, 2048, dict(page=64, fp8=True)),
    (1024, 2048, dict(page=64, fp8=True, cfg=C(128, 3, 1))), (64, 4096, dict(cfg=C(64, 6, 2))),
    (8, 2048, dict(D=64, H=8, KVH=8, page=32)), (4, 1024, dict(H=64, KVH=4, page=128))])
def test_lowers_for_hopper(B, ctx, kw):
    assert "mosaic_gpu" in lower(B, ctx, **kw)


def test_configs_and_checks():
    cfg = choose_config(8, 8, 128, 16)            # 64 CTAs: two splits fill 132 SMs
    assert (cfg.block_kv, cfg.num_splits) == (64, 2)
    assert choose_config(256, 8, 128, 64).num_splits == 1
    assert smem_bytes(C(64, 4, 1), 128) < smem_bytes(C(64, 4, 1), 128, kv_itemsize=1) + 65536
    with pytest.raises(ValueError, match="SMEM"):
        C(128, 6, 1).validate(128, 16)
    assert supported((8, 32, 128), (9, 16, 8, 128), jnp.bfloat16)
    assert not supported((8, 32, 128), (9, 16, 1, 128), jnp.bfloat16)   # 32 heads per KV head
    args = make_case(0, [20], 4, 1, 128, 16)
    with pytest.raises(ValueError, match=f"<= {NQ} query heads"):
        paged_decode_swap(*args, scale=0.1, interpret=True, max_query_len=2)


@gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("B,ctx,page,splits", [(8, 2048, 16, None), (8, 2048, 64, 4),
                                               (256, 2048, 64, None), (64, 4096, 16, 1),
                                               (3, 1024, 16, 7)])
def test_gpu_benchmark_shapes(B, ctx, page, splits, fp8):
    args = bench_like_case(B, ctx, page=page, pad_seqs=3)
    scales = {}
    if fp8:
        args, scales = quantized(args)
    cfg = choose_config(B + 3, 8, ctx // page, page, num_splits=splits)
    out = paged_decode_swap(*args, scale=128 ** -0.5, config=cfg, **scales)
    err, pad_max, has_nan = check(args, out, 128 ** -0.5, scales or None)
    assert not has_nan and pad_max == 0.0
    assert err < TOL, err


if __name__ == "__main__":
    if "--interpret-worker" in sys.argv:
        _interpret_worker()
