"""Pure-jnp oracle for ragged paged attention (the contract of docs/architecture.md).

This is both the CPU path of the model and the reference every Pallas kernel is tested against.

Layout:
  q           [T, H, D]                 flat ragged batch of query tokens
  k_pages     [P, page_size, KVH, D]    one layer's key page pool (v_pages alike)
  page_table  int32[S, max_pages]       pages of each sequence, in order (padding -> page 0)
  seq_lens    int32[S]                  context length of each sequence *after* this step
  query_start int32[S+1]                sequence s owns tokens query_start[s]:query_start[s+1]

Quantized pools: float8_e4m3fn or int8 pages with `k_scale` / `v_scale` float32
[P, page_size, KVH] (one scale per token and KV head); a key is `k_pages[...] * k_scale[...]`.

Token j of sequence s (qlen_s = query_start[s+1] - query_start[s]) sits at position
`seq_lens[s] - qlen_s + j` and attends to keys at positions <= its own (all < seq_lens[s]).
With `sliding_window=W` it also needs `key_pos > query_pos - W` (the W most recent positions,
itself included: the Mistral / HF convention). `soft_cap=c` maps the scaled logits through
`c * tanh(logits / c)` (Gemma 2). Head h reads KV head h // (H // KVH). Tokens at or beyond
query_start[S] (padding) get zeros.

Memory: K/V are gathered per sequence to [S, max_pages*page_size, KVH, D] and the logits are
[S, KVH, G, max_query_len, max_pages*page_size] f32 -- never [T, ctx, ...].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30


def gather_queries(q, query_start, max_query_len: int):
    """q[T,H,D] -> (q_seq [S, Q, H, D], token index [S, Q], valid [S, Q], qlen [S])."""
    T = q.shape[0]
    query_start = query_start.astype(jnp.int32)
    qlen = query_start[1:] - query_start[:-1]
    j = jnp.arange(max_query_len, dtype=jnp.int32)
    tok = query_start[:-1, None] + j[None, :]
    valid = (j[None, :] < qlen[:, None]) & (tok < T)
    q_seq = q[jnp.clip(tok, 0, T - 1)]
    return q_seq, tok, valid, qlen


def scatter_tokens(out_seq, tok, valid, T: int, dtype):
    """out_seq [S, Q, H, D] back to the flat [T, H, D]; invalid rows are dropped (zeros)."""
    S, Q, H, D = out_seq.shape
    idx = jnp.where(valid, tok, T).reshape(S * Q)
    out = jnp.zeros((T, H, D), dtype)
    return out.at[idx].set(out_seq.reshape(S * Q, H, D).astype(dtype), mode="drop")


@functools.partial(jax.jit, static_argnames=("max_query_len", "scale", "soft_cap", "sliding_window"))
def ragged_paged_attention_ref(q, k_pages, v_pages, page_table, seq_lens, query_start, *,
                               max_query_len: int, scale: float, soft_cap: float | None = None,
                               sliding_window: int | None = None, k_scale=None, v_scale=None):
    T, H, D = q.shape
    _, page_size, KVH, _ = k_pages.shape
    S, max_pages = page_table.shape
    if H % KVH:
        raise ValueError(f"H={H} not a multiple of KVH={KVH}")
    G = H // KVH
    Q = int(max_query_len)
    C = max_pages * page_size
    seq_lens = seq_lens.astype(jnp.int32)

    q_seq, tok, valid, qlen = gather_queries(q, query_start, Q)            # [S, Q, H, D]
    k = k_pages[page_table].reshape(S, C, KVH, D)                          # [S, C, KVH, D]
    v = v_pages[page_table].reshape(S, C, KVH, D)
    if k_scale is not None:  # fp8 / int8 pages: dequantize only what was gathered
        # scale pools [P, KVH, page] -> per gathered key [S, C, KVH, 1]
        ks = jnp.swapaxes(k_scale[page_table], 2, 3).reshape(S, C, KVH, 1)
        vs = jnp.swapaxes(v_scale[page_table], 2, 3).reshape(S, C, KVH, 1)
        k = k.astype(jnp.float32) * ks
        v = v.astype(jnp.float32) * vs
    qg = q_seq.reshape(S, Q, KVH, G, D)

    hi = jax.lax.Precision.HIGHEST
    logits = jnp.einsum("sqkgd,sckd->skgqc", qg, k, preferred_element_type=jnp.float32,
                        precision=hi) * jnp.float32(scale)
    if soft_cap is not None:
        logits = jnp.float32(soft_cap) * jnp.tanh(logits / jnp.float32(soft_cap))

    qpos = seq_lens[:, None] - qlen[:, None] + jnp.arange(Q, dtype=jnp.int32)[None, :]   # [S, Q]
    kpos = jnp.arange(C, dtype=jnp.int32)
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < seq_lens[:, None, None])
    if sliding_window is not None:
        mask &= kpos[None, None, :] > (qpos[:, :, None] - int(sliding_window))
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("skgqc,sckd->sqkgd", probs, v.astype(jnp.float32), precision=hi)
    return scatter_tokens(out.reshape(S, Q, H, D), tok, valid, T, q.dtype)
