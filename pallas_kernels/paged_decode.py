"""Paged attention over the [P, page, KVH, D] page pools: a Pallas (Triton backend) kernel.

One program handles one (sequence, KV head, query block, KV split):
  * its query rows are the `BQ` tokens of the query block times the `G = H // KVH` query heads
    that share the KV head (GQA), so every K/V page is read once for the whole group;
  * it walks the sequence's pages `pages_per_block` at a time (gathered through the page table),
    with an online (flash) softmax in f32, causal + length + optional sliding-window masks and an
    optional logit soft-cap;
  * the page range is split `num_splits` ways (split-K) so that small batches with long contexts
    still fill the GPU; a second small Pallas kernel merges the splits by their log-sum-exp.

Decode (max_query_len small) uses one query block holding every query token (rows padded to 16,
the smallest Triton dot). Prefill / mixed steps use query blocks of `block_q` tokens and the
same code (causal block skipping: a query block only walks pages up to its last position).

Quantized pools: float8_e4m3fn or int8 pages with one float32 scale per token and KV head
(`k_scale`/`v_scale` [P, KVH, page], the layout of imp_jax/cache.py). The kernel loads the
8-bit tile, converts it to the query dtype (exact: every e4m3 and int8 value is a bf16 value)
and applies the scales outside the dots: K's scale multiplies the logit columns, V's scale
multiplies the probability columns before the PV dot (see `_attn_kernel`).

No XLA op runs around the kernel in the common case: the kernel reads each query row straight
from the flat q [T*H, D] at `query_start[s]` (a reshape of [T, H, D], no copy), masks the page
table tail instead of padding it, and writes its output rows straight into [T*H, D], zeroing
the padding tokens `query_start[S]:T` itself. With split-K the kernel writes f32 partials and the
combine kernel writes the final rows, so a step is one launch (one split) or two.
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


NEG = -1e30
LOG2E = math.log2(math.e)
NUM_SMS_H100 = 132
UNROLL_SPLITS = 64  # the combine's loops over splits unroll up to here (_combine_kernel)


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


QUANT_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.int8))


def supported(q_shape, k_shape, k_dtype=None) -> bool:
    """Whether the kernel covers these shapes (else callers use the reference).

    k_dtype (optional): the page dtype; float pages or the 8-bit QUANT_DTYPES (with scales)."""
    _, H, D = q_shape
    _, page, KVH, Dk = k_shape
    if k_dtype is not None:
        dt = jnp.dtype(k_dtype)
        if not (jnp.issubdtype(dt, jnp.floating) or dt in QUANT_DTYPES):
            return False
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


def _rows(M: int, G: int, h):
    """Row m of a program's tile: query token m // G of its block, query head h*G + m % G."""
    r = jnp.arange(M, dtype=jnp.int32)
    return r // G, h * G + r % G


def _store_rows(o_ref, vals, tok, head, ok, H: int):
    """vals [M, D] -> rows tok*H + head of the flat output o_ref [T*H, D], where ok.

    Masked-off rows are not written. Their row indices are never those of an `ok` row of the
    same store (they are other tokens), so interpret mode's masked scatter cannot clobber one."""
    M, D = vals.shape
    cols = jnp.arange(D, dtype=jnp.int32)
    ridx = tok * H + head
    mask = jnp.broadcast_to(ok[:, None], (M, D))
    pltriton.store(o_ref.at[ridx[:, None], cols[None, :]], vals.astype(o_ref.dtype), mask=mask)


def _zero_padding_tokens(o_ref, qs_ref, *, s, h, enabled, M, G, H, S, T, D):
    """Zero the padding tokens query_start[S]:T (no sequence owns them) for head group h.

    Program s of the grid takes token chunks s, s + S, s + 2S, ... of `M // G` tokens each, so
    every padding token is written exactly once per head group, with no extra launch."""
    zt = M // G
    start = qs_ref[S]
    n_pad = jnp.maximum(T - start, 0)
    n = jnp.where(enabled, pl.cdiv(n_pad, S * zt), 0)
    tok_off, head = _rows(M, G, h)
    zeros = jnp.zeros((M, D), jnp.float32)

    def body(j, c):
        tok = start + (j * S + s) * zt + tok_off
        _store_rows(o_ref, zeros, tok, head, tok < T, H)
        return c

    lax.fori_loop(0, n, body, 0)


def _attn_kernel(sl_ref, qs_ref, pt_ref, q_ref, k_ref, v_ref, *refs, scale, soft_cap,
                 sliding_window, G, H, block_q, rows_real, page_size, ppb, pages_per_split,
                 num_splits, precision, prefetch_pages, max_pages, M, D, T, S, quantized):
    if quantized:
        ks_ref, vs_ref, *out_refs = refs
    else:
        out_refs = refs
    s_id = pl.program_id(0)
    h = pl.program_id(1)
    qb = pl.program_id(2)
    split = pl.program_id(3)
    BK = ppb * page_size

    seq_len = sl_ref[s_id]
    q0 = qs_ref[s_id]
    qlen = qs_ref[s_id + 1] - q0
    tok_off, head = _rows(M, G, h)
    tok_j = qb * block_q + tok_off                        # token index inside the sequence
    row_ok = (tok_off < block_q) & (tok_j < qlen)
    # Padded rows attend to nothing.
    qpos = jnp.where(row_ok, seq_len - qlen + tok_j, -1)

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

    # Query rows straight from the flat [T*H, D] q (rows past the query clamp to a real row;
    # they are masked everywhere below).
    q_row = jnp.clip((q0 + tok_j) * H + head, 0, T * H - 1)
    q = q_ref[q_row, :]                                   # [M, D]
    cdt = q.dtype                                         # dot operand dtype
    if soft_cap is None:
        qk_scale = scale * LOG2E
    kcols = jnp.arange(BK, dtype=jnp.int32)
    pcols = jnp.arange(ppb, dtype=jnp.int32)

    def page_ids(p0):
        # The page table is not padded: ids past max_pages read as page 0 (masked keys anyway).
        return pltriton.load(pt_ref.at[pl.ds(p0, ppb)], mask=(p0 + pcols) < max_pages, other=0)

    def body(i, carry):
        if prefetch_pages:
            # The page ids of this block came in the carry: the K/V addresses are known at the
            # top of the iteration, so Triton's pipeliner can issue the gathers ahead.
            acc, m_prev, l_prev, pages = carry
        else:
            acc, m_prev, l_prev = carry
        p0 = lo_page + i * ppb
        if not prefetch_pages:
            pages = page_ids(p0)
        k = k_ref[pages].reshape(BK, D)
        s = pltriton.dot(q, k.astype(cdt), trans_b=True, precision=precision)  # [M, BK] f32
        if quantized:
            # Per-token K scale: q . (k8 * ks) == (q . k8) * ks, so scale the BK logit columns
            # (f32) instead of BK*D elements; the dot then sees k8 exactly (e4m3 and int8 are
            # exact in bf16), which is as accurate as dequantizing first and cheaper.
            ks = ks_ref[pages].reshape(BK)
        if soft_cap is None:
            s = s * ((ks * qk_scale)[None, :] if quantized else qk_scale)
        else:
            if quantized:
                s = s * ks[None, :]
            s = (soft_cap * LOG2E) * jnp.tanh(s * (scale / soft_cap))
        kpos = p0 * page_size + kcols
        mask = kpos[None, :] <= qpos[:, None]
        if sliding_window is not None:
            mask &= kpos[None, :] > (qpos[:, None] - sliding_window)
        s = jnp.where(mask, s, NEG)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        corr = jnp.exp2(m_prev - m_next)
        p = jnp.where(mask, jnp.exp2(s - m_next[:, None]), 0.0)
        l_next = l_prev * corr + p.sum(axis=1)        # the softmax sum uses the unscaled p
        v = v_ref[pages].reshape(BK, D)
        if quantized:
            # Per-token V scale: sum_n p[m,n] * (v8[n] * vs[n]) == sum_n (p[m,n] * vs[n]) * v8[n]:
            # fold vs into the [M, BK] probabilities (f32, before their cast to the dot dtype)
            # rather than dequantizing [BK, D] values. The cast of p*vs rounds like the cast
            # of p does on the unquantized path, so the error is the same.
            vs = vs_ref[pages].reshape(BK)
            p_dot = (p * vs[None, :]).astype(cdt)
        else:
            p_dot = p.astype(cdt)
        acc = acc * corr[:, None] + pltriton.dot(p_dot, v.astype(cdt), precision=precision)
        if prefetch_pages:
            return acc, m_next, l_next, page_ids(p0 + ppb)
        return acc, m_next, l_next

    acc0 = jnp.zeros((M, D), jnp.float32)
    m0 = jnp.full((M,), NEG, jnp.float32)
    l0 = jnp.zeros((M,), jnp.float32)
    if prefetch_pages:
        acc, m, l, _ = lax.fori_loop(0, n_it, body, (acc0, m0, l0, page_ids(lo_page)))
    else:
        acc, m, l = lax.fori_loop(0, n_it, body, (acc0, m0, l0))
    has = l > 0.0
    out = acc / jnp.where(has, l, 1.0)[:, None]
    if num_splits == 1:
        (o_ref,) = out_refs
        _store_rows(o_ref, out, q0 + tok_j, head, row_ok, H)
        _zero_padding_tokens(o_ref, qs_ref, s=s_id, h=h, enabled=qb == 0, M=M, G=G, H=H, S=S,
                             T=T, D=D)
    else:
        o_ref, lse_ref = out_refs
        o_ref[...] = out
        # log2-domain log-sum-exp; NEG for rows that saw no key in this split.
        lse_ref[...] = jnp.where(has, m + jnp.log2(jnp.where(has, l, 1.0)), NEG)


def merge_partials(lses, outs, bcast):
    """The split-K merge, shared by the combine kernel and decode_mgpu's cluster merge: the
    splits' normalised rows `outs` weighted by exp2 of their log2-sum-exp `lses` against the
    largest, summed and renormalised. bcast spreads a per-row weight over a partial's columns
    (each kernel's own broadcast); `outs` may be a generator, read once in order, so a kernel
    issues the lse loads first and each partial's load where it is used."""
    mx = functools.reduce(jnp.maximum, lses)
    ws = [jnp.exp2(x - mx) for x in lses]   # 1 for the split holding the max: the sum is >= 1
    acc = functools.reduce(jnp.add, (o * bcast(w) for o, w in zip(outs, ws)))
    return acc / bcast(functools.reduce(jnp.add, ws))


def _combine_kernel(qs_ref, o_ref_sp, lse_ref, o_ref, *, num_splits, G, H, block_q, M, D, T, S):
    """Merge the split-K partials of one (sequence, KV head, query block) by their log2-sum-exp
    and write the rows straight into the flat [T*H, D] output.

    The loops over splits are unrolled up to UNROLL_SPLITS, so every partial's load is issued
    before the first is used: a rolled loop waits one memory round trip per split and load
    (Nsight Compute, H200: 9.1 us for 16 splits at 1 x 32768 where the decode kernel took
    37.2 us, session 18)."""
    s_id = pl.program_id(0)
    h = pl.program_id(1)
    qb = pl.program_id(2)
    if num_splits <= UNROLL_SPLITS:
        out = merge_partials([lse_ref[k] for k in range(num_splits)],
                             (o_ref_sp[k] for k in range(num_splits)), lambda w: w[:, None])
    else:
        mx = lax.fori_loop(0, num_splits, lambda k, m: jnp.maximum(m, lse_ref[k]),
                           jnp.full((M,), NEG, jnp.float32))

        def body(k, carry):
            acc, w = carry
            wk = jnp.exp2(lse_ref[k] - mx)
            return acc + o_ref_sp[k] * wk[:, None], w + wk

        acc, w = lax.fori_loop(0, num_splits, body,
                               (jnp.zeros((M, D), jnp.float32), jnp.zeros((M,), jnp.float32)))
        out = acc / w[:, None]
    q0 = qs_ref[s_id]
    qlen = qs_ref[s_id + 1] - q0
    tok_off, head = _rows(M, G, h)
    tok_j = qb * block_q + tok_off
    row_ok = (tok_off < block_q) & (tok_j < qlen)
    _store_rows(o_ref, out, q0 + tok_j, head, row_ok, H)
    _zero_padding_tokens(o_ref, qs_ref, s=s_id, h=h, enabled=qb == 0, M=M, G=G, H=H, S=S, T=T,
                         D=D)


@functools.partial(jax.jit, static_argnames=(
    "max_query_len", "scale", "soft_cap", "sliding_window", "config", "interpret"))
def paged_attention_kernel(q, k_pages, v_pages, page_table, seq_lens, query_start, *,
                           max_query_len: int, scale: float, soft_cap: float | None = None,
                           sliding_window: int | None = None, config: KernelConfig | None = None,
                           interpret: bool = False, k_scale=None, v_scale=None):
    """Ragged paged attention with the reference's exact contract, via the Pallas kernel.

    k_scale / v_scale: float32 [P, KVH, page] per-token-per-head scales of 8-bit (float8_e4m3fn
    or int8) pages; None for float pages. `query_start[0]` must be 0 (tokens before it are
    not written); tokens from `query_start[S]` to T get zeros."""
    T, H, D = q.shape
    P, page_size, KVH, _ = k_pages.shape
    S, max_pages = page_table.shape
    G = H // KVH
    Q = int(max_query_len)
    quantized = k_scale is not None
    if quantized != (v_scale is not None):
        raise ValueError("give both k_scale and v_scale, or neither")
    if quantized and jnp.dtype(k_pages.dtype) not in QUANT_DTYPES:
        raise ValueError(f"k_scale given for {k_pages.dtype} pages; scaled pages are "
                         f"{[str(d) for d in QUANT_DTYPES]}")
    if config is None:
        config = choose_config(S, KVH, G, Q, max_pages, page_size)
    block_q, ppb, nsplit = config.block_q, config.pages_per_block, config.num_splits
    nqb = -(-Q // block_q)
    rows_real = block_q * G
    M = max(16, _next_pow2(rows_real))

    # Every split owns a whole number of page blocks (the kernel masks ids past max_pages).
    nblocks = -(-max_pages // ppb)
    pages_per_split = -(-nblocks // nsplit) * ppb

    qf = q.reshape(T * H, D)                                 # free: [T, H, D] is contiguous
    seq_lens = seq_lens.astype(jnp.int32)
    query_start = query_start.astype(jnp.int32)
    page_table = page_table.astype(jnp.int32)

    kernel = functools.partial(
        _attn_kernel, scale=float(scale), soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=None if sliding_window is None else int(sliding_window), G=G, H=H,
        block_q=block_q, rows_real=rows_real, page_size=page_size, ppb=ppb,
        pages_per_split=pages_per_split, num_splits=nsplit,
        prefetch_pages=config.prefetch_pages, max_pages=max_pages, M=M, D=D, T=T, S=S,
        quantized=quantized,
        precision=(lax.Precision.HIGHEST if q.dtype == jnp.float32 else None))
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))  # noqa: E731
    pool = pl.BlockSpec((P, page_size, None, D), lambda s, h, b, k: (0, 0, h, 0))
    in_specs = [whole((S,)), whole((S + 1,)),
                pl.BlockSpec((None, max_pages), lambda s, h, b, k: (s, 0)),
                whole((T * H, D)), pool, pool]
    args = [seq_lens, query_start, page_table, qf, k_pages, v_pages]
    if quantized:
        scales = pl.BlockSpec((P, None, page_size), lambda s, h, b, k: (0, h, 0))
        in_specs += [scales, scales]
        args += [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)]
    params = pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    name = f"imp_paged_attn_M{M}_bk{ppb * page_size}_sp{nsplit}" + ("_q8" if quantized else "")
    if nsplit == 1:
        out = pl.pallas_call(
            kernel, grid=(S, KVH, nqb, 1), in_specs=in_specs, out_specs=whole((T * H, D)),
            out_shape=jax.ShapeDtypeStruct((T * H, D), q.dtype), compiler_params=params,
            interpret=interpret, name=name)(*args)
        return out.reshape(T, H, D)

    o_sp, lse = pl.pallas_call(
        kernel, grid=(S, KVH, nqb, nsplit), in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, None, M, D), lambda s, h, b, k: (s, h, b, k, 0, 0)),
            pl.BlockSpec((None, None, None, None, M), lambda s, h, b, k: (s, h, b, k, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((S, KVH, nqb, nsplit, M, D), jnp.float32),
                   jax.ShapeDtypeStruct((S, KVH, nqb, nsplit, M), jnp.float32)],
        compiler_params=params, interpret=interpret, name=name)(*args)
    return combine_splits(query_start, o_sp, lse, G=G, H=H, T=T, block_q=block_q,
                          dtype=q.dtype, interpret=interpret, name="imp_paged_attn_combine")


def combine_splits(query_start, o_sp, lse, *, G: int, H: int, T: int, block_q: int, dtype,
                   interpret, name: str):
    """Merge split-K partials (o_sp f32 [S, KVH, query blocks, splits, M, D], lse log2-domain
    [S, KVH, query blocks, splits, M]; row r of a block -> head h*G + r, rows past G ignored)
    into [T, H, D] with the Pallas combine kernel, which also zeroes the padding tokens. Both
    split-K kernels (this one and decode_mgpu.py) end with it."""
    S, KVH, nqb, nsplit, M, D = o_sp.shape
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))  # noqa: E731
    combine = functools.partial(_combine_kernel, num_splits=nsplit, G=G, H=H, block_q=block_q,
                                M=M, D=D, T=T, S=S)
    out = pl.pallas_call(
        combine, grid=(S, KVH, nqb),
        in_specs=[whole((S + 1,)),
                  pl.BlockSpec((None, None, None, nsplit, M, D),
                               lambda s, h, b: (s, h, b, 0, 0, 0)),
                  pl.BlockSpec((None, None, None, nsplit, M), lambda s, h, b: (s, h, b, 0, 0))],
        out_specs=whole((T * H, D)),
        out_shape=jax.ShapeDtypeStruct((T * H, D), dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name=f"{name}_M{M}_sp{nsplit}")(query_start, o_sp, lse)
    return out.reshape(T, H, D)


def paged_decode_attention(q, k_pages, v_pages, page_table, seq_lens, query_start, *,
                           max_query_len: int = 1, scale: float, soft_cap=None,
                           sliding_window=None, config=None, interpret=False, k_scale=None,
                           v_scale=None):
    """Decode entry (max_query_len tokens per sequence, 1 for plain decode)."""
    return paged_attention_kernel(q, k_pages, v_pages, page_table, seq_lens, query_start,
                                  max_query_len=max_query_len, scale=scale, soft_cap=soft_cap,
                                  sliding_window=sliding_window, config=config,
                                  interpret=interpret, k_scale=k_scale, v_scale=v_scale)
