"""Paged attention over the [P, page, KVH, D] page pools: a Pallas (Triton backend) kernel.

One program handles one (sequence, KV head, query block, KV split):
  * its query rows are the `BQ` tokens of the query block times the `G = H // KVH` query heads
    that share the KV head (GQA), so every K/V page is read once for the whole group;
  * it walks the sequence's pages `pages_per_block` at a time (gathered through the page table),
    with an online (flash) softmax in f32, causal + length + optional sliding-window masks and an
    optional logit soft-cap;
  * the page range is split `num_splits` ways (split-K) so that small batches with long contexts
    still fill the GPU; a cheap jnp combine merges the splits by their log-sum-exp.

Decode (max_query_len small) uses one query block holding every query token (rows padded to 16,
the smallest Triton dot). Prefill / mixed steps use query blocks of `block_q` tokens and the
same code (causal block skipping: a query block only walks pages up to its last position).

Everything outside the kernel (query gather, layout, combine, scatter back to [T, H, D]) touches
only O(S * max_query_len * H * D) bytes; the kernel reads each needed K/V page once per
(sequence, KV head, query block).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.reference import gather_queries, scatter_tokens

NEG = -1e30
LOG2E = math.log2(math.e)
NUM_SMS_H100 = 132


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


@dataclass(frozen=True)
class KernelConfig:
    block_q: int              # query tokens per program (decode: all of max_query_len)
    pages_per_block: int      # pages gathered per inner-loop step
    num_splits: int           # split-K partitions of the page range
    num_warps: int = 4
    num_stages: int = 2
    prefetch_pages: bool = True  # carry the next block's page ids through the loop


def supported(q_shape, k_shape) -> bool:
    """Whether the kernel covers these shapes (else callers use the reference)."""
    _, H, D = q_shape
    _, page, KVH, Dk = k_shape
    return (D == Dk and H % KVH == 0 and _is_pow2(D) and D >= 16 and _is_pow2(H // KVH)
            and _is_pow2(page))


def choose_config(S, KVH, G, max_query_len, max_pages, page_size, *, block_k_tokens=None,
                  num_warps=None, num_stages=None, target_programs=None, num_splits=None,
                  prefetch_pages=True, block_q=None):
    """Heuristic launch config. Every knob can be overridden (the benchmark sweeps them, the
    autotuner re-applies cached winners through the overrides)."""
    Q = int(max_query_len)
    if block_q is not None:               # override (autotuner), clamped to the query length
        block_q = max(1, min(int(block_q), Q))
    elif Q * G <= 64:                     # decode / spec-decode: one query block
        block_q = Q
    else:                                 # prefill: ~64 query rows per program
        block_q = max(1, 64 // G)
    nqb = -(-Q // block_q)
    if block_k_tokens is None:
        # measured on H100 (docs/kernels_notes.md): 128-token blocks once the grid is full,
        # 64 when split-K has to make up the programs.
        block_k_tokens = 128 if S * KVH * nqb >= 4 * NUM_SMS_H100 else 64
    ppb = max(1, block_k_tokens // page_size)
    ppb = min(ppb, _next_pow2(max_pages))
    ppb = _next_pow2(ppb) if not _is_pow2(ppb) else ppb
    while ppb * page_size < 16:
        ppb *= 2
    nblocks = -(-max_pages // ppb)
    if num_splits is None:
        if target_programs is None:
            target_programs = 4 * NUM_SMS_H100
        base = S * KVH * nqb
        num_splits = max(1, min(nblocks, -(-target_programs // base)))
    num_splits = max(1, min(int(num_splits), nblocks))
    if num_warps is None:
        num_warps = 4
    if num_stages is None:
        # H100 sweep (docs/kernels_notes.md): 3 stages pay when few splits stream 64-token
        # blocks (B=64: 6-13% faster); with many splits or 128-token blocks they cost up to 30%.
        num_stages = 3 if (num_splits <= 2 and ppb * page_size <= 64) else 2
    return KernelConfig(block_q=block_q, pages_per_block=ppb, num_splits=num_splits,
                        num_warps=num_warps, num_stages=num_stages,
                        prefetch_pages=bool(prefetch_pages))


def _attn_kernel(meta_ref, pt_ref, q_ref, k_ref, v_ref, o_ref, *lse_ref, scale, soft_cap,
                 sliding_window, G, block_q, rows_real, page_size, ppb, pages_per_split,
                 num_splits, precision, prefetch_pages, np_pad):
    qb = pl.program_id(2)
    split = pl.program_id(3)
    M, D = q_ref.shape
    BK = ppb * page_size

    seq_len = meta_ref[0]
    qlen = meta_ref[1]
    rows = jnp.arange(M, dtype=jnp.int32)
    tok_j = qb * block_q + rows // G                      # token index inside the sequence
    qpos = seq_len - qlen + tok_j                         # [M]
    row_ok = (rows < rows_real) & (tok_j < qlen)
    # Padded rows attend to nothing.
    qpos = jnp.where(row_ok, qpos, -1)

    # Key range this (query block, split) needs: [lo_key, hi_key).
    first_tok = qb * block_q
    last_tok = jnp.minimum(qb * block_q + block_q, qlen) - 1
    hi_key = jnp.minimum(seq_len - qlen + last_tok + 1, seq_len)
    split_lo = split * pages_per_split
    hi_page = jnp.minimum(pl.cdiv(jnp.maximum(hi_key, 0), page_size), split_lo + pages_per_split)
    lo_page = split_lo
    if sliding_window is not None:
        lo_key = seq_len - qlen + first_tok - sliding_window + 1
        lo_page = jnp.maximum(lo_page, jnp.maximum(lo_key, 0) // page_size)
        lo_page = split_lo + ((lo_page - split_lo) // ppb) * ppb
    n_it = jnp.maximum(pl.cdiv(hi_page - lo_page, ppb), 0)
    n_it = jnp.where(last_tok >= first_tok, n_it, 0)

    q = q_ref[...]
    if soft_cap is None:
        qk_scale = scale * LOG2E
    kcols = jnp.arange(BK, dtype=jnp.int32)

    def body(i, carry):
        if prefetch_pages:
            # The page ids of this block came in the carry: the K/V addresses are known at the
            # top of the iteration, so Triton's pipeliner can issue the gathers ahead.
            acc, m_prev, l_prev, pages = carry
        else:
            acc, m_prev, l_prev = carry
        p0 = lo_page + i * ppb
        if not prefetch_pages:
            pages = pt_ref[pl.ds(p0, ppb)]
        k = k_ref[pages].reshape(BK, D)
        s = pltriton.dot(q, k, trans_b=True, precision=precision)        # [M, BK] f32
        if soft_cap is None:
            s = s * qk_scale
        else:
            s = (soft_cap * LOG2E) * jnp.tanh(s * (scale / soft_cap))
        kpos = p0 * page_size + kcols
        mask = kpos[None, :] <= qpos[:, None]
        if sliding_window is not None:
            mask &= kpos[None, :] > (qpos[:, None] - sliding_window)
        s = jnp.where(mask, s, NEG)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        corr = jnp.exp2(m_prev - m_next)
        p = jnp.where(mask, jnp.exp2(s - m_next[:, None]), 0.0)
        l_next = l_prev * corr + p.sum(axis=1)
        v = v_ref[pages].reshape(BK, D)
        acc = acc * corr[:, None] + pltriton.dot(p.astype(v.dtype), v, precision=precision)
        if prefetch_pages:
            nxt = pt_ref[pl.ds(jnp.minimum(p0 + ppb, np_pad - ppb), ppb)]
            return acc, m_next, l_next, nxt
        return acc, m_next, l_next

    acc0 = jnp.zeros((M, D), jnp.float32)
    m0 = jnp.full((M,), NEG, jnp.float32)
    l0 = jnp.zeros((M,), jnp.float32)
    if prefetch_pages:
        pages0 = pt_ref[pl.ds(jnp.minimum(lo_page, np_pad - ppb), ppb)]
        acc, m, l, _ = lax.fori_loop(0, n_it, body, (acc0, m0, l0, pages0))
    else:
        acc, m, l = lax.fori_loop(0, n_it, body, (acc0, m0, l0))
    has = l > 0.0
    out = acc / jnp.where(has, l, 1.0)[:, None]
    o_ref[...] = out.astype(o_ref.dtype)
    if lse_ref:
        # log2-domain log-sum-exp; NEG for rows that saw no key in this split.
        lse_ref[0][...] = jnp.where(has, m + jnp.log2(jnp.where(has, l, 1.0)), NEG)


@functools.partial(jax.jit, static_argnames=(
    "max_query_len", "scale", "soft_cap", "sliding_window", "config", "interpret"))
def paged_attention_kernel(q, k_pages, v_pages, page_table, seq_lens, query_start, *,
                           max_query_len: int, scale: float, soft_cap: float | None = None,
                           sliding_window: int | None = None, config: KernelConfig | None = None,
                           interpret: bool = False):
    """Ragged paged attention with the reference's exact contract, via the Pallas kernel."""
    T, H, D = q.shape
    P, page_size, KVH, _ = k_pages.shape
    S, max_pages = page_table.shape
    G = H // KVH
    Q = int(max_query_len)
    if config is None:
        config = choose_config(S, KVH, G, Q, max_pages, page_size)
    block_q, ppb, nsplit = config.block_q, config.pages_per_block, config.num_splits
    nqb = -(-Q // block_q)
    rows_real = block_q * G
    M = max(16, _next_pow2(rows_real))

    # Page table padded so every split owns a whole number of page blocks.
    nblocks = -(-max_pages // ppb)
    pages_per_split = -(-nblocks // nsplit) * ppb
    np_pad = pages_per_split * nsplit
    pt = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, np_pad - max_pages)))

    q_seq, tok, valid, qlen = gather_queries(q, query_start, Q)           # [S, Q, H, D]
    meta = jnp.stack([seq_lens.astype(jnp.int32), qlen], axis=1)           # [S, 2]
    qx = jnp.pad(q_seq, ((0, 0), (0, nqb * block_q - Q), (0, 0), (0, 0)))
    qx = qx.reshape(S, nqb, block_q, KVH, G, D).transpose(0, 3, 1, 2, 4, 5)
    qx = qx.reshape(S, KVH, nqb, rows_real, D)
    qx = jnp.pad(qx, ((0, 0), (0, 0), (0, 0), (0, M - rows_real), (0, 0)))

    kernel = functools.partial(
        _attn_kernel, scale=float(scale), soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=None if sliding_window is None else int(sliding_window), G=G,
        block_q=block_q, rows_real=rows_real, page_size=page_size, ppb=ppb,
        pages_per_split=pages_per_split, num_splits=nsplit,
        prefetch_pages=config.prefetch_pages, np_pad=np_pad,
        precision=(lax.Precision.HIGHEST if q.dtype == jnp.float32 else None))
    in_specs = [
        pl.BlockSpec((None, 2), lambda s, h, b, k: (s, 0)),
        pl.BlockSpec((None, np_pad), lambda s, h, b, k: (s, 0)),
        pl.BlockSpec((None, None, None, M, D), lambda s, h, b, k: (s, h, b, 0, 0)),
        pl.BlockSpec((P, page_size, None, D), lambda s, h, b, k: (0, 0, h, 0)),
        pl.BlockSpec((P, page_size, None, D), lambda s, h, b, k: (0, 0, h, 0)),
    ]
    if nsplit == 1:
        out_shape = jax.ShapeDtypeStruct((S, KVH, nqb, M, D), q.dtype)
        out_specs = pl.BlockSpec((None, None, None, M, D), lambda s, h, b, k: (s, h, b, 0, 0))
    else:
        out_shape = [jax.ShapeDtypeStruct((S, KVH, nqb, nsplit, M, D), jnp.float32),
                     jax.ShapeDtypeStruct((S, KVH, nqb, nsplit, M), jnp.float32)]
        out_specs = [
            pl.BlockSpec((None, None, None, None, M, D), lambda s, h, b, k: (s, h, b, k, 0, 0)),
            pl.BlockSpec((None, None, None, None, M), lambda s, h, b, k: (s, h, b, k, 0)),
        ]
    res = pl.pallas_call(
        kernel,
        grid=(S, KVH, nqb, nsplit),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps,
                                                num_stages=config.num_stages),
        interpret=interpret,
        name=f"imp_paged_attn_M{M}_bk{ppb * page_size}_sp{nsplit}",
    )(meta, pt, qx, k_pages, v_pages)

    if nsplit == 1:
        o = res.astype(jnp.float32)
    else:
        o_sp, lse = res                                                     # combine (split-K)
        mx = lse.max(axis=3, keepdims=True)
        w = jnp.exp2(lse - mx)                                              # [S,KVH,nqb,nsplit,M]
        o = (o_sp * w[..., None]).sum(axis=3) / w.sum(axis=3)[..., None]
    o = o[:, :, :, :rows_real].reshape(S, KVH, nqb, block_q, G, D)
    o = o.transpose(0, 2, 3, 1, 4, 5).reshape(S, nqb * block_q, H, D)[:, :Q]
    return scatter_tokens(o, tok, valid, T, q.dtype)


def paged_decode_attention(q, k_pages, v_pages, page_table, seq_lens, query_start, *,
                           max_query_len: int = 1, scale: float, soft_cap=None,
                           sliding_window=None, config=None, interpret=False):
    """Decode entry (max_query_len tokens per sequence, 1 for plain decode)."""
    return paged_attention_kernel(q, k_pages, v_pages, page_table, seq_lens, query_start,
                                  max_query_len=max_query_len, scale=scale, soft_cap=soft_cap,
                                  sliding_window=sliding_window, config=config,
                                  interpret=interpret)
