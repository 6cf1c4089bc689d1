"""Paged **decode** attention: a Pallas **Mosaic GPU** kernel for Hopper (TMA + wgmma + a TMA
producer warpgroup), built to stream the KV cache at HBM bandwidth.

Contract: `reference.ragged_paged_attention_ref` for decode steps (max_query_len == 1), no
soft-cap / sliding window, float pages of q's dtype (bf16 / f16), or float8_e4m3fn pages with
their per-token-per-head f32 scales (imp_jax/cache.py's layout, [P, KVH, page]):

    paged_decode_mgpu(q[T,H,D], k_pages[P,page,KVH,D], v_pages, page_table i32[S,max_pages],
                      seq_lens i32[S], query_start i32[S+1], *, scale, max_query_len=1,
                      k_scale=None, v_scale=None) -> [T,H,D]

Sequence s owns token query_start[s] when query_start[s+1] - query_start[s] == 1 (0: a padding
sequence, no token) and that token attends keys 0..seq_lens[s]-1. Tokens at or beyond
query_start[S] (padding) get zeros. Assumes query_start[0] == 0 (the runner's layout).
`supported(...)` says which shapes this covers; the rest stays on paged_decode.py's kernel.

Design. Decode reads each K/V byte once and does 4 FLOP per byte (G = 4 query heads per KV
head): it is memory bound by ~100x, so everything is arranged around keeping TMA busy.

* Grid (S, KVH, splits): one CTA per (sequence, KV head, KV split). Its query rows are the G
  query heads of that KV head for the sequence's token (q[tok, h*G:(h+1)*G], contiguous),
  padded to the 64 rows of one wgmma (rows >= G hold stale SMEM and are never stored; every
  op on them is row-local, so they cannot leak into real rows). The padding is free: compute
  is ~1% of the time.
* Two warpgroups. The producer walks the split's KV blocks of `block_kv` keys and gathers each
  as block_kv / page_size TMA boxes of [page_size, D] straight from the pool
  (`pool.at[page, :, kv_head]`, a strided 2-D box: no re-layout), K then V, into a
  `num_stages`-deep SMEM ring; one mbarrier per stage counts the boxes. The consumer waits a
  stage, S = Q K^T (wgmma, f32), masks the ragged tail (only the sequence's last block pays
  for it), online softmax in f32 (exp2, scale * log2(e) folded into one FMA), O += P V (wgmma,
  P from registers), and releases the stage. With a deep ring the producer runs
  `num_stages` blocks ahead, so HBM latency is hidden behind stages * 2 * block_kv * D * 2
  bytes in flight per CTA (64 KB+ with the defaults).
* Page ids are scalar GMEM loads, one block ahead (carried through the producer loop), with
  columns clamped to the sequence's last page (neither padding columns nor a short page table
  are read past; those keys are masked anyway). No op runs on the page table outside.
* Split-K: a sequence's blocks are cut into `splits` equal contiguous ranges (each sequence by
  its own length, so every split of a sequence has the same work). With splits == 1 the CTA
  writes its G bf16 rows straight into o[tok, h*G:(h+1)*G] (TMA from an unswizzled staging
  buffer: a G-row box), and the split-0 CTAs also zero the padding tokens. With splits > 1 each
  CTA writes f32 partial rows (normalised O and the log2-sum-exp) and paged_decode.py's Pallas
  combine kernel merges them (and zeroes the padding tokens). The f32 staging buffer aliases
  the K/V ring (a RefUnion): the ring is idle once the consumer has waited on every stage.
* Q arrives by TMA in an unswizzled staging buffer (a G-row box at any token / head offset;
  Mosaic only TMAs into a swizzled buffer at 8-row-aligned offsets) and is re-laid out once
  into the swizzled buffer wgmma reads (flash_prefill.py does the same).
* **8-bit (e4m3) pages.** The ring holds the 8-bit tiles (half the bytes of a bf16 stage) and
  each stage's per-key scales: one bulk copy of `page` f32 per page and KV head, contiguous in
  the [P, KVH, page] scale pools (a plain copy: a tensor TMA would need 128-byte aligned SMEM
  ends, which 16-key pages' 64-byte scale rows are not). The consumer converts a stage to q's
  dtype in registers (e4m3 -> f32, times the key's scale, -> bf16: this toolchain's ptxas
  converts e4m3 straight to f16 only) into one bf16 tile per K and V, releases the 8-bit
  stage at once, and runs the same wgmmas on the converted tiles. Dequantizing K and V before
  the products keeps every wgmma in bf16 (8-bit wgmma operands must be K-major, which V is not; see
  docs/kernels_notes.md) and the numerics those of the reference, which dequantizes first.
  (An f16 variant that converted K and V to f16 with the per-key scales moved onto the logits
  and the probabilities lost its H200 A/B against this path in session 8 and was deleted;
  with Q K^T in e4m3, below, the f16 P V alone wins: `f16_v`.)
* **`fp8_qk` (the default on 8-bit pages): Q K^T in e4m3.** The 8-bit K tile is K-major for
  Q K^T, so wgmma reads it straight from the ring: no K conversion, no converted K tile (two
  heads per CTA get a third ring stage in that SMEM). Q is split once per CTA into two e4m3
  terms, Q = s * (hi + lo / 16) per row (s = amax / 448; lo holds 16x hi's residual), and two
  e4m3 wgmmas against the same tile give the logits with ~bf16 precision on Q (hi alone:
  1.2% error against the reference in the interpret test, hi + lo: 0.28%, the converting
  path's 0.31%). K's per-key scales multiply the f32 logits; the row scales
  (s * scale * log2 e) ride in the softmax's exp2 FMA. V is still converted (8-bit P V would
  need V K-major, i.e. transposed pages). H200, session 13, two heads per CTA: 8 x 2048
  -29%, 256 x 2048 -10%, 1024 x 2048 -6 to -8%, 704 x 1536 and 64 x 4096 level
  (docs/kernels_notes.md).
* **`f16_v` (the default on 8-bit pages): P V in f16.** V's e4m3 tile is only cast to f16 (one
  hardware conversion per two codes, no f32 detour, no multiply) and V's per-key scales go
  onto P's columns. P carries a gain of 2**V_GAIN_LOG2 = 256 (folded into the exp2's max),
  which keeps P's smallest products out of f16's subnormals; the final 1 / l undoes it.
  H200, session 14, 64-key pages, two heads per CTA: 256 x 2048 487.1 -> 447.7 us,
  1024 x 2048 1611.2 -> 1486.1 us (-8%), error against the reference 0.31% -> 0.19% (f16
  keeps 3 more mantissa bits than bf16).
* Loop schedules measured and removed (session 16, docs/kernels_notes.md): casting V during
  the Q K^T wgmmas (`early_v`) and the key loop one block out of phase, FA3-style, so that a
  softmax runs while the previous block's P V does (`pipelined`). Both were correct on an
  H200. Timed in five interleaved rounds, the best of either was within -2% to +2% of the
  best plain config on bf16 pages. On e4m3 pages pipelined was 4-9% slower and early_v -1%
  to +12%. The bf16 decode step was level or slower. Their code is in git history at 5676676.
* The split-K combine folded into this kernel, measured and removed (session 17): splits
  0..n-2 published their partials and counted a GMEM semaphore, the last split waited, merged
  and wrote o. Correct on an H200 (13 GPU tests of that path), but slower: bf16 8 x 2048 x 64
  30.2 -> 32.2 us, 1 x 32768 53.5 -> 55.1, e4m3 8 x 2048 30.5 -> 34.2, 1 x 8192 32.9 -> 38.3.
  Kernel-only it was 24.1 us against 21.5 + the combine's 3.3, plus the 2.1 us kernel that
  zeroes the semaphores before each call. The last split's wait, publish and merge sit on the
  critical path, where the combine kernel spreads the merge over all CTAs. The code is in git
  history at f78bcd3.
* `cluster_combine` (session 18; built and lowered, not yet run on a GPU): the split-K merge
  without the combine kernel, and without GMEM partials or semaphores. A sequence's splits
  (2..8) launch as one thread-block cluster; each split leaves its normalised partial and
  log2-sum-exp in its own SMEM (the staging buffers that alias the idle ring); after a cluster
  barrier split 0 loads the others' through distributed SMEM (`plgpu.cluster_ref`), merges
  them as the combine does and writes o; a second barrier keeps the others' SMEM alive until
  then. One head per CTA only (a cluster ref into a per-head buffer does not lower), and GPU
  only (GPU interpret mode rejects cluster refs), so its tests are Hopper lowering on a CPU
  and GPU-marked numerics.
* `heads_per_cta=2`: a CTA serves two KV heads of one sequence with two consumer warpgroups
  and one producer (three warpgroups, registers split 232 / 232 / 40 as in flash_prefill.py).
  Each head has its own ring, barriers and buffers (a leading [2] axis); the sequence's
  scalars and page ids are read once. Meant for what one consumer per CTA leaves on the table:
  short contexts, where a CTA's fixed costs (scalar loads, Q load, ring fill, output store)
  are about half its time (1024 x 256: 53% of HBM bandwidth), and 8-bit pages, where one
  warpgroup's conversion sets the pace. With splits, the partials alias the rings, so both
  consumers meet at a barrier before writing them (the race detector caught the version
  without). On an H200 it cut 1024 x 256 by 21% and 256 x 512 by 12% (bf16) and e4m3 pages'
  steps by 13-16%, so `choose_config` takes it at short contexts once the CTAs fill the SMs
  and on 8-bit pages at every batch (`_heads_per_cta`, sessions 8 and 14).
* `compat=True`: the interpret-mode-safe PV step (P through SMEM into a fresh accumulator that
  is added), because GPU interpret mode runs neither `pl.run_state` nor a register-LHS wgmma.
  It also compiles for the GPU (slower). The default keeps P in registers.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.mosaic import gpu as mgpu

from pallas_kernels.flash_prefill import (LOG2E, SMEM_BYTES_H100, check_ring, interpret_params,
                                          softmax_state)
# NEG: log-sum-exp of a split that saw no key (the combine's convention)
from pallas_kernels.paged_decode import NEG, NUM_SMS_H100, combine_splits, merge_partials

MQ = 64                        # query rows of one wgmma (the G real rows are padded to it)
FP8 = jnp.float8_e4m3fn        # the 8-bit page dtype this kernel reads (with scales)
CONVERT_ROWS = 64              # 8-bit tile rows converted per register pass (register pressure)
V_GAIN_LOG2 = 8.0              # f16_v: P (and l) x 2**8, so P x V's scale stays out of f16's
                               # subnormals (undone by the final 1 / l)
MAX_CLUSTER = 8                # CTAs of a portable thread-block cluster (cluster_combine)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    block_kv: int = 64         # keys per pipeline stage
    num_stages: int = 4        # depth of the K/V SMEM ring
    num_splits: int = 1        # split-K partitions of each sequence's KV blocks
    compat: bool = False       # interpret-safe PV path (P via SMEM, separate accumulator)
    # KV heads per CTA, one consumer warpgroup each, fed by one producer: the CTA's fixed costs
    # (scalar loads, Q load, ring fill, output store) are shared and two consumers convert /
    # compute at once. For short contexts and 8-bit pages (H200 numbers: _heads_per_cta).
    heads_per_cta: int = 1
    # 8-bit pages: Q K^T as e4m3 wgmmas straight on the ring's K tile (no K conversion). Q is
    # split once per CTA into two e4m3 terms, Q ~ s * (hi + lo / 16) per row, so the logits
    # keep ~bf16 precision on Q; K's per-key scales multiply the logits' columns.
    fp8_qk: bool = False
    # 8-bit pages (the default there): V's tile cast e4m3 -> f16 (one hardware conversion per
    # two codes, no scale multiply) and P V in f16, V's per-key scales folded into P's columns
    # (x a gain of 2**V_GAIN_LOG2 = 256 that keeps P's small products out of f16's
    # subnormals; undone with 1 / l). Range: P x scale x 256 must stay below f16's 65504, i.e.
    # a token's V amax below 448 x 65504 / 256 (~1.1e5).
    f16_v: bool = False
    # Split-K without the combine kernel: a sequence's splits run as one thread-block cluster
    # (the "split" grid axis becomes a cluster axis), each leaves its normalised partial in its
    # own SMEM, and split 0 reads the others' through distributed SMEM (plgpu.cluster_ref)
    # behind a cluster barrier, merges and writes o. 2..MAX_CLUSTER splits; GPU only (Pallas's
    # GPU interpret mode has no cluster refs). Untimed (session 18): built to take the
    # combine's launch and its ~2.5-3.8 us off 8 x 2048's critical path.
    cluster_combine: bool = False

    def validate(self, D: int, page_size: int, kv_itemsize: int = 2):
        if self.num_splits < 1:
            raise ValueError("num_splits must be >= 1")
        if self.cluster_combine and not 2 <= self.num_splits <= MAX_CLUSTER:
            raise ValueError(f"cluster_combine=True needs 2..{MAX_CLUSTER} splits (one cluster "
                             f"of CTAs per sequence), got num_splits={self.num_splits}")
        if self.cluster_combine and self.heads_per_cta != 1:
            raise ValueError(f"cluster_combine=True needs heads_per_cta=1, got "
                             f"{self.heads_per_cta} (a cluster ref into a per-head buffer does "
                             "not lower with jax 0.11.2's Mosaic GPU)")
        if self.cluster_combine and self.compat:
            raise ValueError("cluster_combine=True runs on the GPU only: Pallas's GPU interpret "
                             "mode (which needs compat=True) has no cluster refs")
        if self.heads_per_cta not in (1, 2):
            raise ValueError(f"heads_per_cta must be 1 or 2, got {self.heads_per_cta}")
        if self.fp8_qk and kv_itemsize != 1:
            raise ValueError("fp8_qk=True needs 8-bit (float8_e4m3fn) pages")
        if self.f16_v and kv_itemsize != 1:
            raise ValueError("f16_v=True needs 8-bit (float8_e4m3fn) pages")
        check_ring(self, page_size, smem_bytes(self, D, kv_itemsize=kv_itemsize), min_stages=1)


def smem_bytes(cfg: DecodeConfig, D: int, kv_itemsize: int = 2) -> int:
    """SMEM of a CTA (q and the output in a 16-bit dtype); kv_itemsize 1: 8-bit pages (ring of
    8-bit tiles + per-key f32 scales, and one converted V tile of q's dtype, plus one of K
    unless fp8_qk, whose Q terms take the swizzled Q buffer's bytes)."""
    itemsize = 2
    q = 2 * MQ * D * itemsize    # swizzled Q (fp8_qk: its two e4m3 terms) + Q/O staging
    ring = 2 * cfg.num_stages * cfg.block_kv * D * kv_itemsize
    if kv_itemsize != itemsize:  # scales and the converted V (and K, unless fp8_qk) tiles
        ring += 2 * cfg.num_stages * cfg.block_kv * 4
        ring += (1 if cfg.fp8_qk else 2) * cfg.block_kv * D * itemsize
    if cfg.compat:
        ring += MQ * cfg.block_kv * itemsize        # P staged through SMEM
    part = (MQ * D * 4 + MQ * 4) if cfg.num_splits > 1 else 0   # f32 partial O + lse
    return cfg.heads_per_cta * (q + max(ring, part)) + 1024     # + barriers / alignment


def supported(q_shape, k_pages_shape, dtype=None, max_query_len: int = 1, *, k_dtype=None,
              soft_cap=None, sliding_window=None, k_scale=None) -> bool:
    """Whether this kernel covers a decode step with these shapes (else use another path)."""
    if int(max_query_len) != 1 or soft_cap is not None or sliding_window is not None:
        return False
    if len(q_shape) != 3 or len(k_pages_shape) != 4:
        return False
    _, H, D = q_shape
    _, page, KVH, Dk = k_pages_shape
    ok_dtypes = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if dtype is not None and jnp.dtype(dtype) not in ok_dtypes:
        return False
    if k_scale is not None:  # 8-bit pages: e4m3 only (int8 stays on the Triton kernel)
        if k_dtype is None or jnp.dtype(k_dtype) != jnp.dtype(FP8):
            return False
    elif k_dtype is not None and (dtype is None or jnp.dtype(k_dtype) != jnp.dtype(dtype)):
        return False
    if D != Dk or D not in (64, 128) or KVH <= 0 or H % KVH or H // KVH > MQ:
        return False
    # A page is copied as [page, D] boxes into 8-row SMEM tiles; blocks of 64 / 128 keys.
    if page % 8 or not (64 % page == 0 or page % 64 == 0):
        return False
    # Pages over 128 keys are read as whole blocks: two stages of them must fit SMEM (256-key
    # pages at D=128 do not; the Triton kernel serves those).
    if page > 128:
        ring = DecodeConfig(block_kv=page, num_stages=2, num_splits=1)
        if smem_bytes(ring, D, kv_itemsize=1 if k_scale is not None else 2) > SMEM_BYTES_H100:
            return False
    return True


SHORT_CTX = 512  # page-table spans up to this many keys count as short (choose_config)


def choose_config(S: int, KVH: int, max_pages: int, page_size: int, D: int = 128, *,
                  block_kv: int | None = None, num_stages: int | None = None,
                  num_splits: int | None = None, compat: bool = False,
                  num_sms: int = NUM_SMS_H100, kv_itemsize: int = 2,
                  heads_per_cta: int | None = None,
                  fp8_qk: bool | None = None, f16_v: bool | None = None,
                  cluster_combine: bool = False) -> DecodeConfig:
    """Heuristic launch config; every knob can be overridden (the benchmark sweeps them).

    Splits: (S * KVH * splits) CTAs of ~1 per SM (up to ~227 KB of SMEM each). When S * KVH
    already fills the SMs, one split (no partials, no combine). Otherwise as many splits as fit
    in one wave (a second, partial wave would double the time of a short step), but no split
    shorter than 2 blocks at the longest context (each CTA pays a Q load + ring fill)."""
    # 128-key blocks in a 3-stage ring beat 64-key blocks in 4 stages on 7 of the 9 rows of
    # the first GPU run where both ran (H200, 2026-11-28, docs/kernels_notes.md), by up to
    # 1.46x; they lost (by <= 7%) at 1 and 8 x 4k. At short contexts (<= SHORT_CTX keys, a
    # CTA has 2-4 blocks of 128) 64-key blocks in 6 stages won: 1024 x 256 -16%, 256 x 512
    # -4%; at 64 x 1k they lost by 13% (H200, session 4, same table).
    short = max_pages * page_size <= SHORT_CTX and page_size <= 64
    if fp8_qk is None:
        fp8_qk = kv_itemsize == 1 and _env_default("IMP_JAX_MGPU_FP8_QK")
    if f16_v is None:
        f16_v = kv_itemsize == 1 and _env_default("IMP_JAX_MGPU_F16_V")
    if heads_per_cta is None and cluster_combine:
        heads_per_cta = 1   # the cluster merge reads one head's partial per CTA (validate)
    if heads_per_cta is None:
        heads_per_cta = _heads_per_cta(S, KVH, short, kv_itemsize == 1, num_sms)
        forced = os.environ.get("IMP_JAX_MGPU_HEADS") is not None
        if heads_per_cta == 2 and block_kv is not None and not forced:
            # a block size given (autotune, the benchmark) that two heads' rings cannot hold
            two = DecodeConfig(block_kv=block_kv, num_stages=2, num_splits=2, heads_per_cta=2,
                               compat=compat, fp8_qk=fp8_qk, f16_v=f16_v)
            heads_per_cta = 1 if smem_bytes(two, D, kv_itemsize) > SMEM_BYTES_H100 else 2
    if block_kv is None:  # two heads' rings of 128-key blocks do not fit SMEM even at 2 stages
        block_kv = (64 if short or heads_per_cta == 2 else 128 if page_size <= 128
                    else page_size)
    if num_stages is None:
        num_stages = 6 if short and block_kv == 64 else 3
    max_blocks = -(-(max_pages * page_size) // block_kv)
    if num_splits is None:
        base = max(1, S * KVH // heads_per_cta)
        num_splits = 1 if base >= num_sms else num_sms // base
        num_splits = min(num_splits, max(1, max_blocks // 2))
    num_splits = max(1, min(int(num_splits), max_blocks))
    if cluster_combine:   # one cluster per sequence: at most MAX_CLUSTER splits
        num_splits = min(num_splits, MAX_CLUSTER)
    return fit_smem(DecodeConfig(block_kv=block_kv, num_stages=num_stages,
                                 num_splits=num_splits, compat=compat,
                                 heads_per_cta=heads_per_cta,
                                 fp8_qk=fp8_qk and kv_itemsize == 1,
                                 f16_v=f16_v and kv_itemsize == 1,
                                 cluster_combine=cluster_combine and num_splits > 1),
                    D, kv_itemsize)


def _heads_per_cta(S: int, KVH: int, short: bool, eight_bit: bool, num_sms: int) -> int:
    """Two KV heads per CTA on 8-bit pages, and at short contexts once the CTAs (S * KVH / 2)
    fill the SMs. At short contexts a CTA's fixed costs are half its time and the second
    consumer shares them; on 8-bit pages it doubles the conversion throughput. H200, session 8
    (docs/kernels_notes.md): bf16 1024 x 256 404 -> 321 us, 256 x 512 198 -> 173 us, but
    64 x 1k +14% and 8 x 2k +8%; e4m3 256 x 2k 655 -> 551 us, 64 x 4k 381.5 -> 336 us. On
    e4m3 pages two heads win at small batches too (session 14, fp8_qk): 8 x 2k 34.7 us
    against 42.3-54.4 with one head, 32 x 2k 108.0 against 113.2-125.5 (splits make up the
    CTAs). $IMP_JAX_MGPU_HEADS=1 or 2 forces a choice (where 2 divides KVH)."""
    value = os.environ.get("IMP_JAX_MGPU_HEADS")
    if value not in (None, "1", "2"):
        raise ValueError(f"IMP_JAX_MGPU_HEADS={value!r}; allowed: 1, 2 (unset: the heuristic)")
    if KVH % 2:
        return 1
    if value is not None:
        return int(value)
    return 2 if eight_bit or (short and S * KVH // 2 >= num_sms) else 1


def _env_default(name: str) -> bool:
    """Whether a path is taken where the heuristic decides (an autotuned winner in the cache
    keeps its own choice): $name "1" yes, "0" no, unset yes.
      IMP_JAX_MGPU_FP8_QK (`DecodeConfig.fp8_qk`): H200, session 13, the engine's two-head
        configs: 256 x 2048 543.6 -> 490.0 us, 1024 x 2048 1839 -> 1698 us, 704 x 1536 and
        64 x 4096 level.
      IMP_JAX_MGPU_F16_V (`DecodeConfig.f16_v`): H200, session 14, 64-key pages, two heads,
        fp8_qk: 256 x 2048 487.1 -> 447.7 us, 1024 x 2048 1611.2 -> 1486.1 us; error against
        the reference 0.31% -> 0.19%. Untimed elsewhere (small batches, one head)."""
    value = os.environ.get(name)
    if value not in (None, "0", "1"):
        raise ValueError(f"{name}={value!r}; allowed: 0, 1 (unset: 1)")
    return value != "0"


def fit_smem(cfg: DecodeConfig, D: int, kv_itemsize: int = 2) -> DecodeConfig:
    """Drop ring stages (down to 2) until the config fits SMEM (deep rings of 128-key blocks
    at D=128, the compat path's extra P buffer, 8-bit pages' converted tiles)."""
    while smem_bytes(cfg, D, kv_itemsize=kv_itemsize) > SMEM_BYTES_H100 and cfg.num_stages > 2:
        cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    return cfg


def partial_rows(G: int) -> int:
    """Rows of a split's f32 partial: G rounded up to a power of two (the Triton combine's
    block), at least 4 (a TMA box of the log-sum-exp needs >= 16 bytes)."""
    return max(4, 1 << max(0, (G - 1).bit_length()))


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------

@plgpu.inline_mgpu()
def _fence_cluster(ctx):
    """Orders the calling thread's memory accesses at cluster scope (cluster_combine): its SMEM
    writes before the arrive that tells the other CTAs to read them, and the reads of the
    other CTAs' SMEM after the wait (the cluster barrier's arrive is not a cluster-scope
    release by itself)."""
    del ctx
    mgpu.utils.inline_ptx("fence.acq_rel.cluster;", has_side_effects=True)


def _build_kernel(*, T, S, H, D, KVH, page_size, cfg: DecodeConfig, scale: float, dtype,
                  interpret, kv_dtype):
    G = H // KVH
    kv_dtype = jnp.dtype(kv_dtype)
    quant = kv_dtype == jnp.dtype(FP8)        # 8-bit pages + per-key scales
    B, stages, splits = cfg.block_kv, cfg.num_stages, cfg.num_splits
    cl = cfg.cluster_combine                  # splits merged in-cluster: o written directly
    nh = cfg.heads_per_cta                    # consumer warpgroups, one KV head each
    if KVH % nh:
        raise ValueError(f"heads_per_cta={nh} does not divide the {KVH} KV heads")
    if B >= page_size:
        n_cp, rows_cp = B // page_size, page_size
    else:                       # page > block: a block is a slice of one page
        n_cp, rows_cp = 1, B
    c_log2 = float(scale) * LOG2E
    MP = partial_rows(G)

    def of_head(ref, i):
        """Head i's part of a per-head buffer or barrier array (none has a head axis when
        nh == 1, which keeps that kernel as it was); None for a buffer this config lacks."""
        return ref if nh == 1 or ref is None else ref.at[i]

    def convert(src8, scales, dst):
        """An 8-bit [B, D] stage -> `dst`'s dtype, each key (row) times its scale (scales None:
        a plain e4m3 -> f16 cast); in passes of CONVERT_ROWS rows (a 128 x 128 tile in f32
        would need 128 registers per thread at once)."""
        n = min(CONVERT_ROWS, B)
        for r in range(0, B, n):
            if scales is None:  # (8-byte loads in WGMMA_UPCAST_4X lost: +5-12%, session 15)
                dst.at[pl.ds(r, n)][...] = src8.at[pl.ds(r, n)][...].astype(dst.dtype)
                continue
            x = src8.at[pl.ds(r, n)][...].astype(jnp.float32)
            sc = scales.at[pl.ds(r, n)][...]
            dst.at[pl.ds(r, n)][...] = (x * lax.broadcast_in_dim(sc, x.shape, [0])).astype(
                dst.dtype)
        plgpu.commit_smem()

    def split_q(qst, q8):
        """Q (q's dtype, the staging buffer) -> its two e4m3 terms in q8 [2, MQ, D]: per row,
        Q = s * (hi + lo / 16) with s = amax / 448 (hi: Q / s rounded to e4m3; lo: 16x its
        residual, within e4m3's range since a residual is at most half of hi's step). Returns
        each row's s * scale * log2(e)."""
        q = plgpu.load(qst, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
        amax = jnp.maximum(jnp.max(jnp.abs(q), axis=1), 1e-30)
        x = q * lax.broadcast_in_dim(448.0 / amax, q.shape, [0])   # one divide per row
        s_row = amax * (1.0 / 448.0)
        hi = x.astype(FP8)
        q8.at[0][...] = hi
        q8.at[1][...] = ((x - hi.astype(jnp.float32)) * 16.0).astype(FP8)
        plgpu.commit_smem()
        return s_row * c_log2

    def kernel(sl_ref, qs_ref, pt_ref, q_ref, k_ref, v_ref, ks_ref, vs_ref, out_refs, scoped):
        s = lax.axis_index("seq")
        hc = lax.axis_index("kvh")                       # the CTA's group of nh KV heads
        j = lax.axis_index("split")
        wg = lax.axis_index("wg")
        # Every buffer has a leading [nh] axis (one per head of the CTA) and every barrier
        # array nh x stages (head i's stage slot at i * stages + slot).
        q_all, qst_all, ring, (k_bars, v_bars, q_bars, done, xbars), (k_cons, v_cons) = scoped
        k_all, v_all, p_all, ks_all, vs_all, k16_all, v16_all = ring[:7]
        if splits > 1:
            ost_all, lse_all = ring[7:]

        def kv_head(i):
            """The KV head of the CTA's i-th consumer."""
            return hc if nh == 1 else hc * nh + i

        seq_len = sl_ref[s]
        tok = qs_ref[s]
        active = (qs_ref[s + 1] - tok) > 0             # padding sequences own no token
        nblk = lax.div(seq_len + (B - 1), jnp.int32(B))
        per = lax.div(nblk + (splits - 1), jnp.int32(splits))
        b0 = j * per                                     # first block of this split
        nsteps = jnp.where(active, jnp.clip(nblk - b0, 0, per), 0)
        # Only the sequence's last block can hold keys >= seq_len.
        tail = (b0 + nsteps == nblk) & (lax.rem(seq_len, jnp.int32(B)) != 0) & (nsteps > 0)
        n_full = nsteps - tail.astype(jnp.int32)

        def merge_in_cluster(o_ref, i, qst, h):
            """cluster_combine: every split of this (sequence, head group) has left its
            normalised partial (ost) and log2-sum-exp (lse_smem) in its own SMEM. After a
            cluster barrier, split 0 reads them all through distributed SMEM, merges them as
            the combine kernel does and writes the G rows of o; a second barrier keeps the
            other CTAs (and their SMEM) alive until it has read them. Head i's buffers are
            indexed statically (heads_per_cta is 1 here: validate). It reads all 64 rows of
            each partial (32 KB at D = 128) where G are real: a [MP, D] strided read of them
            sent Mosaic's layout inference into an unbounded search (session 18), so check
            this traffic first if the GPU timing disappoints."""
            row = plgpu.Layout.WGMMA.reduce(1)
            ost, lse_smem = of_head(ost_all, i), of_head(lse_all, i)
            _fence_cluster()
            plgpu.barrier_arrive(xbars.at[0])
            plgpu.barrier_wait(xbars.at[0])
            _fence_cluster()

            @pl.when(j == 0)
            def _leader():
                def peer(ref, k):
                    return ref if k == 0 else plgpu.cluster_ref(ref, {"split": k})
                out = merge_partials(
                    [plgpu.load(peer(lse_smem, k), layout=row) for k in range(splits)],
                    (plgpu.load(peer(ost, k), layout=plgpu.Layout.WGMMA)
                     for k in range(splits)),
                    lambda w: lax.broadcast_in_dim(w, (MQ, D), [0]))
                qst[...] = out.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(qst.at[pl.ds(0, G)], o_ref.at[tok, pl.ds(h * G, G)])

            _fence_cluster()   # the leader's reads, before the others may leave
            plgpu.barrier_arrive(xbars.at[1])
            plgpu.barrier_wait(xbars.at[1])

        def _compute_wg(i):
            """Consumer warpgroup i: KV head hc * nh + i (static views of its buffers)."""
            h = kv_head(i)
            # indexed by wg (== i here): refs closed over by pl.run_state need a traced index
            mine = functools.partial(of_head, i=wg)
            q_smem, qst, q_bar = mine(q_all), mine(qst_all), of_head(q_bars, i)
            k_smem, v_smem = mine(k_all), mine(v_all)
            p_smem = mine(p_all) if p_all is not None else None
            if quant:
                ks_smem, vs_smem, k16, v16 = map(mine, (ks_all, vs_all, k16_all, v16_all))
            if splits > 1:
                ost, lse_smem = mine(ost_all), mine(lse_all)
            bo = i * stages                              # head i's barrier offset
            if nh > 1:  # three warpgroups share the register file: consumers take most
                plgpu.set_max_registers(232 if not cfg.compat else 224, action="increase")

            @pl.when(active)
            def _attend():
                plgpu.copy_gmem_to_smem(q_ref.at[tok, pl.ds(h * G, G)], qst.at[pl.ds(0, G)],
                                        q_bar)
                plgpu.barrier_wait(q_bar)
                if cfg.fp8_qk:  # q_smem holds Q's two e4m3 terms [2, MQ, D]
                    row_log2 = split_q(qst, q_smem)
                else:
                    q_smem[...] = qst[...]
                    plgpu.commit_smem()

                m_i, l_i, acc = softmax_state(MQ, D)
                n_qk = 2 if cfg.fp8_qk else 1          # Q K^T accumulators: Q's terms
                c_pass = row_log2 if cfg.fp8_qk else c_log2

                def qk(k_tile):
                    """A block's Q K^T accumulator values. fp8_qk: Q's two e4m3 terms against
                    the 8-bit K tile, each into its own accumulator: with one shared
                    accumulator (lo unscaled) the error against the reference rose from 0.19%
                    to 0.27% on an H200 (session 15), where interpret mode showed no change;
                    likely Hopper's FP8 MMA accumulating with reduced precision, so lo's small
                    products lose bits beside hi's."""
                    kt = k_tile.transpose((1, 0))

                    def compute(*s_refs):
                        if cfg.fp8_qk:
                            plgpu.wgmma(s_refs[0], q_smem.at[0], kt)
                            plgpu.wgmma(s_refs[1], q_smem.at[1], kt)
                        else:
                            plgpu.wgmma(s_refs[0], q_smem, kt)
                        return [r[...] for r in s_refs]
                    return pl.run_scoped(compute, *[plgpu.ACC((MQ, B), jnp.float32)
                                                    for _ in range(n_qk)])

                def logits(s_vals, slot):   # before the block's K stage goes back
                    """Q K^T / s per row (s: split_q's row scale, applied in the softmax's
                    exp2 FMA), times each key's K scale (fp8_qk)."""
                    if not cfg.fp8_qk:
                        return s_vals[0]
                    hi, lo = s_vals
                    ks = plgpu.load(ks_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                    return (hi + lo * (1.0 / 16.0)) * lax.broadcast_in_dim(ks, hi.shape, [1])

                def softmax(sc, c, m_i, l_i):
                    """(P, alpha, m, l) after one block of logits sc. m lives in the log2 domain
                    (scaled by c = scale*log2e, per row with fp8_qk; c > 0, so max(s) * c =
                    max(s * c)): exp2(s*c - m) is one FMA. f16_v: P x 2**V_GAIN_LOG2 (m
                    lowered by it), and l with it."""
                    m_new = jnp.maximum(m_i, sc.max(axis=1) * c)
                    alpha = jnp.exp2(m_i - m_new)
                    m_b = lax.broadcast_in_dim(m_new - V_GAIN_LOG2 if cfg.f16_v else m_new,
                                               sc.shape, [0])
                    c_b = lax.broadcast_in_dim(c, sc.shape, [0]) if cfg.fp8_qk else c
                    p = jnp.exp2(sc * c_b - m_b)
                    return p, alpha, m_new, l_i * alpha + p.sum(axis=1)

                def kv_step(t, carry, masked: bool):
                    acc, m_i, l_i = carry
                    slot = lax.rem(t, jnp.int32(stages))
                    plgpu.barrier_wait(k_bars.at[bo + slot])
                    k_tile = k_smem.at[slot]
                    convert_k = quant and not cfg.fp8_qk
                    if convert_k:  # converted, the 8-bit stage goes straight back
                        convert(k_tile, ks_smem.at[slot], k16)
                        plgpu.barrier_arrive(k_cons.at[bo + slot])
                        k_tile = k16
                    sc = logits(qk(k_tile), slot)
                    if not convert_k:
                        plgpu.barrier_arrive(k_cons.at[bo + slot])
                    if masked:   # keys of block t at or past seq_len -> -inf
                        cols = plgpu.broadcasted_iota(jnp.int32, (MQ, B), 1,
                                                      layout=plgpu.Layout.WGMMA)
                        sc = jnp.where(cols + (b0 + t) * B < seq_len, sc, -jnp.inf)
                    p, alpha, m_new, l_i = softmax(sc, c_pass, m_i, l_i)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    plgpu.barrier_wait(v_bars.at[bo + slot])
                    if cfg.f16_v:   # V's scales on P's columns, V cast only
                        vs = plgpu.load(vs_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                        p16 = (p * lax.broadcast_in_dim(vs, p.shape, [1])).astype(jnp.float16)
                    else:
                        p16 = p.astype(dtype)
                    v_tile = v_smem.at[slot]
                    if quant:   # 8-bit V's stage -> v16 (q's dtype or f16); stage released
                        convert(v_tile, None if cfg.f16_v else vs_smem.at[slot], v16)
                        plgpu.barrier_arrive(v_cons.at[bo + slot])
                        v_tile = v16
                    if not cfg.compat:   # P from registers
                        def compute_pv(acc_ref):
                            plgpu.wgmma(acc_ref, p16, v_tile)
                        acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
                    else:
                        p_smem[...] = p16
                        plgpu.commit_smem()

                        def compute_pv(acc_ref):
                            plgpu.wgmma(acc_ref, p_smem, v_tile)
                            return acc_ref[...]
                        acc = acc + pl.run_scoped(compute_pv, plgpu.ACC((MQ, D), jnp.float32))
                    if not quant:   # float pages: P V read the ring's stage itself
                        plgpu.barrier_arrive(v_cons.at[bo + slot])
                    return acc, m_new, l_i

                carry = (acc, m_i, l_i)
                carry = lax.fori_loop(0, n_full, functools.partial(kv_step, masked=False), carry)
                carry = lax.fori_loop(n_full, nsteps, functools.partial(kv_step, masked=True),
                                      carry)
                acc, m_i, l_i = carry

                # A split that saw no key (past its sequence's end) has l == 0: O = 0, lse = NEG.
                has = l_i > 0.0
                l_safe = jnp.where(has, l_i, 1.0)
                out = acc / lax.broadcast_in_dim(l_safe, (MQ, D), [0])
                if splits == 1:
                    (o_ref,) = out_refs
                    qst[...] = out.astype(dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(qst.at[pl.ds(0, G)], o_ref.at[tok, pl.ds(h * G, G)])
                else:
                    # The ring is idle here (every stage was waited on), so its SMEM (aliased by
                    # ost / lse_smem) can be written; with several heads, once every head's
                    # consumer is past its loop (the partials alias the other heads' rings).
                    if nh > 1:
                        plgpu.barrier_arrive(done)
                        plgpu.barrier_wait(done)
                    ost[...] = out
                    lse_smem[...] = jnp.where(
                        has, m_i + jnp.log2(l_safe) - (V_GAIN_LOG2 if cfg.f16_v else 0.0), NEG)
                    plgpu.commit_smem()
                    if cl:
                        merge_in_cluster(out_refs[0], i, qst, h)
                    else:
                        o_sp, lse_ref = out_refs
                        plgpu.copy_smem_to_gmem(ost.at[pl.ds(0, MP)], o_sp.at[s, h, 0, j])
                        plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, MP)],
                                                lse_ref.at[s, h, 0, j])
                plgpu.wait_smem_to_gmem(0)

            if splits == 1 or cl:
                # Padding tokens query_start[S]..T-1: CTA (s, h) zeroes tokens
                # query_start[S] + s, + 2S, ... of head group h (no extra launch, no XLA op);
                # with cluster_combine, split 0 does.
                (o_ref,) = out_refs
                pad0 = qs_ref[S]
                n_pad = lax.div(jnp.maximum(T - pad0 - s, 0) + (S - 1), jnp.int32(S))
                if cl:
                    n_pad = jnp.where(j == 0, n_pad, 0)

                @pl.when(n_pad > 0)
                def _zero_padding():
                    qst[...] = jnp.zeros((MQ, D), dtype)
                    plgpu.commit_smem()

                    @pl.loop(0, n_pad)
                    def _(i):
                        plgpu.copy_smem_to_gmem(qst.at[pl.ds(0, G)],
                                                o_ref.at[pad0 + s + i * S, pl.ds(h * G, G)])
                    plgpu.wait_smem_to_gmem(0)

        for i in range(nh):
            pl.when(wg == i)(functools.partial(_compute_wg, i))

        @pl.when(wg == nh)
        def _memory_wg():
            if nh > 1:
                plgpu.set_max_registers(40, action="decrease")
            last_col, last_page = pt_ref.shape[1] - 1, k_ref.shape[0] - 1

            def page_ids(t):
                """The page id of each of the n_cp TMA boxes of the split's block t (scalar
                GMEM loads). Columns are clamped to the table and ids to the pool, statically:
                t may run past the sequence, whose keys there are masked, and the first block's
                ids need not wait for seq_len (one GMEM latency less before the first copy)."""
                ids = []
                for c in range(n_cp):
                    key0 = (b0 + t) * B + c * rows_cp
                    col = jnp.minimum(lax.div(key0, jnp.int32(page_size)), last_col)
                    ids.append(jnp.clip(pt_ref[s, col], 0, last_page))
                return tuple(ids)

            first = page_ids(0)   # loaded beside seq_len, ahead of the branch on it

            def issue(t, slot, pool, smem_all, bar, pages, scales, scale_all, i):
                """Block t of head i (hc * nh + i) into its ring's stage `slot`."""
                h = kv_head(i)
                smem, bar_i = of_head(smem_all, i), i * stages + slot
                scale_smem = of_head(scale_all, i) if quant else None
                for c, page in enumerate(pages):
                    if n_cp > 1 or B == page_size:
                        src = pool.at[page, :, h]
                        keys = pl.ds(0, rows_cp)
                    else:       # page_size > block_kv: the block is a slice of one page
                        off = lax.rem((b0 + t) * B, jnp.int32(page_size))
                        keys = pl.ds(pl.multiple_of(off, B), rows_cp)
                        src = pool.at[page, keys, h]
                    dst = smem.at[slot, pl.ds(c * rows_cp, rows_cp)] if n_cp > 1 else smem.at[slot]
                    plgpu.copy_gmem_to_smem(src, dst, bar.at[bar_i])
                    if quant:   # the same keys' scales: contiguous in the [P, KVH, page] pool
                        # In bounds by construction: a plain bulk copy (16-byte aligned ends),
                        # not a tensor TMA, whose SMEM end must be 128-byte aligned: 16-key
                        # pages land at 64-byte offsets (a misaligned address on an H200).
                        plgpu.copy_gmem_to_smem(scales.at[page, h, keys],
                                                scale_smem.at[slot, pl.ds(c * rows_cp, rows_cp)],
                                                bar.at[bar_i],
                                                oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)

            def kv_loop(t, pages):
                slot = lax.rem(t, jnp.int32(stages))
                # The next block's page ids are loaded now and carried: their GMEM latency
                # overlaps this block's waits and copies instead of stalling the next issue.
                nxt = page_ids(t + 1)

                for kv_ref, kv_all, bars, cons, sc_ref, sc_all in (
                        (k_ref, k_all, k_bars, k_cons, ks_ref, ks_all),
                        (v_ref, v_all, v_bars, v_cons, vs_ref, vs_all)):
                    for i in range(nh):   # the stage is free once head i's consumer released it
                        @pl.when(t >= stages)
                        def _():
                            plgpu.barrier_wait(cons.at[i * stages + slot])
                        issue(t, slot, kv_ref, kv_all, bars, pages, sc_ref, sc_all, i)
                return nxt

            @pl.when(nsteps > 0)
            def _stream():
                lax.fori_loop(0, nsteps, kv_loop, first)

            # Observe the release of the last stages too (every barrier phase is waited on once,
            # which hardware parity tracking and interpret mode both need).
            @pl.loop(jnp.maximum(nsteps - stages, 0), nsteps)
            def _drain(t):
                slot = lax.rem(t, jnp.int32(stages))
                for i in range(nh):
                    plgpu.barrier_wait(k_cons.at[i * stages + slot])
                    plgpu.barrier_wait(v_cons.at[i * stages + slot])

    def entry(sl_ref, qs_ref, pt_ref, q_ref, k_ref, v_ref, *refs):
        ks_ref, vs_ref, *out_refs = refs if quant else (None, None, *refs)
        tiling = plgpu.TilingTransform((8, 64))
        swizzle = plgpu.SwizzleTransform(128)
        per = (lambda shape: shape) if nh == 1 else (lambda shape: (nh, *shape))  # per head
        # the ring's tiles: rows of D elements of the page dtype, swizzled by their byte width
        sw = min(128, D * kv_dtype.itemsize)
        kv_tiles = (plgpu.TilingTransform((8, sw // kv_dtype.itemsize)),
                    plgpu.SwizzleTransform(sw))
        q_smem = (plgpu.SMEM(per((2, MQ, D)), FP8, transforms=kv_tiles) if cfg.fp8_qk else
                  plgpu.SMEM(per((MQ, D)), dtype, transforms=(tiling, swizzle)))
        qst = plgpu.SMEM(per((MQ, D)), dtype)         # unswizzled Q-in / O-out staging
        kb = plgpu.SMEM(per((stages, B, D)), kv_dtype, transforms=kv_tiles)
        vb = plgpu.SMEM(per((stages, B, D)), kv_dtype, transforms=kv_tiles)
        pv_dtype = jnp.float16 if cfg.f16_v else dtype    # P and the converted V tile
        pb = (plgpu.SMEM(per((MQ, B)), pv_dtype, transforms=(tiling, swizzle)) if cfg.compat
              else None)
        if quant:   # each stage's per-key scales, one converted K (unless fp8_qk) and V tile
            conv = (plgpu.SMEM(per((stages, B)), jnp.float32),
                    plgpu.SMEM(per((stages, B)), jnp.float32),
                    None if cfg.fp8_qk else
                    plgpu.SMEM(per((B, D)), dtype, transforms=(tiling, swizzle)),
                    plgpu.SMEM(per((B, D)), pv_dtype, transforms=(tiling, swizzle)))
        else:
            conv = (None, None, None, None)
        if splits > 1:
            part = (plgpu.SMEM(per((MQ, D)), jnp.float32), plgpu.SMEM(per((MQ,)), jnp.float32))
            ring = plgpu.RefUnion((kb, vb, pb, *conv), part)
        else:
            ring = (kb, vb, pb, *conv)

        def body(q_s, q_st, ring_refs, bars, cons):
            if splits > 1:
                # A RefUnion iterates as its groups: ((k, v, p, scales..), (ost, lse)).
                main, part_refs = ring_refs
                ring_refs = (*main, *part_refs)
            kernel(sl_ref, qs_ref, pt_ref, q_ref, k_ref, v_ref, ks_ref, vs_ref, out_refs,
                   (q_s, q_st, ring_refs, bars, cons))

        copies = n_cp * (2 if quant else 1)          # TMA copies per stage: tiles (+ scales)
        pl.run_scoped(
            body, q_smem, qst, ring,
            (plgpu.Barrier(num_arrivals=copies, num_barriers=nh * stages),
             plgpu.Barrier(num_arrivals=copies, num_barriers=nh * stages),
             plgpu.Barrier() if nh == 1 else plgpu.Barrier(num_barriers=nh),
             plgpu.Barrier(num_arrivals=nh) if nh > 1 and splits > 1 else None,
             # cluster_combine: [partials written, partials read], every consumer of every
             # split arriving (each arrival signals all CTAs of the cluster)
             plgpu.ClusterBarrier(collective_axes=("split",), num_arrivals=nh, num_barriers=2)
             if cl else None),
            (plgpu.Barrier(num_barriers=nh * stages), plgpu.Barrier(num_barriers=nh * stages)),
            collective_axes="wg",
        )

    if splits == 1 or cl:
        out_type = jax.ShapeDtypeStruct((T, H, D), dtype)
    else:
        out_type = (jax.ShapeDtypeStruct((S, KVH, 1, splits, MP, D), jnp.float32),
                    jax.ShapeDtypeStruct((S, KVH, 1, splits, MP), jnp.float32))
    # cluster_combine: a sequence's splits are one cluster ("split" is then a cluster axis)
    grid = dict(grid=(S, KVH // nh), grid_names=("seq", "kvh"), cluster=(splits,),
                cluster_names=("split",)) if cl else dict(
        grid=(S, KVH // nh, splits), grid_names=("seq", "kvh", "split"))
    return plgpu.kernel(
        entry,
        out_type=out_type,
        **grid,
        num_threads=nh + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )


def resolve_config(q_shape, k_pages_shape, page_table_shape, *, interpret=None,
                   config: DecodeConfig | None = None, kv_itemsize: int = 2) -> DecodeConfig:
    """The config a call runs with: `config` or the heuristic, forced to `compat` in interpret
    mode, validated. kv_itemsize 1: 8-bit pages."""
    _, _, D = q_shape
    _, page_size, KVH, _ = k_pages_shape
    S, max_pages = page_table_shape
    cfg = config if config is not None else choose_config(S, KVH, max_pages, page_size, D,
                                                          kv_itemsize=kv_itemsize)
    if interpret is not None and not cfg.compat:
        # Interpret mode runs neither pl.run_state nor a register-LHS wgmma: use the compat PV,
        # whose P staging buffer may cost the ring a stage.
        cfg = fit_smem(dataclasses.replace(cfg, compat=True), D, kv_itemsize)
    cfg.validate(D, page_size, kv_itemsize)
    return cfg


def _check(q, k_pages, v_pages, max_query_len, k_scale=None, v_scale=None):
    if (k_scale is None) != (v_scale is None):
        raise ValueError("give both k_scale and v_scale, or neither")
    if not supported(q.shape, k_pages.shape, q.dtype, max_query_len, k_dtype=k_pages.dtype,
                     k_scale=k_scale):
        raise ValueError(f"paged_decode_mgpu does not support q{q.shape} {q.dtype} / pages "
                         f"{k_pages.shape} {k_pages.dtype} (scales given: "
                         f"{k_scale is not None}) / max_query_len={max_query_len}; float pages "
                         "must have q's dtype, 8-bit pages must be float8_e4m3fn with scales")
    if v_pages.dtype != k_pages.dtype:
        raise ValueError(f"k_pages ({k_pages.dtype}) and v_pages ({v_pages.dtype}) must share "
                         "a dtype")
    if k_scale is not None:
        P, page, KVH, _ = k_pages.shape
        for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
            if sc.shape != (P, KVH, page):
                raise ValueError(f"{name} has shape {sc.shape}; the scale pools are "
                                 f"[pages, kv_heads, page] = {(P, KVH, page)}")


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "config"))
def decode_kernel_call(q, k_pages, v_pages, page_table, seq_lens, query_start, *, scale: float,
                       interpret=False, config: DecodeConfig | None = None, k_scale=None,
                       v_scale=None):
    """The Mosaic GPU kernel alone: o [T, H, D] with one split or cluster_combine, else the f32
    partials (o_sp [S, KVH, 1, splits, M, D], lse [S, KVH, 1, splits, M]). Lowers for Hopper on
    a CPU (the Triton combine needs a GPU to lower), so the lowering tests use it."""
    T, H, D = q.shape
    _, page_size, KVH, _ = k_pages.shape
    S, _ = page_table.shape
    _check(q, k_pages, v_pages, 1, k_scale, v_scale)
    interp = interpret_params(interpret)
    cfg = resolve_config(q.shape, k_pages.shape, page_table.shape, interpret=interp,
                         config=config, kv_itemsize=k_pages.dtype.itemsize)
    kern = _build_kernel(T=T, S=S, H=H, D=D, KVH=KVH, page_size=page_size, cfg=cfg,
                         scale=float(scale), dtype=q.dtype, interpret=interp,
                         kv_dtype=k_pages.dtype)
    scales = () if k_scale is None else (k_scale.astype(jnp.float32),
                                         v_scale.astype(jnp.float32))
    return kern(seq_lens.astype(jnp.int32), query_start.astype(jnp.int32),
                page_table.astype(jnp.int32), q, k_pages, v_pages, *scales)


@functools.partial(jax.jit, static_argnames=("scale", "max_query_len", "interpret", "config"))
def paged_decode_mgpu(q, k_pages, v_pages, page_table, seq_lens, query_start, *, scale: float,
                      max_query_len: int = 1, interpret=False,
                      config: DecodeConfig | None = None, k_scale=None, v_scale=None):
    """Paged decode attention (Mosaic GPU kernel [+ the split-K combine]); see the module
    docstring. One launch with one split or `cluster_combine`, two with several splits.

    interpret: False (compile for the GPU), True or a `plgpu.InterpretGPUParams` (GPU interpret
    mode on any backend; forces the `compat` PV path). k_scale / v_scale: f32 [P, KVH, page]
    scales of float8_e4m3fn pages (None for float pages)."""
    T, H, _ = q.shape
    KVH = k_pages.shape[2]
    _check(q, k_pages, v_pages, max_query_len, k_scale, v_scale)
    out = decode_kernel_call(q, k_pages, v_pages, page_table, seq_lens, query_start,
                             scale=scale, interpret=interpret, config=config, k_scale=k_scale,
                             v_scale=v_scale)
    if not isinstance(out, tuple):  # one split: rows written in place
        return out
    o_sp, lse = out
    return combine_splits(query_start.astype(jnp.int32), o_sp, lse, G=H // KVH, H=H, T=T,
                          block_q=1, dtype=q.dtype,
                          interpret=interpret_params(interpret) is not None,
                          name="imp_decode_mgpu_combine")
