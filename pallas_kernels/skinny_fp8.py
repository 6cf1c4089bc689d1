"""Decode-time ("skinny", M = 1..64) FP8 GEMM for Hopper: Pallas Mosaic GPU, TMA ring + wgmma.

    y[M, N] = (xq[M, K] @ wq[N, K].T) * x_scale[M, None] * w_scale[None, N]   -> bf16

The same contract and operands as `fp8_gemm.fp8_matmul` (per-token e4m3 activations from
`imp_jax.quant.quantize_activations`, per-output-channel e4m3 weights stored **[N, K]**,
K-major), built for M <= 64, where the GEMM is bound by reading the weight once: the goal is
streaming wq at the HBM rate, not FLOPs.

Swapped operands. Hopper's fp8 wgmma takes both operands K-major (no transpose bits for 8-bit
types) and its M side is 64 rows per instruction, its N side any multiple of 8 up to 256. So the
kernel computes the TRANSPOSED product

    yT[N, Mp] = wq[N, K] @ xq_pad[Mp, K].T

with the weight as the wgmma A operand (tile_n rows of N per CTA, a multiple of 64) and the tiny
activation matrix as the B operand, M padded to Mp in {8, 16, 32, 64} (wgmma N >= 8): native fp8
wgmma on both, no conversion pass, no wasted weight bytes (the padding costs only the x tile's
Mp - M zero rows, which come from L2).

Streaming. Little's law: ~3 MB in flight across the chip keeps HBM busy at ~1 us latency, i.e.
>= ~24 KB per SM, more to be safe. Each CTA runs `plgpu.emit_pipeline` over its K range with a
`stages`-deep ring of TMA loads ([tile_n, tile_k] weight tile + [Mp, tile_k] x tile per stage;
[128, 128] e4m3 = 16 KB), so `stages - 1` weight tiles are always in flight while the current one
goes through one (tiny) wgmma. One warpgroup per CTA (no warp specialization): the wgmma per step
is ~100x cheaper than the step's load, so a producer warpgroup buys nothing, and 128-thread CTAs
with modest SMEM let 2+ CTAs share an SM (the warp-specialized pipeline of fp8_gemm.py claims the
whole register file: one CTA per SM). x is pipelined with the weight rather than held resident:
it is L2-resident (all CTAs read the same [Mp, K] bytes), costs Mp / tile_n of the weight's bytes
in L2 traffic, and keeps every SMEM buffer a plain ring slot.

Grid (non-persistent): (N / tile_n, splits). Llama's N gives few 128-row tiles (N = 4096 -> 32)
for 132 SMs, so K may be split: CTA (n, s) streams the [tile_n, K / splits] slab starting at
s * K / splits.
  * splits == 1: the CTA applies both scales to its f32 accumulator in registers, casts to bf16
    and TMA-stores yT[n-tile, :Mp]. One kernel.
  * splits > 1: the CTA writes its scaled f32 partial to P[s, n-tile, :Mp]; XLA sums over s,
    slices, transposes and casts (one small fusion; splits * N * Mp * 4 bytes each way, mostly
    L2-resident, kept well below the weight bytes by `choose_config`).

Output layout: the kernel writes yT [N, Mp] (its natural layout: the accumulator's rows are
weight rows), and `skinny_fp8_matmul` returns `yT[:, :M].T` -- an XLA slice + transpose of N * M
elements that XLA fuses into the consumer's elementwise fusion inside a jitted model step (for
M = 1 it is a reshape). A transposed in-kernel store would need an [Mp, tile_n] register
transpose through SMEM for no byte saved. `skinny_fp8_matmul_t` returns yT[:, :M] as is.

Configs (`choose_config`): TUNED[(K, N, Mp)] once measured, else the best of a small grid
(tile_n 64/128/256, tile_k 128/256, stages 4..12, splits 1..16) under `estimate_us`, a model of
HBM bytes derated by bytes in flight (Little), per-SM pull, L2 traffic and the split epilogue.
For Llama-3-8B at M = 1 it picks 64-row tiles with a 12-deep ring for qkv (96 CTAs), 2-way
split-K for o and down (128 CTAs), 64 x 128 tiles for gate_up (448 CTAs, ~4 per SM) and
128 x 128 for lm_head (1002 CTAs). Ties go to fewer splits, then more bytes in flight.

M is padded to Mp (rows of zeros with x_scale 0) by XLA (`jnp.pad`, which fuses into the
producer of xq, e.g. `quantize_activations`). N must be a multiple of tile_n (64 divides every
Llama-3 shape, lm_head's 128256 included) and K / splits of tile_k (`supported`). On CPU the
kernel runs under Mosaic GPU's interpret mode (`interpret=True`).

    skinny_fp8_matmul(xq, x_scale, wq_nk, w_scale, config=None, interpret=False) -> [M, N] bf16
    skinny_fp8_matmul_t(...)                   -> yT [N, M] (no transpose)
    skinny_fp8_ref(...)                        -> the jnp reference (fp8_gemm.fp8_matmul_ref)
    choose_config(M, K, N), candidate_configs  -> launch configs (TUNED table, else the model)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.fp8_gemm import FP8, SMEM_LIMIT, _transforms, fp8_matmul_ref, kmajor_dims

NUM_SMS_H100 = 132
HBM_TBS = 2.94  # measured weight-streaming ceiling on the H100 (../shared/GPU.md)
MAX_M = 64  # wgmma N <= 256, but beyond 64 the GEMM is no longer weight-bound: use fp8_gemm
INFLIGHT_BYTES = 4e6  # Little's law: 2.94 TB/s x ~1.4 us of loaded HBM latency
SM_SMEM = 228 * 1024  # SMEM per SM shared by co-resident CTAs (227 KB max per CTA)
# Model constants (guesses to rank configs, to be replaced by TUNED entries from a sweep):
SM_GBS = 30.0  # GB/s one SM sustains (2.94 TB/s over 132 SMs needs ~22 each)
RAMP_US = 1.5  # launch + first loads' latency + epilogue of a wave of CTAs
L2_TBS = 5.5  # L2 -> SM bandwidth, TB/s
SPLIT_US = 2.0  # the split-K reduction's extra XLA fusion (launch + tiny kernel)


@dataclasses.dataclass(frozen=True)
class SkinnyFp8Config:
    tile_n: int = 128  # weight rows per CTA (the wgmma M side: a multiple of 64)
    tile_k: int = 128  # K per pipeline step (128 e4m3 = one 128-byte swizzle row)
    stages: int = 8  # TMA ring depth (stages - 1 tiles in flight while one is consumed)
    splits: int = 1  # K partitions (grid axis "s"); > 1: f32 partials + an XLA sum

    def stage_bytes(self, Mp: int) -> int:
        return (self.tile_n + Mp) * self.tile_k  # e4m3: 1 byte per element

    def smem_bytes(self, M: int, out_itemsize: int = 4) -> int:
        """Ring + scales + the output tile (f32 by default: the partials, or f32 out; a bf16
        single-split output needs half) + ~1 KB of barriers and alignment."""
        Mp = padded_m(M)
        out = self.tile_n * Mp * (4 if self.splits > 1 else out_itemsize)
        return self.stages * self.stage_bytes(Mp) + out + 4 * (self.tile_n + Mp) + 1024

    def __str__(self):
        return (f"SkinnyFp8Config(tile_n={self.tile_n}, tile_k={self.tile_k}, "
                f"stages={self.stages}, splits={self.splits})")


# (K, N, Mp) -> config, measured winners of `benchmarks/gemm.py --part skinny_fp8`'s sweep;
# empty until that has run on an H100 (the model below picks meanwhile).
TUNED: dict[tuple[int, int, int], SkinnyFp8Config] = {}


def padded_m(M: int) -> int:
    """Mp: wgmma's N side, a multiple of 8; powers of two keep the variant count small."""
    return max(8, 1 << max(0, M - 1).bit_length())


def _valid(M: int, K: int, N: int, cfg: SkinnyFp8Config) -> bool:
    return (1 <= M <= MAX_M and cfg.tile_n % 64 == 0 and cfg.tile_n <= 256
            and cfg.tile_k % 32 == 0 and cfg.splits >= 1 and cfg.stages >= 2
            and N % cfg.tile_n == 0 and K % (cfg.splits * cfg.tile_k) == 0
            and cfg.smem_bytes(M) <= SMEM_LIMIT)


def supported(M: int, K: int, N: int, config: SkinnyFp8Config | None = None) -> bool:
    cfg = config or choose_config(M, K, N)
    return cfg is not None and _valid(M, K, N, cfg)


def estimate_us(M: int, K: int, N: int, cfg: SkinnyFp8Config,
                num_sms: int = NUM_SMS_H100) -> float:
    """A time model used to rank configs (not a measurement).

    CTAs run in waves of `slots` (SMEM-limited co-residency, at most 4 per SM). A wave takes the
    longer of
      * its weight bytes at HBM_TBS, derated by Little's law: the bytes in flight are the wave's
        rings (min(stages, steps) - 1 weight tiles outstanding per CTA) over INFLIGHT_BYTES;
      * the busiest SM's bytes at SM_GBS (one SM cannot pull the whole chip's bandwidth: this is
        what makes too few CTAs -- N / tile_n < 132 without split-K -- slow);
      * the weight and x tiles through L2 at L2_TBS (x is re-read by every N tile: Mp / tile_n of
        the weight's bytes, which matters at Mp = 64 with 64-row tiles);
    plus RAMP_US for the first wave (launch, first loads' latency, epilogue) and a little per
    later wave (co-resident CTAs overlap one CTA's ramp with the others' streaming). Split-K adds
    the f32 partials (written by the kernel, read by XLA; counted at half their bytes, since they
    mostly stay in the 50 MB L2) and SPLIT_US for the extra fusion."""
    Mp = padded_m(M)
    ctas = (N // cfg.tile_n) * cfg.splits
    steps = K // (cfg.splits * cfg.tile_k)
    tile = cfg.tile_n * cfg.tile_k
    per_cta = steps * tile  # weight bytes streamed by one CTA
    resident = max(1, min(4, SM_SMEM // cfg.smem_bytes(M)))
    slots = resident * num_sms
    hbm = HBM_TBS * 1e6  # bytes per us
    t, left, first = 0.0, ctas, True
    while left > 0:
        wave = min(left, slots)
        inflight = wave * max(1, min(cfg.stages, steps) - 1) * tile
        bw = hbm * min(1.0, inflight / INFLIGHT_BYTES)
        busiest = -(-wave // num_sms)  # CTAs on the most loaded SM
        l2 = wave * per_cta * (1 + Mp / cfg.tile_n) / (L2_TBS * 1e6)  # weight + x through L2
        t += max(wave * per_cta / bw, busiest * per_cta / (SM_GBS * 1e3), l2)
        t += RAMP_US if first else RAMP_US / 4
        left -= wave
        first = False
    if cfg.splits > 1:
        t += 2 * cfg.splits * N * Mp * 4 / (2 * hbm) + SPLIT_US
    return t


def candidate_configs(M: int, K: int, N: int) -> list[SkinnyFp8Config]:
    """Valid configs of a small grid, best first by `estimate_us`."""
    out = []
    for tile_n in (64, 128, 256):
        for tile_k in (128, 256):
            for splits in (1, 2, 4, 8, 16):
                steps = K // (splits * tile_k)
                # a ring deeper than the K steps is clamped in _build: skip the duplicates
                for stages in sorted({min(s, steps) for s in (4, 6, 8, 12)}):
                    cfg = SkinnyFp8Config(tile_n, tile_k, stages, splits)
                    if not _valid(M, K, N, cfg) or steps < 2:
                        continue
                    if splits > 1 and 2 * splits * padded_m(M) * N * 4 > K * N // 2:
                        continue  # partials (both ways) must stay well below the weight bytes
                    out.append(cfg)
    def key(c):
        # model time; on ties: fewer splits, then more bytes in flight (robust to a longer
        # latency than the model's) up to 2x INFLIGHT_BYTES, then tile_k = 128 (one swizzle row,
        # the fp8_gemm-proven shape), then less SMEM (co-residency)
        steps = K // (c.splits * c.tile_k)
        slots = max(1, min(4, SM_SMEM // c.smem_bytes(M))) * NUM_SMS_H100
        ctas = (N // c.tile_n) * c.splits
        inflight = min(ctas, slots) * (min(c.stages, steps) - 1) * c.tile_n * c.tile_k
        return (round(estimate_us(M, K, N, c), 1), c.splits, -min(inflight, 2 * INFLIGHT_BYTES),
                c.tile_k, c.smem_bytes(M))
    return sorted(out, key=key)


def choose_config(M: int, K: int, N: int, **overrides) -> SkinnyFp8Config | None:
    """TUNED[(K, N, Mp)] if measured, else the model's best candidate; None if nothing tiles.
    `overrides` replace fields of the chosen config (then re-validated)."""
    cfg = TUNED.get((K, N, padded_m(M)))
    if cfg is None:
        cands = candidate_configs(M, K, N)
        cfg = cands[0] if cands else None
    if cfg is not None and overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    if cfg is None or not _valid(M, K, N, cfg):
        return None
    return cfg


def skinny_fp8_ref(xq, x_scale, wq, w_scale, *, out_dtype=jnp.bfloat16):
    """jnp reference: exact e4m3 products, f32 accumulation, both scales, cast ([N, K] weight)."""
    return fp8_matmul_ref(xq, x_scale, wq, w_scale, w_layout="nk", out_dtype=out_dtype)


def _build(Mp: int, K: int, N: int, cfg: SkinnyFp8Config, out_dtype):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    tile_n, tile_k, splits = cfg.tile_n, cfg.tile_k, cfg.splits
    k_len = K // splits
    k_steps = k_len // tile_k
    stages = min(cfg.stages, k_steps)  # emit_pipeline shrinks it too; keep SMEM honest
    partial = splits > 1
    o_dtype = jnp.dtype(jnp.float32 if partial else out_dtype)
    op_transforms = _transforms(plgpu, tile_k, 8)  # 128-byte swizzle for tile_k >= 128 e4m3
    o_bits = jnp.dtype(o_dtype).itemsize * 8
    # rows of Mp outputs: 16 bytes (bf16, Mp = 8) have no swizzle; let Mosaic infer those
    o_transforms = _transforms(plgpu, Mp, o_bits) if Mp * o_bits >= 256 else ()

    def kernel(w_gmem, x_gmem, ws_gmem, xs_gmem, o_gmem):
        n_idx = lax.axis_index("n")
        s_idx = lax.axis_index("s")
        n0 = n_idx * tile_n
        k0 = s_idx * k_len

        @functools.partial(
            pl.run_scoped,
            ws_smem=plgpu.SMEM((tile_n,), jnp.float32),
            xs_smem=plgpu.SMEM((Mp,), jnp.float32),
            o_smem=plgpu.SMEM((tile_n, Mp), o_dtype, transforms=o_transforms),
            scale_bar=plgpu.Barrier(num_arrivals=2),
        )
        def _scope(ws_smem, xs_smem, o_smem, scale_bar):
            # the scales' TMA loads land while the main loop streams
            plgpu.copy_gmem_to_smem(ws_gmem.at[pl.ds(n0, tile_n)], ws_smem, scale_bar)
            plgpu.copy_gmem_to_smem(xs_gmem, xs_smem, scale_bar)

            def acc_scope(acc_ref):
                def body(_, w_smem, x_smem):
                    # [tile_n, tile_k] @ [tile_k, Mp]: B as a transposed view, K stays fastest
                    plgpu.wgmma(acc_ref, w_smem, x_smem.transpose((1, 0)))
                    # the ring slot is refilled right after the body returns
                    plgpu.wgmma_wait(0)

                plgpu.emit_pipeline(
                    body,
                    grid=(k_steps,),
                    in_specs=[
                        plgpu.BlockSpec((tile_n, tile_k), lambda k: (0, k),
                                        transforms=op_transforms),
                        plgpu.BlockSpec((Mp, tile_k), lambda k: (0, k),
                                        transforms=op_transforms),
                    ],
                    max_concurrent_steps=stages,
                )(w_gmem.at[pl.ds(n0, tile_n), pl.ds(k0, k_len)],
                  x_gmem.at[:, pl.ds(k0, k_len)])
                return acc_ref[...]

            acc = pl.run_scoped(acc_scope, plgpu.ACC((tile_n, Mp), jnp.float32))
            plgpu.barrier_wait(scale_bar)
            ws = plgpu.load(ws_smem, layout=plgpu.Layout.WGMMA.reduce(1))  # per row (N)
            xs = plgpu.load(xs_smem, layout=plgpu.Layout.WGMMA.reduce(0))  # per column (M)
            acc = acc * lax.broadcast_in_dim(ws, (tile_n, Mp), [0])
            acc = acc * lax.broadcast_in_dim(xs, (tile_n, Mp), [1])
            o_smem[...] = acc.astype(o_dtype)
            plgpu.commit_smem()
            dst = o_gmem.at[s_idx] if partial else o_gmem
            plgpu.copy_smem_to_gmem(o_smem, dst.at[pl.ds(n0, tile_n)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    out_shape = (splits, N, Mp) if partial else (N, Mp)
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(out_shape, o_dtype),
        grid=(N // tile_n, splits),
        grid_names=("n", "s"),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        kernel_name=f"imp_skinny_fp8_{tile_n}x{tile_k}x{Mp}_s{stages}_k{splits}",
    )


@functools.partial(jax.jit, static_argnames=("config", "interpret", "out_dtype"))
def skinny_fp8_matmul_t(xq: jax.Array, x_scale: jax.Array, wq: jax.Array, w_scale: jax.Array,
                        *, config: SkinnyFp8Config | None = None, interpret: bool = False,
                        out_dtype=jnp.bfloat16) -> jax.Array:
    """xq [M, K] e4m3, x_scale [M] (or [M, 1]) f32, wq [N, K] e4m3 (K-major), w_scale [N] (or
    [N, 1] / [1, N]) f32 -> yT [N, M] out_dtype (the kernel's own layout)."""
    M, K, N = kmajor_dims(xq, wq)
    cfg = config or choose_config(M, K, N)
    if cfg is None or not _valid(M, K, N, cfg):
        raise ValueError(f"skinny_fp8_matmul: M={M}, K={K}, N={N} not tiled by {cfg}")
    Mp = padded_m(M)
    xs = x_scale.reshape(M).astype(jnp.float32)
    if Mp != M:  # zero rows, zero scales: the padded columns of yT are 0 (and sliced off)
        xq = jnp.pad(xq, ((0, Mp - M), (0, 0)))
        xs = jnp.pad(xs, (0, Mp - M))
    ws = w_scale.reshape(N).astype(jnp.float32)
    call = _build(Mp, K, N, cfg, jnp.dtype(out_dtype))
    ctx = contextlib.nullcontext()
    if interpret:
        import jax.experimental.pallas.mosaic_gpu as plgpu
        ctx = plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams())
    with ctx:
        yt = call(wq, xq, ws, xs)
    if cfg.splits > 1:  # scaled f32 partials [splits, N, Mp]: one XLA reduction
        yt = yt.sum(0)
    return yt[:, :M].astype(out_dtype)


def skinny_fp8_matmul(xq, x_scale, wq, w_scale, **kw) -> jax.Array:
    """The fp8_gemm.fp8_matmul contract: -> y [M, N] (yT transposed by XLA, fused downstream)."""
    return skinny_fp8_matmul_t(xq, x_scale, wq, w_scale, **kw).T


def weight_bytes(K: int, N: int) -> int:
    return K * N  # e4m3


__all__ = ["SkinnyFp8Config", "TUNED", "padded_m", "supported", "estimate_us",
           "candidate_configs", "choose_config", "skinny_fp8_matmul", "skinny_fp8_matmul_t",
           "skinny_fp8_ref", "weight_bytes", "MAX_M"]
