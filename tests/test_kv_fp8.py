"""FP8 (e4m3) KV cache with per-token, per-head scales."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imp_jax
from imp_jax.cache import FP8, KVCache, quantize_fp8, write_kv
from imp_jax.loaders import load_model
from pallas_kernels import ragged_paged_attention
from pallas_kernels.reference import ragged_paged_attention_ref

TINY = os.path.join(os.path.dirname(__file__), "data", "tiny", "llama3")


def test_quantize_fp8_error_is_bounded_per_token():
    x = jax.random.normal(jax.random.key(0), (64, 4, 128)) * jnp.linspace(0.01, 30, 64)[:, None, None]
    q, s = quantize_fp8(x)
    back = q.astype(jnp.float32) * s[..., None]
    rel = jnp.abs(back - x).max(-1) / jnp.abs(x).max(-1)
    assert q.dtype == FP8 and s.shape == (64, 4)
    assert float(rel.max()) < 2 ** -3  # e4m3: 3 mantissa bits, scale per token and head


def test_attention_over_fp8_pages_tracks_float_pages():
    rng = np.random.default_rng(0)
    P, page, KVH, D, H = 32, 8, 2, 64, 8
    k = jnp.asarray(rng.normal(size=(P * page, KVH, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(P * page, KVH, D)), jnp.float32)
    slots = jnp.arange(P * page, dtype=jnp.int32)
    f_k, f_v, _, _ = write_kv(jnp.zeros((P, page, KVH, D)), jnp.zeros((P, page, KVH, D)),
                              k, v, slots)
    q_k, q_v, ks, vs = write_kv(jnp.zeros((P, page, KVH, D), FP8), jnp.zeros((P, page, KVH, D), FP8),
                                k, v, slots, jnp.ones((P, page, KVH)), jnp.ones((P, page, KVH)))
    q = jnp.asarray(rng.normal(size=(3, H, D)), jnp.float32)
    page_table = jnp.asarray(rng.permutation(P)[:12].reshape(3, 4), jnp.int32)
    args = (page_table, jnp.array([30, 17, 9], jnp.int32), jnp.arange(4, dtype=jnp.int32))
    kw = dict(max_query_len=1, scale=D ** -0.5)
    ref = ragged_paged_attention_ref(q, f_k, f_v, *args, **kw)
    out = ragged_paged_attention(q, q_k, q_v, *args, k_scale=ks, v_scale=vs, **kw)
    err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 0 < err < 0.05


def test_llm_with_fp8_kv_cache_stays_close_and_holds_more_pages():
    model = load_model(TINY)
    kw = dict(loaded=model, max_model_len=128, page_size=4, max_num_seqs=4)
    plain = imp_jax.LLM(TINY, num_pages=64, **kw)
    fp8 = imp_jax.LLM(TINY, num_pages=64, kv_cache_dtype="fp8", **kw)
    assert fp8.runner.cache.k[0].dtype == FP8 and fp8.runner.cache.k_scale is not None
    ids = list(range(3, 40))
    a, b = plain.logits(ids), fp8.logits(ids)
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
    assert (np.argmax(a, -1) == np.argmax(b, -1)).mean() > 0.9
    out = fp8.generate([ids], temperature=0, max_tokens=8, use_tqdm=False)[0]
    assert len(out.token_ids) == 8
    f32 = KVCache.bytes_per_token(model.cfg, jnp.float32)
    e4m3 = KVCache.bytes_per_token(model.cfg, FP8)
    assert e4m3 < f32 / 3 and e4m3 < KVCache.bytes_per_token(model.cfg, jnp.bfloat16) / 1.5
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        imp_jax.LLM(TINY, kv_cache_dtype="int4", **kw)
