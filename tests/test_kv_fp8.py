"""8-bit KV caches: FP8 (e4m3) and int8 pages with per-token, per-head float32 scales."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imp_jax
import pallas_kernels
from imp_jax.cache import (FP8, INT8, KVCache, is_quantized, quantize_fp8, quantize_int8,
                           quantize_kv, write_kv)
from imp_jax.llm import KV_CACHE_DTYPES, resolve_kv_cache_dtype
from imp_jax.loaders import load_model
from pallas_kernels import ragged_paged_attention
from pallas_kernels.reference import ragged_paged_attention_ref

TINY = os.path.join(os.path.dirname(__file__), "data", "tiny", "llama3")
KV8 = {"fp8": FP8, "int8": INT8}
on_gpu = jax.default_backend() == "gpu"


def test_quantize_fp8_error_is_bounded_per_token():
    x = jax.random.normal(jax.random.key(0), (64, 4, 128)) * jnp.linspace(0.01, 30, 64)[:, None, None]
    q, s = quantize_fp8(x)
    back = q.astype(jnp.float32) * s[..., None]
    rel = jnp.abs(back - x).max(-1) / jnp.abs(x).max(-1)
    assert q.dtype == FP8 and s.shape == (64, 4)
    assert float(rel.max()) < 2 ** -3  # e4m3: 3 mantissa bits, scale per token and head


def test_quantize_int8_symmetric_and_bounded_per_token():
    x = jax.random.normal(jax.random.key(1), (64, 4, 128)) * jnp.linspace(0.01, 30, 64)[:, None, None]
    q, s = quantize_int8(x)
    assert q.dtype == INT8 and s.shape == (64, 4)
    qi = np.asarray(q, np.int32)
    assert qi.min() >= -127 and qi.max() <= 127
    assert np.all(np.abs(qi).max(-1) == 127)          # the largest magnitude maps to +-127
    back = q.astype(jnp.float32) * s[..., None]
    # round to nearest: |error| <= scale / 2 = max|x| / 254 per token and head
    err = jnp.abs(back - x).max(-1) / jnp.abs(x).max(-1)
    assert float(err.max()) <= 1 / 254 * (1 + 1e-5)
    # symmetric: -x quantizes to -q
    qn, sn = quantize_int8(-x)
    assert np.array_equal(np.asarray(qn), -qi) and np.allclose(sn, s)
    assert quantize_kv(x, jnp.int8)[0].dtype == INT8 and quantize_kv(x, FP8)[0].dtype == FP8
    with pytest.raises(ValueError, match="bfloat16"):
        quantize_kv(x, jnp.bfloat16)


def test_write_kv_refuses_8bit_pools_without_scales():
    z = jnp.zeros((4, 8, 2, 16), INT8)
    k = jnp.ones((3, 2, 16))
    with pytest.raises(ValueError, match="int8"):
        write_kv(z, z, k, k, jnp.arange(3, dtype=jnp.int32))


@pytest.mark.parametrize("kv", [None, "fp8"])
def test_write_kv_drops_padding_slots_and_promises_unique_indices(kv):
    # Padding slots (-1) go out of bounds, each to its own slot, so the scatters can promise
    # unique indices (plain stores on a GPU); real slots land where they say, nothing else
    # changes.
    P, page, KVH, D = 4, 8, 2, 16
    rng = np.random.default_rng(3)
    k = jnp.asarray(rng.normal(size=(6, KVH, D)), jnp.float32)
    slots = jnp.array([5, -1, 17, -1, -1, 30], jnp.int32)
    dt = jnp.float32 if kv is None else KV8[kv]
    scales = () if kv is None else (jnp.ones((P, KVH, page)), jnp.ones((P, KVH, page)))
    pools = (jnp.zeros((P, page, KVH, D), dt), jnp.zeros((P, page, KVH, D), dt))
    k_pages, _, k_scale, _ = write_kv(*pools, k, k, slots, *scales)
    flat = np.asarray(k_pages.astype(jnp.float32)).reshape(P * page, KVH, D)
    if kv is not None:  # dequantize: scales are [P, KVH, page]
        flat = flat * np.asarray(k_scale).transpose(0, 2, 1).reshape(P * page, KVH, 1)
    written = [5, 17, 30]
    np.testing.assert_allclose(flat[written], np.asarray(k)[[0, 2, 5]],
                               rtol=0 if kv is None else 0.07, atol=0 if kv is None else 0.02)
    assert not np.any(np.delete(flat, written, axis=0))  # padding wrote nowhere
    hlo = jax.jit(write_kv).lower(*pools, k, k, slots, *scales).as_text()
    assert hlo.count("unique_indices = true") == (2 if kv is None else 4)


def _pools(kv, k, v, P, page, KVH, D):
    slots = jnp.arange(P * page, dtype=jnp.int32)
    if kv is None:
        return write_kv(jnp.zeros((P, page, KVH, D)), jnp.zeros((P, page, KVH, D)), k, v, slots)
    dt = KV8[kv]
    return write_kv(jnp.zeros((P, page, KVH, D), dt), jnp.zeros((P, page, KVH, D), dt), k, v,
                    slots, jnp.ones((P, KVH, page)), jnp.ones((P, KVH, page)))


@pytest.mark.parametrize("kv,bound", [("fp8", 0.08), ("int8", 0.02)])
def test_attention_over_8bit_pages_tracks_float_pages(kv, bound):
    rng = np.random.default_rng(0)
    P, page, KVH, D, H = 32, 8, 2, 64, 8
    mag = np.exp(rng.uniform(-2, 2, (P * page, KVH, 1)))   # scales differ per token and head
    k = jnp.asarray(rng.normal(size=(P * page, KVH, D)) * mag, jnp.float32)
    v = jnp.asarray(rng.normal(size=(P * page, KVH, D)) * mag[::-1], jnp.float32)
    f_k, f_v, _, _ = _pools(None, k, v, P, page, KVH, D)
    q_k, q_v, ks, vs = _pools(kv, k, v, P, page, KVH, D)
    assert q_k.dtype == KV8[kv] and ks.dtype == jnp.float32
    q = jnp.asarray(rng.normal(size=(3, H, D)), jnp.float32)
    page_table = jnp.asarray(rng.permutation(P)[:12].reshape(3, 4), jnp.int32)
    args = (page_table, jnp.array([30, 17, 9], jnp.int32), jnp.arange(4, dtype=jnp.int32))
    kw = dict(max_query_len=1, scale=D ** -0.5)
    ref = ragged_paged_attention_ref(q, f_k, f_v, *args, **kw)
    out = ragged_paged_attention(q, q_k, q_v, *args, k_scale=ks, v_scale=vs, **kw)
    err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 0 < err < bound
    # the Pallas kernel (interpret mode here) reads the same pages and scales
    kern = ragged_paged_attention(q, q_k, q_v, *args, k_scale=ks, v_scale=vs, interpret=True,
                                  **kw)
    assert float(jnp.linalg.norm(kern - out) / jnp.linalg.norm(out)) < 1e-4


def test_kv_cache_dtype_names_and_bytes():
    model = load_model(TINY)
    cfg = model.cfg
    assert resolve_kv_cache_dtype("int8", jnp.float32) == jnp.int8
    assert "int8" in KV_CACHE_DTYPES
    assert resolve_kv_cache_dtype("fp8", jnp.bfloat16) == FP8
    assert resolve_kv_cache_dtype("auto", jnp.bfloat16) == jnp.bfloat16
    assert is_quantized(jnp.int8) and is_quantized(FP8) and not is_quantized(jnp.bfloat16)
    per_head = {d: KVCache.bytes_per_token(cfg, d) // (2 * cfg.num_layers * cfg.num_kv_heads)
                for d in (INT8, FP8, jnp.bfloat16)}
    assert per_head[INT8] == per_head[FP8] == cfg.head_dim + 4            # values + f32 scale
    assert per_head[jnp.bfloat16] == 2 * cfg.head_dim
    cache = KVCache.create(cfg, 8, 4, jnp.int8)
    assert cache.k[0].dtype == INT8 and cache.k_scale[0].shape == (8, cfg.num_kv_heads, 4)
    kw = dict(loaded=model, max_model_len=64, page_size=4, max_num_seqs=2, num_pages=16)
    for bad in ("int4", "fp8_e5m2", "INT8"):
        with pytest.raises(ValueError, match=f"kv_cache_dtype.*'int8'.*got '{bad}'"):
            imp_jax.LLM(TINY, kv_cache_dtype=bad, **kw)


def _close_to_plain(model, kv, attn_impl="auto", greedy_tokens=8):
    kw = dict(loaded=model, max_model_len=128, page_size=4, max_num_seqs=4, num_pages=64,
              attn_impl=attn_impl)
    plain = imp_jax.LLM(TINY, **kw)
    q8 = imp_jax.LLM(TINY, kv_cache_dtype=kv, **kw)
    assert q8.runner.cache.k[0].dtype == KV8[kv] and q8.runner.cache.k_scale is not None
    ids = list(range(3, 40))
    a, b = plain.logits(ids), q8.logits(ids)
    diff = np.abs(a - b).max() / np.abs(a).max()
    assert diff < 0.1
    assert (np.argmax(a, -1) == np.argmax(b, -1)).mean() > 0.9
    want = plain.generate([ids], temperature=0, max_tokens=greedy_tokens, use_tqdm=False)[0]
    got = q8.generate([ids], temperature=0, max_tokens=greedy_tokens, use_tqdm=False)[0]
    assert len(got.token_ids) == greedy_tokens
    return diff, want.token_ids, got.token_ids


def test_llm_with_fp8_kv_cache_stays_close_and_holds_more_pages():
    model = load_model(TINY)
    _close_to_plain(model, "fp8")
    f32 = KVCache.bytes_per_token(model.cfg, jnp.float32)
    e4m3 = KVCache.bytes_per_token(model.cfg, FP8)
    assert e4m3 < f32 / 3 and e4m3 < KVCache.bytes_per_token(model.cfg, jnp.bfloat16) / 1.5


def test_llm_with_int8_kv_cache_stays_close():
    model = load_model(TINY)
    diff, want, got = _close_to_plain(model, "int8")
    assert diff < 0.02                      # int8 keeps ~4 more bits than e4m3
    assert got == want                      # greedy tokens of the tiny model unchanged
    assert KVCache.bytes_per_token(model.cfg, INT8) == KVCache.bytes_per_token(model.cfg, FP8)


@pytest.mark.parametrize("kv", ["int8", pytest.param("fp8", marks=pytest.mark.gpu)])
def test_llm_8bit_kv_through_the_kernel(kv, monkeypatch):
    """The model's Pallas path over 8-bit pools matches the reference path: compiled on a GPU
    (both dtypes), interpret mode on CPU (int8 only, for time: the kernel tests cover fp8)."""
    model = load_model(TINY)
    kw = dict(loaded=model, max_model_len=64, page_size=4, max_num_seqs=2, num_pages=32,
              kv_cache_dtype=kv)
    ref = imp_jax.LLM(TINY, attn_impl="reference", **kw)
    if not on_gpu:
        monkeypatch.setattr(pallas_kernels, "ragged_paged_attention", functools.partial(
            pallas_kernels.ragged_paged_attention, interpret=True))
    kern = imp_jax.LLM(TINY, attn_impl="pallas", **kw)
    ids = list(range(5, 26))
    a, b = ref.logits(ids), kern.logits(ids)
    assert np.abs(a - b).max() < (2e-2 if on_gpu else 1e-3) * np.abs(a).max()
    want = ref.generate([ids], temperature=0, max_tokens=4, use_tqdm=False)[0].token_ids
    got = kern.generate([ids], temperature=0, max_tokens=4, use_tqdm=False)[0].token_ids
    assert got == want


def test_fp8_pages_default_to_64_tokens():
    # decode_mgpu reads a 64-key block of e4m3 pages as one TMA box (H200: 256 x 2048 -10%,
    # one FP8 decode step -15%); other pools keep pages of 16, and a given page_size wins
    model = load_model(TINY)
    kw = dict(loaded=model, max_model_len=128, max_num_seqs=2, num_pages=8)
    sizes = {kv: imp_jax.LLM(TINY, kv_cache_dtype=kv, **kw).runner.page_size
             for kv in ("fp8", "int8", "auto")}
    assert sizes == {"fp8": 64, "int8": 16, "auto": 16}
    llm = imp_jax.LLM(TINY, kv_cache_dtype="fp8", page_size=4, **kw)
    assert llm.runner.page_size == 4 and llm.runner.cache.k[0].shape[1] == 4
    assert imp_jax.llm.default_page_size(FP8) == 64
    with pytest.raises(ValueError, match="page_size must be a power of two, got 48"):
        imp_jax.LLM(TINY, kv_cache_dtype="fp8", page_size=48, **kw)
