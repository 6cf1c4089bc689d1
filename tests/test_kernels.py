"""Pallas attention kernels vs the pure-jnp reference, and the reference vs a naive numpy loop.

CPU: kernels run in Pallas interpret mode (numerics only). GPU (`-m gpu`, skipped elsewhere):
the same kernels compiled through the Triton backend.
Metric: ||out - ref|| / ||ref||, inputs random (never zeros), padded-token rows must be zero.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from imp_jax.cache import scale_pool_shape
from pallas_kernels import (choose_config, paged_attention_kernel, ragged_paged_attention,
                            ragged_paged_attention_ref)

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
GPU_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}
on_gpu = jax.default_backend() == "gpu"
gpu = pytest.mark.gpu
skip_no_gpu = pytest.mark.skipif(not on_gpu, reason="needs a GPU")


def make_case(seed, *, seq_lens, qlens, KVH=2, G=4, D=64, page=8, max_pages=None, dtype=jnp.float32,
              T_pad=3, S_pad=1):
    """A random ragged step. S_pad padded sequences (length 0, no tokens), T_pad padded tokens."""
    rng = np.random.default_rng(seed)
    seq_lens = list(seq_lens) + [0] * S_pad
    qlens = list(qlens) + [0] * S_pad
    S = len(seq_lens)
    H = KVH * G
    need = max(-(-L // page) for L in seq_lens) if max(seq_lens) else 1
    max_pages = max_pages or need + 1
    P = S * max_pages + 2
    kp = rng.standard_normal((P, page, KVH, D)).astype(np.float32)
    vp = rng.standard_normal((P, page, KVH, D)).astype(np.float32)
    perm = rng.permutation(np.arange(1, P))[: S * max_pages].reshape(S, max_pages)
    for s, L in enumerate(seq_lens):          # padding entries point at page 0
        perm[s, -(-L // page):] = 0
    qs = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    T = int(qs[-1]) + T_pad
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    return (jnp.asarray(q, dtype), jnp.asarray(kp, dtype), jnp.asarray(vp, dtype),
            jnp.asarray(perm, jnp.int32), jnp.asarray(seq_lens, jnp.int32), jnp.asarray(qs))


def naive(q, kp, vp, pt, sl, qs, *, scale, soft_cap=None, sliding_window=None):
    """Per-token float64 loop straight from the contract."""
    q, kp, vp = (np.asarray(x, np.float64) for x in (q, kp, vp))
    pt, sl, qs = np.asarray(pt), np.asarray(sl), np.asarray(qs)
    T, H, D = q.shape
    page, KVH = kp.shape[1], kp.shape[2]
    G = H // KVH
    out = np.zeros_like(q)
    for s in range(len(sl)):
        qlen = qs[s + 1] - qs[s]
        for j in range(qlen):
            pos = sl[s] - qlen + j
            keys = [p for p in range(sl[s]) if p <= pos and
                    (sliding_window is None or p > pos - sliding_window)]
            for h in range(H):
                kh = h // G
                ks = np.stack([kp[pt[s, p // page], p % page, kh] for p in keys])
                vs = np.stack([vp[pt[s, p // page], p % page, kh] for p in keys])
                lg = ks @ q[qs[s] + j, h] * scale
                if soft_cap is not None:
                    lg = soft_cap * np.tanh(lg / soft_cap)
                w = np.exp(lg - lg.max())
                out[qs[s] + j, h] = (w / w.sum()) @ vs
    return out


def rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def check_padding_zero(out, qs):
    n = int(np.asarray(qs)[-1])
    assert np.all(np.asarray(out[n:], np.float32) == 0.0)


# ---------------------------------------------------------------- reference vs naive loop

@pytest.mark.parametrize("soft_cap,window", [(None, None), (7.0, None), (None, 5), (3.0, 9)])
def test_reference_vs_naive(soft_cap, window):
    case = make_case(0, seq_lens=[1, 8, 9, 23], qlens=[1, 3, 9, 2], KVH=2, G=2, D=16, page=8)
    ref = ragged_paged_attention_ref(*case, max_query_len=9, scale=0.3, soft_cap=soft_cap,
                                     sliding_window=window)
    exp = naive(*case, scale=0.3, soft_cap=soft_cap, sliding_window=window)
    assert rel(ref, exp) < 1e-5
    check_padding_zero(ref, case[5])
    assert np.all(np.isfinite(np.asarray(ref)))


# ---------------------------------------------------------------- kernel (interpret) vs reference

def _run(case, Q, *, scale=0.125, soft_cap=None, window=None, config=None, interpret=True,
         scales=None):
    kw = dict(max_query_len=Q, scale=scale, soft_cap=soft_cap, sliding_window=window,
              **(scales or {}))
    ref = ragged_paged_attention_ref(*case, **kw)
    if config is None:
        out = ragged_paged_attention(*case, interpret=interpret, **kw)
    else:
        out = paged_attention_kernel(*case, config=config, interpret=interpret, **kw)
    return out, ref


DECODE_CASES = [
    # (G, D, page, seq_lens, dtype)
    (1, 64, 8, [8, 16, 17, 7], jnp.float32),        # lengths k*page, k*page+1, k*page-1
    (4, 64, 16, [15, 16, 33, 1], jnp.float32),
    (8, 128, 16, [47, 48, 49, 5], jnp.float32),
    (4, 128, 8, [24, 25, 3], jnp.bfloat16),
    (8, 64, 16, [31, 32, 64], jnp.bfloat16),
]


@pytest.mark.parametrize("G,D,page,lens,dtype", DECODE_CASES)
def test_decode_kernel(G, D, page, lens, dtype):
    case = make_case(1, seq_lens=lens, qlens=[1] * len(lens), KVH=2, G=G, D=D, page=page,
                     dtype=dtype)
    out, ref = _run(case, 1)
    assert rel(out, ref) < TOL[dtype]
    check_padding_zero(out, case[5])


@pytest.mark.parametrize("num_splits,bk,soft_cap,window,prefetch", [
    (1, 16, None, None, True), (3, 16, None, None, False), (4, 32, 20.0, None, True),
    (3, 16, None, 20, True), (1, 32, 5.0, 13, False), (4, 16, 5.0, 13, True)])
def test_decode_splits_softcap_window(num_splits, bk, soft_cap, window, prefetch):
    lens = [40, 63, 64, 65, 2]
    case = make_case(2, seq_lens=lens, qlens=[1] * len(lens), KVH=2, G=4, D=64, page=8,
                     max_pages=10)
    S = len(lens) + 1
    cfg = choose_config(S, 2, 4, 1, 10, 8, num_splits=num_splits, block_k_tokens=bk,
                        prefetch_pages=prefetch)
    out, ref = _run(case, 1, soft_cap=soft_cap, window=window, config=cfg)
    assert rel(out, ref) < TOL[jnp.float32]
    check_padding_zero(out, case[5])


@pytest.mark.parametrize("unroll", [64, 2])
def test_decode_combine_unrolled_and_rolled(monkeypatch, unroll):
    """The split-K combine merges 5 splits with its loops unrolled (the default) and rolled
    (UNROLL_SPLITS below the split count, the path of > 64 splits); both match the reference."""
    from pallas_kernels import paged_decode
    monkeypatch.setattr(paged_decode, "UNROLL_SPLITS", unroll)
    jax.clear_caches()   # the jitted wrapper's cache does not key on the module constant
    lens = [40, 63, 64, 65, 2]
    case = make_case(12, seq_lens=lens, qlens=[1] * len(lens), KVH=2, G=4, D=64, page=8,
                     max_pages=10)
    cfg = choose_config(len(lens) + 1, 2, 4, 1, 10, 8, num_splits=5, block_k_tokens=16)
    out, ref = _run(case, 1, config=cfg)
    assert rel(out, ref) < TOL[jnp.float32]
    check_padding_zero(out, case[5])


def test_decode_head_dim_256():
    case = make_case(3, seq_lens=[17, 32], qlens=[1, 1], KVH=1, G=2, D=256, page=16)
    out, ref = _run(case, 1)
    assert rel(out, ref) < TOL[jnp.float32]


@pytest.mark.parametrize("window", [None, 6])
def test_multi_token_decode(window):
    """Spec-decode-like: a few query tokens per sequence (one query block, split-K)."""
    case = make_case(4, seq_lens=[9, 16, 30], qlens=[3, 1, 4], KVH=2, G=4, D=64, page=8,
                     max_pages=5)
    cfg = choose_config(4, 2, 4, 4, 5, 8, num_splits=2, block_k_tokens=16)
    out, ref = _run(case, 4, window=window, config=cfg)
    assert rel(out, ref) < TOL[jnp.float32]
    check_padding_zero(out, case[5])


@pytest.mark.parametrize("G,dtype,window,soft_cap", [
    (1, jnp.float32, None, None), (4, jnp.float32, 11, None), (8, jnp.bfloat16, None, 30.0)])
def test_prefill_mixed(G, dtype, window, soft_cap):
    """Prefill, chunked prefill (cached prefix), decode rows in one step."""
    lens = [33, 40, 17, 5]
    qlens = [33, 12, 1, 5]            # full prefill, chunk on a 28-token prefix, decode, prefill
    case = make_case(5, seq_lens=lens, qlens=qlens, KVH=2, G=G, D=64, page=8, dtype=dtype)
    out, ref = _run(case, 40, window=window, soft_cap=soft_cap)
    assert rel(out, ref) < TOL[dtype]
    check_padding_zero(out, case[5])


def test_dispatch_cpu_falls_back_to_reference():
    case = make_case(6, seq_lens=[5, 9], qlens=[1, 1], KVH=2, G=2, D=32, page=8)
    kw = dict(max_query_len=1, scale=0.2)
    out = ragged_paged_attention(*case, **kw)
    ref = ragged_paged_attention_ref(*case, **kw)
    if not on_gpu:
        assert np.array_equal(np.asarray(out), np.asarray(ref))
    else:
        assert rel(out, ref) < 1e-4


# ---------------------------------------------------------------- real GPU (compiled Triton)

@gpu
@skip_no_gpu
@pytest.mark.parametrize("G,D,page,dtype", [
    (1, 64, 16, jnp.float32), (4, 128, 16, jnp.bfloat16), (8, 128, 16, jnp.bfloat16),
    (4, 128, 32, jnp.bfloat16), (8, 256, 16, jnp.bfloat16), (4, 64, 64, jnp.float32)])
@pytest.mark.parametrize("soft_cap,window", [(None, None), (30.0, 100)])
def test_gpu_decode(G, D, page, dtype, soft_cap, window):
    lens = [1, page * 4, page * 4 + 1, page * 4 - 1, 777, 1500]
    case = make_case(7, seq_lens=lens, qlens=[1] * len(lens), KVH=4, G=G, D=D, page=page,
                     dtype=dtype)
    out, ref = _run(case, 1, soft_cap=soft_cap, window=window, interpret=False)
    assert rel(out, ref) < GPU_TOL[dtype]
    check_padding_zero(out, case[5])


@gpu
@skip_no_gpu
@pytest.mark.parametrize("num_splits", [1, 2, 7])
@pytest.mark.parametrize("prefetch,stages", [(True, 2), (False, 2), (True, 3), (False, 3)])
def test_gpu_decode_splits(num_splits, prefetch, stages):
    lens = [300, 1024, 1025, 40]
    case = make_case(8, seq_lens=lens, qlens=[1] * 4, KVH=8, G=4, D=128, page=16,
                     dtype=jnp.bfloat16)
    cfg = choose_config(5, 8, 4, 1, case[3].shape[1], 16, num_splits=num_splits,
                        prefetch_pages=prefetch, num_stages=stages)
    out, ref = _run(case, 1, config=cfg, interpret=False)
    assert rel(out, ref) < GPU_TOL[jnp.bfloat16]


@gpu
@skip_no_gpu
@pytest.mark.parametrize("G,dtype,window", [(4, jnp.bfloat16, None), (8, jnp.bfloat16, 64),
                                            (1, jnp.float32, None)])
def test_gpu_prefill_mixed(G, dtype, window):
    lens = [300, 200, 513, 64]
    qlens = [300, 50, 1, 64]
    case = make_case(9, seq_lens=lens, qlens=qlens, KVH=2, G=G, D=128, page=16, dtype=dtype)
    out, ref = _run(case, 300, window=window, interpret=False)
    assert rel(out, ref) < GPU_TOL[dtype]
    check_padding_zero(out, case[5])


# ---------------------------------------------------------------- 8-bit (fp8 / int8) KV pages

KV8 = {"fp8": jnp.float8_e4m3fn, "int8": jnp.int8}


def quantize_case(case, kv, seed=0):
    """The case's float pages, spread over ~2 decades per token and head (so a wrong or missing
    scale shows), quantized per token and head by the cache's own quantizer."""
    from imp_jax.cache import quantize_pool

    q, kp, vp, pt, sl, qs = case
    rng = np.random.default_rng(seed)
    mag = lambda: jnp.asarray(np.exp(rng.uniform(-2.5, 2.5, kp.shape[:3] + (1,))), jnp.float32)
    k8, ks = quantize_pool(kp.astype(jnp.float32) * mag(), KV8[kv])
    v8, vs = quantize_pool(vp.astype(jnp.float32) * mag(), KV8[kv])
    return (q, k8, v8, pt, sl, qs), dict(k_scale=ks, v_scale=vs)


Q8_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("kv", ["fp8", "int8"])
def test_reference_8bit_vs_naive(kv):
    """The reference over 8-bit pages + scales == the naive loop over the dequantized pages."""
    case, sc = quantize_case(make_case(10, seq_lens=[1, 8, 9, 23], qlens=[1, 3, 9, 2], KVH=2,
                                       G=2, D=16, page=8), kv)
    q, k8, v8, pt, sl, qs = case
    ref = ragged_paged_attention_ref(*case, max_query_len=9, scale=0.3, sliding_window=6, **sc)
    # scales [P, KVH, page] -> [P, page, KVH, 1] against the values [P, page, KVH, D]
    deq = lambda x, s: x.astype(jnp.float32) * jnp.swapaxes(s, 1, 2)[..., None]  # noqa: E731
    exp = naive(q, deq(k8, sc["k_scale"]), deq(v8, sc["v_scale"]), pt, sl, qs, scale=0.3,
                sliding_window=6)
    assert rel(ref, exp) < 1e-5
    check_padding_zero(ref, qs)


@pytest.mark.parametrize("kv,G,D,page,lens,dtype", [
    ("fp8", 1, 64, 8, [8, 16, 17, 7], jnp.float32),     # lengths k*page, k*page+1, k*page-1
    ("int8", 1, 128, 8, [8, 16, 17, 7], jnp.bfloat16),
    ("int8", 4, 64, 16, [15, 16, 33, 1], jnp.float32),
    ("fp8", 4, 128, 16, [15, 16, 33, 1], jnp.bfloat16),
    ("int8", 8, 128, 8, [24, 25, 3], jnp.float32),
    ("fp8", 8, 64, 16, [47, 48, 49, 5], jnp.bfloat16),
])
def test_decode_kernel_8bit_pages(kv, G, D, page, lens, dtype):
    case, scales = quantize_case(make_case(11, seq_lens=lens, qlens=[1] * len(lens), KVH=2, G=G,
                                           D=D, page=page, dtype=dtype), kv)
    assert case[1].dtype == KV8[kv] and scales["k_scale"].shape == scale_pool_shape(case[1].shape)
    out, ref = _run(case, 1, scales=scales)
    assert rel(out, ref) < Q8_TOL[dtype]
    check_padding_zero(out, case[5])
    # the scales matter: without them the same pages give another answer
    unscaled = ragged_paged_attention_ref(*case, max_query_len=1, scale=0.125)
    assert rel(unscaled, ref) > 0.1


@pytest.mark.parametrize("kv,num_splits,bk,soft_cap,window,prefetch", [
    ("fp8", 3, 16, None, None, True), ("int8", 4, 32, 20.0, 13, False),
    ("int8", 3, 16, None, 20, True)])
def test_decode_8bit_splits_softcap_window(kv, num_splits, bk, soft_cap, window, prefetch):
    lens = [40, 63, 64, 65, 2]
    case, scales = quantize_case(make_case(12, seq_lens=lens, qlens=[1] * len(lens), KVH=2, G=4,
                                           D=64, page=8, max_pages=10), kv)
    cfg = choose_config(len(lens) + 1, 2, 4, 1, 10, 8, num_splits=num_splits, block_k_tokens=bk,
                        prefetch_pages=prefetch)
    out, ref = _run(case, 1, scales=scales, soft_cap=soft_cap, window=window, config=cfg)
    assert rel(out, ref) < Q8_TOL[jnp.float32]
    check_padding_zero(out, case[5])


@pytest.mark.parametrize("kv,G,dtype,window", [
    ("fp8", 1, jnp.float32, None), ("int8", 4, jnp.bfloat16, 11), ("fp8", 8, jnp.bfloat16, 7)])
def test_prefill_mixed_8bit_pages(kv, G, dtype, window):
    lens = [33, 40, 17, 5]
    qlens = [33, 12, 1, 5]
    case, scales = quantize_case(make_case(13, seq_lens=lens, qlens=qlens, KVH=2, G=G, D=64,
                                           page=8, dtype=dtype), kv)
    out, ref = _run(case, 40, scales=scales, window=window)
    assert rel(out, ref) < Q8_TOL[dtype]
    check_padding_zero(out, case[5])


def _primitives(jaxpr, acc=None):
    acc = [] if acc is None else acc
    for eqn in jaxpr.eqns:
        acc.append(eqn.primitive.name)
        if eqn.primitive.name in ("jit", "pjit", "closed_call"):   # not into the kernels
            _primitives(eqn.params["jaxpr"].jaxpr, acc)
    return acc


@pytest.mark.parametrize("num_splits,kv", [(1, None), (3, "int8")])
def test_decode_wrapper_is_kernels_only(num_splits, kv):
    """No gather / scatter / pad / transpose around the kernel (each costs a launch at small
    batch): q is read and the output written in place, split-K merged by a Pallas combine,
    padding tokens (41 of them: several chunks per program) zeroed by the kernels."""
    case = make_case(15, seq_lens=[40, 9], qlens=[1, 1], KVH=2, G=2, D=64, page=8, max_pages=6,
                     T_pad=41, S_pad=2)
    scales = {}
    if kv:
        case, scales = quantize_case(case, kv)
    cfg = choose_config(4, 2, 2, 1, 6, 8, num_splits=num_splits, block_k_tokens=16)
    fn = lambda *a: paged_attention_kernel(*a, max_query_len=1, scale=0.125, config=cfg,
                                           interpret=True, **scales)
    prims = _primitives(jax.make_jaxpr(fn)(*case).jaxpr)
    assert prims.count("pallas_call") == (1 if num_splits == 1 else 2), prims
    heavy = {"gather", "scatter", "scatter-add", "pad", "transpose", "concatenate",
             "dynamic_slice", "dynamic_update_slice", "select_n", "reduce_sum", "reduce_max"}
    assert not heavy & set(prims), prims
    out = fn(*case)
    ref = ragged_paged_attention_ref(*case, max_query_len=1, scale=0.125, **scales)
    assert rel(out, ref) < 1e-4
    check_padding_zero(out, case[5])
    assert np.all(np.isfinite(np.asarray(out)))


# ---------------------------------------------------------------- 8-bit pages, real GPU

@gpu
@skip_no_gpu
@pytest.mark.parametrize("kv", ["fp8", "int8"])
@pytest.mark.parametrize("G,D,page,dtype", [
    (1, 64, 16, jnp.float32), (4, 128, 16, jnp.bfloat16), (8, 128, 16, jnp.bfloat16),
    (4, 128, 32, jnp.bfloat16), (4, 64, 64, jnp.float32)])
@pytest.mark.parametrize("soft_cap,window", [(None, None), (30.0, 100)])
def test_gpu_decode_8bit(kv, G, D, page, dtype, soft_cap, window):
    lens = [1, page * 4, page * 4 + 1, page * 4 - 1, 777, 1500]
    case, scales = quantize_case(make_case(17, seq_lens=lens, qlens=[1] * len(lens), KVH=4, G=G,
                                           D=D, page=page, dtype=dtype), kv)
    out, ref = _run(case, 1, scales=scales, soft_cap=soft_cap, window=window, interpret=False)
    assert rel(out, ref) < GPU_TOL[dtype]
    check_padding_zero(out, case[5])


@gpu
@skip_no_gpu
@pytest.mark.parametrize("kv", ["fp8", "int8"])
@pytest.mark.parametrize("num_splits,prefetch,stages", [(1, True, 3), (2, False, 2), (7, True, 2)])
def test_gpu_decode_8bit_splits(kv, num_splits, prefetch, stages):
    lens = [300, 1024, 1025, 40]
    case, scales = quantize_case(make_case(18, seq_lens=lens, qlens=[1] * 4, KVH=8, G=4, D=128,
                                           page=16, dtype=jnp.bfloat16), kv)
    cfg = choose_config(5, 8, 4, 1, case[3].shape[1], 16, num_splits=num_splits,
                        prefetch_pages=prefetch, num_stages=stages)
    out, ref = _run(case, 1, scales=scales, config=cfg, interpret=False)
    assert rel(out, ref) < GPU_TOL[jnp.bfloat16]
    check_padding_zero(out, case[5])


@gpu
@skip_no_gpu
@pytest.mark.parametrize("kv,G,dtype,window", [
    ("fp8", 4, jnp.bfloat16, None), ("int8", 8, jnp.bfloat16, 64), ("int8", 1, jnp.float32, None),
    ("fp8", 1, jnp.float32, 64)])
def test_gpu_prefill_mixed_8bit(kv, G, dtype, window):
    lens = [300, 200, 513, 64]
    qlens = [300, 50, 1, 64]
    case, scales = quantize_case(make_case(19, seq_lens=lens, qlens=qlens, KVH=2, G=G, D=128,
                                           page=16, dtype=dtype), kv)
    out, ref = _run(case, 300, scales=scales, window=window, interpret=False)
    assert rel(out, ref) < GPU_TOL[dtype]
    check_padding_zero(out, case[5])


@gpu
@skip_no_gpu
@pytest.mark.parametrize("num_splits,kv", [(1, None), (4, None), (1, "fp8"), (4, "int8")])
def test_gpu_decode_compiles_to_kernels_only(num_splits, kv):
    """The compiled decode step is the kernel (+ the combine with split-K): no XLA fusion,
    gather or scatter around it."""
    case = make_case(20, seq_lens=[700, 64, 5], qlens=[1, 1, 1], KVH=8, G=4, D=128, page=16,
                     dtype=jnp.bfloat16)
    scales = {}
    if kv:
        case, scales = quantize_case(case, kv)
    cfg = choose_config(4, 8, 4, 1, case[3].shape[1], 16, num_splits=num_splits)
    fn = jax.jit(lambda *a: paged_attention_kernel(*a, max_query_len=1, scale=0.1, config=cfg,
                                                   **scales))
    hlo = fn.lower(*case).compile().as_text()
    ops = [ln.strip()[:160] for ln in hlo.splitlines() if " = " in ln and "(" in ln]
    assert hlo.count("custom-call(") == (1 if num_splits == 1 else 2), ops
    for op in (" fusion(", " gather(", " scatter(", " transpose(", " pad("):
        assert op not in hlo, (op, ops)
    ref = ragged_paged_attention_ref(*case, max_query_len=1, scale=0.1, **scales)
    assert rel(fn(*case), ref) < GPU_TOL[jnp.bfloat16]


def test_autotune_key_separates_8bit_pages():
    from pallas_kernels import autotune

    mk = lambda kv: autotune.make_key((8, 32, 128), (100, 16, 8, 128), (8, 64), 1, jnp.bfloat16,
                                      kind="H100", kv_dtype=kv)
    plain, same, i8, f8 = mk(None), mk(jnp.bfloat16), mk(jnp.int8), mk(jnp.float8_e4m3fn)
    assert plain == same and plain.id == same.id and "|kv" not in plain.id
    assert len({plain.id, i8.id, f8.id}) == 3 and i8.id.endswith("|kvint8")
    q, kp, vp, pt, sl, qs = autotune.synthetic_inputs(i8, pool_bytes_max=2e6)
    sc = autotune.synthetic_scales(i8, kp.shape[0])
    assert kp.dtype == jnp.int8 and sc["k_scale"].shape == scale_pool_shape(kp.shape)
    assert autotune.synthetic_scales(plain, 4) == {}
