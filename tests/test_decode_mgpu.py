"""Mosaic GPU paged decode attention (pallas_kernels/decode_mgpu.py) vs the jnp reference.

CPU (no GPU needed):
  * Mosaic GPU lowering for Hopper of the kernel (`decode_kernel_call`, i.e. without the Triton
    split-K combine, which needs a GPU to lower) on the benchmark shapes (B in 1, 8, 64, 256 x
    context 1k..32k, page 16) with the default heuristic config, plus every config the
    benchmark sweeps and the page / head_dim / group variants. Lowering runs Pallas -> Mosaic
    GPU dialect, layout inference, the wgmma / TMA checks and the SMEM budget; not ptxas.
  * numerics in GPU *interpret* mode on small ragged cases (lengths off the page / block
    grid, page > block, GQA 1 / 4 / 8 / 16, head_dim 64 / 128, 1..5 splits incl. splits past a
    short sequence's end, padding sequences and padding tokens, f16), end to end (kernel +
    combine) vs `ragged_paged_attention_ref`. Interpret mode runs the `compat` PV path (P
    through SMEM); everything else (paged TMA gathers, the producer/consumer ring barriers, tail
    mask, split ranges, partial / direct stores, padding zero-fill) is the code the GPU runs.
    One case also runs under the interpreter's race detector. As in test_flash_prefill.py, the
    interpret cases run in one subprocess with NPROC=16 (a 2-core XLA CPU pool starves the
    warpgroup threads).
GPU (`-m gpu`): the compiled kernel on the benchmark shapes (and the configs the benchmark
sweeps) vs the reference.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests import mgpu_interpret  # noqa: E402
from pallas_kernels.decode_mgpu import (MAX_CLUSTER, DecodeConfig, choose_config,  # noqa: E402
                                        decode_kernel_call, paged_decode_mgpu, smem_bytes,
                                        supported)
from pallas_kernels.reference import ragged_paged_attention_ref  # noqa: E402

TOL = 1e-2
gpu = pytest.mark.gpu
C = DecodeConfig

# (name, seq_lens, H, KVH, D, page, S_pad, T_pad, config, dtype). Each is one decode token per
# real sequence; S_pad padding sequences (length 0, no token); T_pad padding tokens.
CASES = [
    ("g4_d64_p16_direct", [100, 37, 1], 8, 2, 64, 16, 1, 2, C(64, 2, 1), "bf16"),
    ("g4_d64_p16_split3", [100, 37, 1], 8, 2, 64, 16, 1, 2, C(64, 2, 3), "bf16"),
    ("g1_d128_p16_split4_short", [64, 200, 5], 2, 2, 128, 16, 0, 0, C(64, 3, 4), "bf16"),
    ("g8_d128_p64_split2", [129, 64, 300], 8, 1, 128, 64, 0, 1, C(64, 2, 2), "bf16"),
    ("g4_d128_p128_gt_block", [130, 257], 8, 2, 128, 128, 1, 0, C(64, 2, 1), "bf16"),
    ("g4_d128_p16_b128_split2", [300, 129, 16], 8, 2, 128, 16, 0, 0, C(128, 2, 2), "bf16"),
    ("g2_d64_p32_many_pad_tokens", [50], 4, 2, 64, 32, 2, 5, C(64, 1, 1), "bf16"),
    ("g2_d64_p32_many_pad_split2", [50], 4, 2, 64, 32, 2, 5, C(64, 2, 2), "bf16"),
    ("g16_d64_p16_split5", [333, 90], 16, 1, 64, 16, 0, 0, C(64, 4, 5), "bf16"),
    ("g4_d128_p16_default_f16", [1000, 33], 8, 2, 128, 16, 0, 0, None, "f16"),
    # a 6-stage ring deeper than the 1-4 blocks a sequence has (D=64: at D=128 interpret
    # mode's compat buffer costs the ring a stage, test_deep_ring_keeps_its_stages)
    ("g4_d64_p16_deep_ring_short", [250, 37, 1], 8, 2, 64, 16, 0, 1, C(64, 6, 1), "bf16"),
    # float8_e4m3fn pages with per-token-per-head scales (bf16 queries): the scale boxes per
    # page, the page > block slice, 1- and 2-pass conversions (64 / 128 keys), splits
    ("g4_d128_p16_fp8_direct", [100, 37, 1], 8, 2, 128, 16, 1, 2, C(64, 2, 1), "fp8"),
    ("g4_d64_p16_fp8_split3", [300, 129, 16], 8, 2, 64, 16, 0, 0, C(64, 2, 3), "fp8"),
    ("g4_d128_p128_fp8_gt_block", [130, 257], 8, 2, 128, 128, 1, 0, C(64, 2, 1), "fp8"),
    ("g4_d128_p16_b128_fp8_split2", [300, 129], 8, 2, 128, 16, 0, 0, C(128, 2, 2), "fp8"),
    # heads_per_cta=2: two consumer warpgroups (one KV head each) fed by one producer
    ("g4_d128_p16_2heads", [100, 37, 1], 8, 2, 128, 16, 1, 2, C(64, 2, 1, heads_per_cta=2),
     "bf16"),
    ("g2_d64_p16_2heads_split3", [300, 129, 16], 8, 4, 64, 16, 0, 0,
     C(64, 2, 3, heads_per_cta=2), "bf16"),
    ("g4_d128_p16_fp8_2heads", [100, 37, 1], 8, 2, 128, 16, 1, 2,
     C(64, 2, 1, heads_per_cta=2), "fp8"),
    ("g2_d64_p16_2heads_kvh4", [77, 200], 8, 4, 64, 16, 1, 1, C(64, 2, 1, heads_per_cta=2),
     "bf16"),
    ("g2_d64_p16_fp8_2heads_split2", [130, 50], 8, 4, 64, 16, 0, 1,
     C(64, 2, 2, heads_per_cta=2), "fp8"),
    # fp8_qk: Q K^T as e4m3 wgmmas on the 8-bit K tile (Q split in two e4m3 terms)
    ("g4_d128_p16_fp8qk_direct", [100, 37, 1], 8, 2, 128, 16, 1, 2, C(64, 2, 1, fp8_qk=True),
     "fp8"),
    ("g4_d64_p16_b128_fp8qk_split3", [300, 129, 16], 8, 2, 64, 16, 0, 0,
     C(128, 2, 3, fp8_qk=True), "fp8"),
    ("g2_d128_p16_fp8qk_2heads_split2", [130, 50], 8, 4, 128, 16, 0, 1,
     C(64, 2, 2, heads_per_cta=2, fp8_qk=True), "fp8"),
    # f16_v: V cast e4m3 -> f16, its scales on P's columns, P V in f16
    ("g4_d128_p64_fp8qk_f16v_2heads", [130, 50, 1], 8, 2, 128, 64, 1, 2,
     C(64, 2, 1, heads_per_cta=2, fp8_qk=True, f16_v=True), "fp8"),
    ("g4_d64_p16_b128_f16v_split3", [300, 129, 16], 8, 2, 64, 16, 0, 0,
     C(128, 2, 3, f16_v=True), "fp8"),
    # ... with V 1e-5x and 1e3x as large (f16's subnormals and its range, the P gain)
    ("g4_d128_p64_f16v_small_v", [130, 50], 8, 2, 128, 64, 0, 1,
     C(64, 2, 1, heads_per_cta=2, fp8_qk=True, f16_v=True), "fp8_v1e-5"),
    ("g4_d128_p64_f16v_large_v", [130, 50], 8, 2, 128, 64, 0, 1,
     C(64, 2, 1, heads_per_cta=2, fp8_qk=True, f16_v=True), "fp8_v1e3"),
]
DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16, "fp8": jnp.bfloat16}  # fp8: q's dtype
V_MULT = {"fp8_v1e-5": 1e-5, "fp8_v1e3": 1e3}  # e4m3 pages with V scaled by that


def make_case(seed, seq_lens, H, KVH, D, page, S_pad=0, T_pad=0, dtype=jnp.bfloat16):
    """A decode batch: one query token per sequence."""
    return mgpu_interpret.paged_case(seed, [1] * len(seq_lens), seq_lens, H, KVH, D, page,
                                     T_pad, S_pad, dtype)


rel = mgpu_interpret.rel


def quantized(args, seed=0, v_mult=1.0):
    """The case with float8_e4m3fn pages: values spread over ~2 decades per token and head (a
    wrong or missing scale shows), quantized by the cache's own quantizer; (args, scales)."""
    from imp_jax.cache import quantize_pool

    q, kp, vp, pt, sl, qs = args
    rng = np.random.default_rng(seed)
    mag = lambda: jnp.asarray(np.exp(rng.uniform(-2, 2, kp.shape[:3] + (1,))), jnp.float32)
    k8, ks = quantize_pool(kp.astype(jnp.float32) * mag(), jnp.float8_e4m3fn)
    v8, vs = quantize_pool(vp.astype(jnp.float32) * mag() * v_mult, jnp.float8_e4m3fn)
    return (q, k8, v8, pt, sl, qs), dict(k_scale=ks, v_scale=vs)


def check(args, out, scale, scales=None):
    """(rel err vs reference, max |padding token rows|, any NaN)."""
    ref = ragged_paged_attention_ref(*args, scale=scale, max_query_len=1, **(scales or {}))
    n_real = int(np.asarray(args[5])[-1])
    o = np.asarray(out.astype(jnp.float32))
    return rel(out, ref), float(np.abs(o[n_real:]).max(initial=0.0)), bool(np.isnan(o).any())


def run_case(case, *, interpret, config="case"):
    name, lens, H, KVH, D, page, S_pad, T_pad, cfg, dt = case
    if config != "case":
        cfg = config
    args = make_case(0, lens, H, KVH, D, page, S_pad, T_pad, DTYPES.get(dt, jnp.bfloat16))
    scales = None
    if dt.startswith("fp8"):
        args, scales = quantized(args, v_mult=V_MULT.get(dt, 1.0))
    scale = D ** -0.5
    out = paged_decode_mgpu(*args, scale=scale, interpret=interpret, config=cfg,
                            **(scales or {}))
    return check(args, out, scale, scales)


# ------------------------------------------------------------------------------------------------
# CPU: config / predicate
# ------------------------------------------------------------------------------------------------

def test_supported():
    assert supported((8, 32, 128), (9, 16, 8, 128), jnp.bfloat16, 1, k_dtype=jnp.bfloat16)
    assert supported((8, 8, 64), (9, 64, 8, 64), jnp.float16, 1)
    assert supported((8, 8, 128), (9, 128, 1, 128), jnp.bfloat16, 1)     # page > block
    assert not supported((8, 32, 128), (9, 16, 8, 128), jnp.bfloat16, 2)  # not decode
    assert not supported((8, 32, 128), (9, 16, 8, 128), jnp.bfloat16, 1, soft_cap=30.0)
    assert not supported((8, 32, 128), (9, 16, 8, 128), jnp.bfloat16, 1, sliding_window=64)
    assert not supported((8, 32, 128), (9, 16, 8, 128), jnp.bfloat16, 1,
                         k_dtype=jnp.float8_e4m3fn)                       # 8-bit, no scales
    ones = jnp.ones((9, 8, 16))
    assert supported((8, 32, 128), (9, 16, 8, 128), jnp.bfloat16, 1,
                     k_dtype=jnp.float8_e4m3fn, k_scale=ones)              # e4m3 + scales
    assert not supported((8, 32, 128), (9, 16, 8, 128), jnp.bfloat16, 1,
                         k_dtype=jnp.int8, k_scale=ones)                  # int8: Triton
    assert not supported((8, 32, 128), (9, 16, 8, 128), jnp.float32, 1)
    assert not supported((8, 32, 256), (9, 16, 8, 256), jnp.bfloat16, 1)
    assert not supported((8, 32, 96), (9, 16, 8, 96), jnp.bfloat16, 1)
    assert not supported((8, 30, 128), (9, 16, 8, 128), jnp.bfloat16, 1)   # H % KVH
    assert not supported((8, 128, 128), (9, 16, 1, 128), jnp.bfloat16, 1)  # G > 64 rows
    assert not supported((8, 32, 128), (9, 4, 8, 128), jnp.bfloat16, 1)   # page < 8-row tile
    assert not supported((8, 32, 128), (9, 48, 8, 128), jnp.bfloat16, 1)  # 48 vs 64 blocks
    assert not supported((8, 32, 128), (9, 256, 8, 128), jnp.bfloat16, 1)  # ring over SMEM
    assert supported((8, 32, 64), (9, 256, 8, 64), jnp.bfloat16, 1)        # fits at D=64


@pytest.mark.parametrize("B,ctx", [(B, c) for B in (1, 8, 64, 256)
                                   for c in (1024, 2048, 4096, 16384, 32768)]
                         + [(1024, 256), (256, 512), (1, 64)])
def test_heuristic(B, ctx):
    cfg = choose_config(B, 8, ctx // 16, 16, 128)
    assert smem_bytes(cfg, 128) <= 227 * 1024
    # short page tables: 64-key blocks in a deep ring (the H200 sweep's winner there), or
    # two heads per CTA in the 2-stage rings that fit SMEM where those CTAs fill the SMs
    short = (64, 2, 2) if B * 4 >= 132 else (64, 6, 1)
    assert (cfg.block_kv, cfg.num_stages, cfg.heads_per_cta) == (
        short if ctx <= 512 else (128, 3, 1))
    ctas = B * 8 // cfg.heads_per_cta * cfg.num_splits
    assert cfg.num_splits == 1 or ctas <= 132          # one wave when splitting
    assert B * 8 < 132 or cfg.num_splits == 1
    assert cfg.num_splits * 2 * cfg.block_kv <= max(ctx, 2 * cfg.block_kv)


def test_deep_ring_keeps_its_stages():
    """The interpret case above really runs 6 stages; on the GPU (no compat buffer) the
    short-table default keeps 6 at D=128 too."""
    from pallas_kernels.decode_mgpu import resolve_config
    case = next(c for c in CASES if c[0] == "g4_d64_p16_deep_ring_short")
    _, lens, H, KVH, D, page, S_pad, T_pad, cfg, _ = case
    shapes = ((len(lens) + T_pad, H, D), (64, page, KVH, D), (len(lens) + S_pad, 16))
    assert resolve_config(*shapes, interpret=True, config=cfg).num_stages == 6
    gpu_cfg = resolve_config((4, 32, 128), (64, 16, 8, 128), (4, 16))
    assert (gpu_cfg.block_kv, gpu_cfg.num_stages) == (64, 6)


# ------------------------------------------------------------------------------------------------
# CPU: Mosaic GPU lowering (Hopper)
# ------------------------------------------------------------------------------------------------

def lower(B, ctx, *, page=16, H=32, KVH=8, D=128, cfg=None, T=None, fp8=False):
    T = B if T is None else T
    mp = ctx // page
    shapes = mgpu_interpret.paged_shapes(T, H, KVH, D, B, mp, page)
    if fp8:  # e4m3 pages + their [P, KVH, page] f32 scale pools
        q, pool, _, pt, sl, qs = shapes
        pool = jax.ShapeDtypeStruct(pool.shape, jnp.float8_e4m3fn)
        sc = jax.ShapeDtypeStruct((pool.shape[0], KVH, page), jnp.float32)
        f = jax.jit(lambda q, k, v, pt, sl, qs, ks, vs: decode_kernel_call(
            q, k, v, pt, sl, qs, scale=D ** -0.5, config=cfg, k_scale=ks, v_scale=vs))
        return f.trace(q, pool, pool, pt, sl, qs, sc, sc).lower(
            lowering_platforms=("cuda",)).as_text()
    f = jax.jit(lambda *a: decode_kernel_call(*a, scale=D ** -0.5, config=cfg))
    return f.trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


BENCH_SHAPES = ([(B, c) for B in (1, 8, 64, 256) for c in (1024, 2048, 4096, 16384, 32768)]
                + [(1024, 256), (256, 512), (4, 64)])  # short tables: 64-key blocks, 6 stages


@pytest.mark.parametrize("B,ctx", BENCH_SHAPES, ids=[f"B{b}-ctx{c}" for b, c in BENCH_SHAPES])
def test_lowers_benchmark_shapes(B, ctx):
    assert "mosaic_gpu" in lower(B, ctx)


# Every config benchmarks/kernels.py sweeps (MGPU_SWEEP), on a split and an unsplit shape, plus
# page / head_dim / group variants and the interpret-mode (compat) path.
LOWER_CONFIGS = [
    (1024, 256, dict(), dict(block_kv=64, num_stages=3, heads_per_cta=2)),
    (256, 512, dict(), dict(block_kv=64, num_stages=2, heads_per_cta=2)),
    (8, 2048, dict(), dict(block_kv=64, num_stages=2, num_splits=4, heads_per_cta=2)),
    (8, 2048, dict(), dict(block_kv=128, num_stages=3)),
    (8, 2048, dict(), dict(block_kv=64, num_stages=6)),
    (8, 2048, dict(), dict(block_kv=64, num_stages=2)),
    (8, 2048, dict(), dict(block_kv=128, num_stages=2)),
    (8, 2048, dict(), dict(num_splits=1)),
    (8, 2048, dict(), dict(num_splits=1, block_kv=128, num_stages=3)),
    (8, 2048, dict(), dict(num_splits=4)),
    (64, 1024, dict(), dict(block_kv=128, num_stages=3)),
    (64, 1024, dict(), dict(block_kv=64, num_stages=6)),
    (64, 1024, dict(), dict(block_kv=64, num_stages=2)),
    (8, 2048, dict(), dict(num_splits=4, compat=True)),
    (8, 2048, dict(page=64), dict()),
    (8, 2048, dict(page=128), dict(num_splits=2)),
    (8, 2048, dict(page=32, D=64, H=8, KVH=8), dict(num_splits=3)),
    (8, 2048, dict(H=8, KVH=1), dict(num_splits=1)),
    (8, 2048, dict(H=64, KVH=1, D=64), dict(num_splits=2)),
    (8, 2048, dict(T=20), dict(num_splits=1)),
    # the splits merged in a thread-block cluster (no combine kernel)
    (8, 2048, dict(page=64), dict(cluster_combine=True)),
    (1, 8192, dict(page=64), dict(cluster_combine=True)),
    (8, 2048, dict(T=20), dict(num_splits=3, cluster_combine=True)),
    (8, 2048, dict(), dict(block_kv=64, num_stages=2, num_splits=4, cluster_combine=True)),
]


@pytest.mark.parametrize("B,ctx,shape_kw,cfg_kw", LOWER_CONFIGS,
                         ids=[f"{i}-B{b}-ctx{c}-" + "-".join(f"{k}{v}" for k, v in
                                                             {**s, **k}.items())
                              for i, (b, c, s, k) in enumerate(LOWER_CONFIGS)])
def test_lowers_configs(B, ctx, shape_kw, cfg_kw):
    page = shape_kw.get("page", 16)
    D = shape_kw.get("D", 128)
    KVH = shape_kw.get("KVH", 8)
    cfg = choose_config(B, KVH, ctx // page, page, D, **cfg_kw)
    assert "mosaic_gpu" in lower(B, ctx, cfg=cfg, **shape_kw)


FP8_LOWER = [(8, 2048, {}, {}), (256, 2048, {}, {}), (1024, 256, {}, {}),
             (8, 2048, {}, dict(num_splits=4)), (8, 2048, dict(page=128), dict(num_splits=2)),
             (8, 2048, dict(page=32, D=64, H=8, KVH=8), {}),
             (64, 4096, {}, dict(block_kv=64, num_stages=6)),
             (64, 4096, {}, dict(block_kv=64, num_stages=3, num_splits=2)),
             (1024, 256, {}, dict(block_kv=64, num_stages=3, heads_per_cta=2)),
             (8, 2048, {}, dict(block_kv=64, num_stages=2, heads_per_cta=2)),
             (8, 2048, {}, dict(fp8_qk=True)), (256, 2048, {}, dict(fp8_qk=True)),
             (1024, 256, {}, dict(fp8_qk=True, block_kv=64, num_stages=3, heads_per_cta=2)),
             (8, 2048, dict(page=32, D=64, H=8, KVH=8), dict(fp8_qk=True, num_splits=3)),
             (256, 2048, dict(page=64), dict(fp8_qk=True, f16_v=True)),
             (256, 2048, dict(page=64), dict(fp8_qk=True, f16_v=False)),
             (256, 2048, dict(page=64), dict(fp8_qk=False, f16_v=True)),
             (256, 2048, dict(page=64), dict(fp8_qk=False, f16_v=False)),
             (8, 2048, {}, dict(fp8_qk=True, f16_v=True)),
             (1024, 2048, dict(page=64), dict(f16_v=True, heads_per_cta=1, block_kv=128,
                                              num_stages=3)),
             (8, 2048, dict(page=64), dict(cluster_combine=True)),
             (1, 8192, dict(page=64), dict(cluster_combine=True))]


@pytest.mark.parametrize("B,ctx,shape_kw,cfg_kw", FP8_LOWER,
                         ids=[f"{i}-B{b}-ctx{c}" for i, (b, c, _, _) in enumerate(FP8_LOWER)])
def test_fp8_pages_lower(B, ctx, shape_kw, cfg_kw):
    """The 8-bit path (e4m3 tiles + scale boxes in the ring, conversion to bf16 tiles) lowers
    for Hopper at benchmark shapes, splits, page > block and head_dim 64."""
    page, D, KVH = shape_kw.get("page", 16), shape_kw.get("D", 128), shape_kw.get("KVH", 8)
    cfg = choose_config(B, KVH, ctx // page, page, D, kv_itemsize=1, **cfg_kw)
    assert "mosaic_gpu" in lower(B, ctx, cfg=cfg, fp8=True, **shape_kw)


def test_cluster_combine_lowers_to_one_kernel_with_a_cluster():
    """With cluster_combine the kernel returns o itself (no f32 partials for a combine) and
    orders the partials' SMEM writes and the leader's reads at cluster scope."""
    cfg = choose_config(8, 8, 2048 // 64, 64, 128, cluster_combine=True)
    assert cfg.cluster_combine and cfg.num_splits == 2
    text = lower(8, 2048, page=64, cfg=cfg)
    # the cluster-scope fences around the barrier: only this path emits them
    assert text.count("fence.acq_rel.cluster") >= 1
    assert "fence.acq_rel.cluster" not in lower(8, 2048, page=64,
                                                 cfg=choose_config(8, 8, 32, 64, 128))
    out = jax.eval_shape(lambda *a: decode_kernel_call(*a, scale=1.0, config=cfg),
                         *mgpu_interpret.paged_shapes(8, 32, 8, 128, 8, 32, 64))
    assert not isinstance(out, tuple) and out.shape == (8, 32, 128)


def test_cluster_combine_config_limits():
    """Cluster sizes past the portable 8 are capped by choose_config and refused when given;
    one split has nothing to merge; interpret mode (compat) is refused with a reason."""
    assert choose_config(1, 8, 32768 // 64, 64, cluster_combine=True).num_splits == MAX_CLUSTER
    assert not choose_config(256, 8, 2048 // 64, 64, cluster_combine=True).cluster_combine
    with pytest.raises(ValueError, match="2..8 splits"):
        DecodeConfig(num_splits=16, cluster_combine=True).validate(128, 64)
    with pytest.raises(ValueError, match="heads_per_cta=1"):
        DecodeConfig(num_splits=2, heads_per_cta=2, cluster_combine=True).validate(128, 64)
    with pytest.raises(ValueError, match="interpret mode"):
        DecodeConfig(num_splits=2, compat=True, cluster_combine=True).validate(128, 64)


def test_fp8_scales_must_have_the_cache_layout():
    q, pool, _, pt, sl, qs = mgpu_interpret.paged_shapes(2, 8, 2, 64, 2, 4, 16)
    k8 = jnp.zeros(pool.shape, jnp.float8_e4m3fn)
    old = jnp.ones((pool.shape[0], 16, 2))  # [P, page, KVH]: the layout before session 5
    with pytest.raises(ValueError, match=r"k_scale has shape .*\[pages, kv_heads, page\]"):
        paged_decode_mgpu(jnp.zeros(q.shape, q.dtype), k8, k8, jnp.zeros(pt.shape, jnp.int32),
                          jnp.zeros(sl.shape, jnp.int32), jnp.zeros(qs.shape, jnp.int32),
                          scale=0.1, k_scale=old, v_scale=old, interpret=True)


def test_heads_per_cta_choice(monkeypatch):
    # the heuristic: two heads per CTA at short contexts once S * KVH / 2 CTAs fill the SMs
    cfg = choose_config(1024, 8, 16, 16)  # 1024 x 256, the winner measured on an H200
    assert cfg.heads_per_cta == 2 and smem_bytes(cfg, 128) <= 232448  # stages fitted to SMEM
    assert choose_config(256, 8, 32, 16).heads_per_cta == 2   # 256 x 512
    assert choose_config(16, 8, 32, 16).heads_per_cta == 1    # 64 CTAs would leave SMs idle
    assert choose_config(64, 8, 64, 16).heads_per_cta == 1    # 64 x 1k: not short
    assert choose_config(1024, 1, 16, 16).heads_per_cta == 1  # one KV head: one per CTA
    # 8-bit pages: two heads at any context and batch (splits make up the CTAs)
    assert choose_config(256, 8, 128, 16, kv_itemsize=1).heads_per_cta == 2  # 256 x 2k
    assert choose_config(64, 8, 256, 16, kv_itemsize=1).heads_per_cta == 2   # 64 x 4k
    cfg = choose_config(8, 8, 128, 16, kv_itemsize=1)                        # 8 x 2k
    assert (cfg.heads_per_cta, cfg.num_splits, cfg.block_kv) == (2, 4, 64)    # 32 CTAs x 4
    assert choose_config(8, 3, 128, 16, kv_itemsize=1).heads_per_cta == 1    # odd KV heads
    # a block size given (the GPU tests' b128x3) where the heuristic wants two heads (8-bit
    # pages; bf16 at a short context): one head, since two rings of it cannot fit SMEM
    for S, pages, kv_itemsize in ((256, 128, 1), (1024, 16, 2)):
        assert choose_config(S, 8, pages, 16, kv_itemsize=kv_itemsize).heads_per_cta == 2
        cfg = choose_config(S, 8, pages, 16, kv_itemsize=kv_itemsize, block_kv=128,
                            num_stages=3)
        assert cfg.heads_per_cta == 1 and cfg.block_kv == 128
        cfg.validate(128, 16, kv_itemsize)
    assert choose_config(256, 8, 128, 16, kv_itemsize=1, block_kv=64).heads_per_cta == 2
    monkeypatch.setenv("IMP_JAX_MGPU_HEADS", "1")
    assert choose_config(1024, 8, 16, 16).heads_per_cta == 1
    monkeypatch.setenv("IMP_JAX_MGPU_HEADS", "2")  # forced at a long context: 64-key blocks fit
    cfg = choose_config(8, 8, 128, 16)
    assert cfg.heads_per_cta == 2 and cfg.block_kv == 64 and smem_bytes(cfg, 128) <= 232448
    # a forced count stands even with a given block too large for it (validate() says so)
    cfg = choose_config(256, 8, 128, 16, kv_itemsize=1, block_kv=128)
    assert cfg.heads_per_cta == 2
    with pytest.raises(ValueError, match="SMEM"):
        cfg.validate(128, 16, 1)
    monkeypatch.setenv("IMP_JAX_MGPU_HEADS", "4")
    with pytest.raises(ValueError, match="IMP_JAX_MGPU_HEADS='4'; allowed: 1, 2"):
        choose_config(1024, 8, 16, 16)


def test_fp8_qk_choice(monkeypatch):
    """e4m3 pages take Q K^T in e4m3 by default (measured faster, session 13), which frees the
    converted K tile: two heads per CTA get a third ring stage. Float pages never take it."""
    for name in ("IMP_JAX_MGPU_FP8_QK", "IMP_JAX_MGPU_F16_V", "IMP_JAX_MGPU_HEADS"):
        monkeypatch.delenv(name, raising=False)
    cfg = choose_config(256, 8, 128, 16, kv_itemsize=1)                  # 256 x 2048
    assert cfg.fp8_qk and cfg.heads_per_cta == 2 and cfg.num_stages == 3
    assert smem_bytes(cfg, 128, kv_itemsize=1) <= 232448
    off = choose_config(256, 8, 128, 16, kv_itemsize=1, fp8_qk=False)
    assert not off.fp8_qk and off.num_stages == 2                        # K's bf16 tile
    assert not choose_config(256, 8, 128, 16).fp8_qk                     # bf16 pages
    monkeypatch.setenv("IMP_JAX_MGPU_FP8_QK", "0")
    assert not choose_config(256, 8, 128, 16, kv_itemsize=1).fp8_qk
    monkeypatch.setenv("IMP_JAX_MGPU_FP8_QK", "yes")
    with pytest.raises(ValueError, match="IMP_JAX_MGPU_FP8_QK='yes'; allowed: 0, 1"):
        choose_config(256, 8, 128, 16, kv_itemsize=1)
    with pytest.raises(ValueError, match="fp8_qk=True needs 8-bit"):
        DecodeConfig(fp8_qk=True).validate(128, 16)
    with pytest.raises(ValueError, match="f16_v=True needs 8-bit"):
        DecodeConfig(f16_v=True).validate(128, 16)
    assert not choose_config(8, 8, 128, 16, f16_v=True).f16_v      # bf16 pages: ignored
    # e4m3 pages take the f16 P V by default (session 14: -8% at 256 and 1024 x 2048)
    monkeypatch.delenv("IMP_JAX_MGPU_FP8_QK")
    assert cfg.f16_v and not choose_config(256, 8, 128, 16, kv_itemsize=1, f16_v=False).f16_v
    monkeypatch.setenv("IMP_JAX_MGPU_F16_V", "0")
    assert not choose_config(256, 8, 128, 16, kv_itemsize=1).f16_v
    monkeypatch.setenv("IMP_JAX_MGPU_F16_V", "on")
    with pytest.raises(ValueError, match="IMP_JAX_MGPU_F16_V='on'; allowed: 0, 1"):
        choose_config(256, 8, 128, 16, kv_itemsize=1)


def test_fp8_qk_reads_the_8bit_tile():
    """The kernel's own program (its jaxpr, no GPU needed): with fp8_qk the Q K^T wgmmas take
    the ring's 8-bit K tile (byte rows of 128: `untile([8, 128])`) against Q's two e4m3 terms
    ([0] and [1]); converting K, every wgmma reads 16-bit tiles (`untile([8, 64])`). A kernel
    that ignored the flag would pass the numerics tests (both paths are within tolerance)."""
    q, pool, _, pt, sl, qs = mgpu_interpret.paged_shapes(4, 8, 2, 128, 4, 8, 16)
    pool = jax.ShapeDtypeStruct(pool.shape, jnp.float8_e4m3fn)
    sc = jax.ShapeDtypeStruct((pool.shape[0], 2, 16), jnp.float32)

    def wgmmas(qk):
        cfg = DecodeConfig(64, 2, 1, fp8_qk=qk)
        f = lambda q, k, v, pt, sl, qs, ks, vs: decode_kernel_call(  # noqa: E731
            q, k, v, pt, sl, qs, scale=0.1, config=cfg, k_scale=ks, v_scale=vs)
        text = str(jax.make_jaxpr(f)(q, pool, pool, pt, sl, qs, sc, sc))
        return [line for line in text.splitlines() if "wgmma_ref" in line]

    on, off = wgmmas(True), wgmmas(False)
    eight_bit = [w for w in on if w.count("untile([8, 128])") == 2]
    assert len(eight_bit) == 4     # two terms, in the full-block loop and the masked tail's
    assert all(f"[{i % 2},:,:]" in w.split(" @ ")[0] for i, w in enumerate(eight_bit))
    assert off and not any("untile([8, 128])" in w for w in off)


def test_oversized_config_rejected():
    with pytest.raises(ValueError, match="SMEM"):
        DecodeConfig(block_kv=128, num_stages=4).validate(128, 16)


# ------------------------------------------------------------------------------------------------
# CPU: interpret mode (numerics), in one subprocess with a big enough XLA CPU pool
# ------------------------------------------------------------------------------------------------

def _interpret_worker():
    races = [CASES[1]] + [c for c in CASES if c[0] in ("g2_d64_p16_2heads_split3",
                                                         "g2_d64_p16_fp8_2heads_split2",
                                                         "g2_d128_p16_fp8qk_2heads_split2")]
    mgpu_interpret.worker(CASES, run_case, races)


interpret_results, test_interpret_vs_reference, test_interpret_no_races = \
    mgpu_interpret.make_tests(__file__, CASES, TOL)


# ------------------------------------------------------------------------------------------------
# GPU: the compiled kernel
# ------------------------------------------------------------------------------------------------

GPU_CONFIGS = {"default": None, "b128x3": dict(block_kv=128, num_stages=3),
               "b64x2": dict(block_kv=64, num_stages=2), "b64x6": dict(block_kv=64, num_stages=6),
               "compat": dict(compat=True),
               "2heads": dict(block_kv=64, num_stages=3, heads_per_cta=2),
               # e4m3 pages converting K (fp8_qk is the heuristic's default there)
               "2heads_convert_k": dict(block_kv=64, num_stages=3, heads_per_cta=2,
                                        fp8_qk=False),
               # splits merged through distributed SMEM in a cluster (GPU only, session 18)
               "cluster": dict(cluster_combine=True)}


@gpu
@pytest.mark.parametrize("cfg", list(GPU_CONFIGS), ids=list(GPU_CONFIGS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_small_cases(case, cfg):
    name, lens, H, KVH, D, page, *_ = case
    kw = GPU_CONFIGS[cfg]
    if kw is not None and KVH % kw.get("heads_per_cta", 1):
        pytest.skip("heads_per_cta does not divide the KV heads")
    if kw is not None and "fp8_qk" in kw and not case[9].startswith("fp8"):
        pytest.skip("fp8_qk concerns 8-bit pages only")
    config = "case" if kw is None else choose_config(
        len(lens) + case[6], KVH, max(-(-L // page) for L in lens), page, D,
        num_splits=case[8].num_splits if case[8] is not None else None,
        kv_itemsize=1 if case[9].startswith("fp8") else 2, **kw)
    if config != "case" and page > config.block_kv and page % config.block_kv:
        pytest.skip("page/block mismatch")
    if cfg == "cluster" and not config.cluster_combine:
        pytest.skip("one split: nothing to merge in a cluster (the plain kernel runs)")
    err, pad_max, has_nan = run_case(case, interpret=False, config=config)
    assert not has_nan and pad_max == 0.0
    assert err < TOL, err


def bench_like_case(B, ctx, page=16, H=32, KVH=8, D=128, pad_seqs=0, seed=0):
    """The benchmark's inputs: ragged lengths in [ctx/2, ctx] (one at ctx), shuffled pages,
    plus `pad_seqs` padding sequences (length 0, no token)."""
    key = jax.random.key(seed)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    mp = ctx // page
    S = B + pad_seqs
    P = B * mp + 1
    kp = jax.random.normal(k1, (P, page, KVH, D), jnp.bfloat16)
    vp = jax.random.normal(k2, (P, page, KVH, D), jnp.bfloat16)
    pt = jax.random.permutation(k3, jnp.arange(1, P, dtype=jnp.int32)).reshape(B, mp)
    pt = jnp.concatenate([pt, jnp.zeros((pad_seqs, mp), jnp.int32)])
    lens = jax.random.randint(k4, (B,), ctx // 2, ctx + 1).astype(jnp.int32).at[0].set(ctx)
    lens = jnp.concatenate([lens, jnp.zeros((pad_seqs,), jnp.int32)])
    qs = jnp.concatenate([jnp.arange(B + 1, dtype=jnp.int32),
                          jnp.full((pad_seqs,), B, jnp.int32)])
    q = jax.random.normal(k5, (S, H, D), jnp.bfloat16)
    return q, kp, vp, pt, lens, qs


GPU_SHAPES = [(8, 2048), (1, 1024), (1, 32768), (8, 16384), (64, 1024), (64, 4096),
              (256, 1024), (256, 256)]


@gpu
@pytest.mark.parametrize("cfg", list(GPU_CONFIGS), ids=list(GPU_CONFIGS))
@pytest.mark.parametrize("B,ctx", GPU_SHAPES, ids=[f"B{b}-ctx{c}" for b, c in GPU_SHAPES])
def test_gpu_benchmark_shapes(B, ctx, cfg):
    kw = GPU_CONFIGS[cfg]
    if kw is not None and "fp8_qk" in kw:
        pytest.skip("bf16 pages: fp8_qk concerns 8-bit pages only")
    args = bench_like_case(B, ctx, pad_seqs=3)
    config = None if kw is None else choose_config(B + 3, 8, ctx // 16, 16, 128, **kw)
    if cfg == "cluster" and not config.cluster_combine:
        pytest.skip("one split: nothing to merge in a cluster (the plain kernel runs)")
    out = paged_decode_mgpu(*args, scale=128 ** -0.5, config=config)
    err, pad_max, has_nan = check(args, out, 128 ** -0.5)
    assert not has_nan and pad_max == 0.0
    assert err < TOL, err


@gpu
@pytest.mark.parametrize("qk", [True, False, "f16_v"], ids=["fp8_qk", "convert_k", "f16_v"])
@pytest.mark.parametrize("B,ctx,page", [(256, 2048, 64), (8, 2048, 16), (64, 4096, 16)],
                         ids=["B256-ctx2048-p64", "B8-ctx2048", "B64-ctx4096"])
def test_gpu_fp8_benchmark_shapes(B, ctx, page, qk):
    """e4m3 pages at the benchmark's shapes, both Q K^T paths and the f16 P V, two heads per
    CTA (the engine's config on e4m3 pages)."""
    args, scales = quantized(bench_like_case(B, ctx, page=page, pad_seqs=3))
    config = choose_config(B + 3, 8, ctx // page, page, 128, kv_itemsize=1, heads_per_cta=2,
                           fp8_qk=qk is not False, f16_v=qk == "f16_v")
    out = paged_decode_mgpu(*args, scale=128 ** -0.5, config=config, **scales)
    err, pad_max, has_nan = check(args, out, 128 ** -0.5, scales)
    assert not has_nan and pad_max == 0.0
    assert err < TOL, err


@gpu
@pytest.mark.parametrize("splits", [1, 2, 7, 16])
def test_gpu_splits(splits):
    args = bench_like_case(4, 4096, pad_seqs=1)
    cfg = choose_config(5, 8, 4096 // 16, 16, 128, num_splits=splits)
    out = paged_decode_mgpu(*args, scale=128 ** -0.5, config=cfg)
    err, pad_max, has_nan = check(args, out, 128 ** -0.5)
    assert not has_nan and pad_max == 0.0
    assert err < TOL, err


if __name__ == "__main__":
    if "--interpret-worker" in sys.argv:
        _interpret_worker()


def test_decode_kernel_choices_name_a_bad_value(monkeypatch):
    import pallas_kernels

    assert pallas_kernels.decode_kernel_8bit() == "mgpu"  # the faster on an H200, session 8
    monkeypatch.setenv("IMP_JAX_DECODE_8BIT", "triton")
    assert pallas_kernels.decode_kernel_8bit() == "triton"
    monkeypatch.setenv("IMP_JAX_DECODE_8BIT", "fast")
    with pytest.raises(ValueError, match="IMP_JAX_DECODE_8BIT='fast'; allowed: triton, mgpu"):
        pallas_kernels.decode_kernel_8bit()


def test_8bit_pages_take_decode_mgpu_unless_one_head_converts_k(monkeypatch, tmp_path):
    # e4m3 pages: decode_mgpu with two KV heads per CTA (faster than the Triton kernel at 8 and
    # 32 x 2k, session 14), or one with fp8_qk (level at 8 x 2k, faster at 32 x 2k); one head
    # converting K was behind, so Triton serves that. bf16 pages take decode_mgpu either way.
    import pallas_kernels

    monkeypatch.setenv("IMP_JAX_AUTOTUNE_CACHE", str(tmp_path / "none.json"))  # heuristics
    for name in ("IMP_JAX_MGPU_FP8_QK", "IMP_JAX_MGPU_F16_V", "IMP_JAX_MGPU_HEADS",
                 "IMP_JAX_DECODE", "IMP_JAX_DECODE_8BIT"):
        monkeypatch.delenv(name, raising=False)
    fp8 = jnp.float8_e4m3fn

    def config(S, kv_dtype, scaled):
        q = jax.ShapeDtypeStruct((S, 32, 128), jnp.bfloat16)
        pages = jax.ShapeDtypeStruct((4096, 16, 8, 128), kv_dtype)
        table = jax.ShapeDtypeStruct((S, 128), jnp.int32)  # 2k keys
        scale = jax.ShapeDtypeStruct((4096, 8, 16), jnp.float32) if scaled else None
        return pallas_kernels.mgpu_decode_config(q, pages, table, 1, k_scale=scale)

    assert config(256, fp8, True).heads_per_cta == 2
    assert config(8, fp8, True).heads_per_cta == 2
    assert config(8, jnp.bfloat16, False).heads_per_cta == 1
    monkeypatch.setenv("IMP_JAX_MGPU_HEADS", "1")
    assert config(8, fp8, True).fp8_qk
    monkeypatch.setenv("IMP_JAX_MGPU_FP8_QK", "0")
    assert config(8, fp8, True) is None                  # one head converting K: Triton
    assert config(8, jnp.bfloat16, False) is not None
    monkeypatch.delenv("IMP_JAX_MGPU_HEADS")
    assert config(8, fp8, True).heads_per_cta == 2
    # an odd KV-head count (e.g. 3, SmolLM2-135M): one head per CTA, with fp8_qk on by default
    monkeypatch.delenv("IMP_JAX_MGPU_FP8_QK")
    q3 = jax.ShapeDtypeStruct((8, 9, 128), jnp.bfloat16)
    pages3 = jax.ShapeDtypeStruct((4096, 16, 3, 128), fp8)
    odd = pallas_kernels.mgpu_decode_config(q3, pages3, jax.ShapeDtypeStruct((8, 128), jnp.int32),
                                            1, k_scale=jax.ShapeDtypeStruct((4096, 3, 16),
                                                                            jnp.float32))
    assert odd.heads_per_cta == 1 and odd.fp8_qk and odd.f16_v
    monkeypatch.setenv("IMP_JAX_DECODE_8BIT", "triton")
    assert config(256, fp8, True) is None
    assert config(256, jnp.bfloat16, False) is not None
