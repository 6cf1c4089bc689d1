"""FP8 (e4m3) GEMM for prefill-sized M on Hopper: Pallas Mosaic GPU, TMA + wgmma, f32 accumulation.

    y[M, N] = (xq[M, K] @ wq[N, K].T) * x_scale[M, None] * w_scale[None, N]   -> bf16

`xq` holds activations quantized per token (`imp_jax.quant.quantize_activations`), `wq` weights
quantized per output channel. Both scales factor out of the K sum, so they are applied once, to
the f32 accumulator in registers, in the epilogue; the kernel writes bf16 (no f32 round trip).

Weight layout: **[N, K], K-major** (each output channel's K values contiguous, PyTorch's Linear
layout). Hopper's wgmma takes 8-bit operands only K-major, A and B alike (the transpose bits in
the instruction exist for 16-bit types only; `mosaic/gpu/wgmma.py` raises "Only f16 WGMMA supports
transposes"), and TMA copies tiles without transposing them. So B is loaded as [tile_n, tile_k]
tiles of wq and handed to wgmma as a transposed view of that SMEM tile (K stays fastest).
`QuantArray` stores its codes in this layout (imp_jax/quant.py), so no call transposes a weight.

Structure (after jax's `hopper_matmul_mgpu` example, rewritten for fp8 + scales):
  * persistent grid: one CTA per SM loops over output tiles (`plgpu.nd_loop`), in a planar snake
    order (`grid_minor_dim`, `grid_tile_width`) so neighbouring CTAs share A or B tiles in L2;
  * warp specialization: `emit_pipeline_warp_specialized` runs one producer warpgroup issuing TMA
    loads `max_concurrent_steps` K-steps ahead, and two consumer warpgroups, each owning a
    [tile_m, tile_n] accumulator of the [cta_tile_m, cta_tile_n] CTA tile (split along N or M,
    `wg_dimension`);
  * SMEM tiles use the 128-byte swizzle (tile_k = 128 e4m3 = 128 bytes per row);
  * epilogue: the consumer issues the TMA loads of its x_scale / w_scale slices before the main
    loop (so they land while it runs), multiplies the accumulator by both (row / column
    broadcasts in the WGMMA register layout), casts to bf16, stores in [epi_tile_m, epi_tile_n]
    pieces through SMEM with TMA (double-buffered).
  * `cluster_dimension="M"/"N"`: 2-CTA clusters whose pair shares the B (or A) tile, loaded once
    from L2 with a TMA multicast into both CTAs' SMEM (halves that operand's L2 traffic, which
    128 x 256 fp8 tiles at full tensor-core rate otherwise press against);
  * `promote=True`: each K-step's wgmma goes to a fresh accumulator that is added to an f32
    register accumulator (DeepSeek-V3 / DeepGEMM "promotion"): Hopper's fp8 MMA accumulates with
    reduced precision inside one long chain. Costs registers (use tile_n <= 64 per warpgroup).

M is padded to the CTA tile; N must be a multiple of the CTA tile's N and K of tile_k
(`supported`). On CPU the kernel runs under Mosaic GPU's interpret mode (`interpret=True`).

    fp8_matmul(xq, x_scale, wq_nk, w_scale, config=None, interpret=False) -> [M, N] bf16
    fp8_matmul_ref(...)                              the jnp reference
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

FP8 = jnp.float8_e4m3fn
NUM_SMS_H100 = 132


@dataclasses.dataclass(frozen=True)
class Fp8GemmConfig:
    tile_m: int = 128  # per consumer warpgroup
    tile_n: int = 128  # per consumer warpgroup
    tile_k: int = 128  # 128 e4m3 = one 128-byte swizzle row
    max_concurrent_steps: int = 4  # SMEM stages
    wg_dimension: str = "N"  # the 2 consumer warpgroups split the CTA tile along "N" or "M"
    epi_tile_m: int = 64
    epi_tile_n: int = 64
    grid_minor_dim: str = "N"  # planar-snake order of output tiles
    grid_tile_width: int = 8
    promote: bool = False  # per-K-step accumulators added in f32 registers (see module doc)
    explicit_transforms: bool = True  # tiling+swizzle given (as the jax example) vs inferred
    lowering: str = "warpgroup"  # Mosaic GPU lowering semantics: "warpgroup" or "lane"
    # 2-CTA clusters along "M" (the pair shares each B tile: one TMA multicast into both) or "N"
    # (shares A tiles): halves the L2 -> SMEM traffic of that operand. None: no cluster.
    cluster_dimension: str | None = None
    num_sms: int | None = None  # persistent CTAs; None: the device's SM count

    @property
    def cta_tile_m(self) -> int:
        return self.tile_m * (2 if self.wg_dimension == "M" else 1)

    @property
    def cta_tile_n(self) -> int:
        return self.tile_n * (2 if self.wg_dimension == "N" else 1)

    @property
    def cluster_tile_m(self) -> int:
        return self.cta_tile_m * (2 if self.cluster_dimension == "M" else 1)

    @property
    def cluster_tile_n(self) -> int:
        return self.cta_tile_n * (2 if self.cluster_dimension == "N" else 1)

    def smem_bytes(self, out_itemsize: int = 2) -> int:
        stage = (self.cta_tile_m + self.cta_tile_n) * self.tile_k  # 1 byte per e4m3
        out = 2 * self._out_slots() * self.epi_tile_m * self.epi_tile_n * out_itemsize
        return self.max_concurrent_steps * stage + out + 2 * 4 * (self.tile_m + self.tile_n) + 1024

    def _out_slots(self) -> int:
        return min(2, (self.tile_m * self.tile_n) // (self.epi_tile_m * self.epi_tile_n))


SMEM_LIMIT = 227 * 1024  # H100 dynamic shared memory per block


def _check(cfg: Fp8GemmConfig):
    if cfg.wg_dimension not in ("M", "N") or cfg.grid_minor_dim not in ("M", "N"):
        raise ValueError(f"{cfg}: wg_dimension / grid_minor_dim must be 'M' or 'N'")
    if cfg.tile_m % 64 or cfg.tile_n % 8 or cfg.tile_n > 256:
        raise ValueError(f"{cfg}: wgmma needs tile_m % 64 == 0 and tile_n a multiple of 8, <= 256")
    if cfg.tile_k % 32:
        raise ValueError(f"{cfg}: tile_k must be a multiple of 32 (fp8 wgmma K)")
    if cfg.tile_m % cfg.epi_tile_m or cfg.tile_n % cfg.epi_tile_n:
        raise ValueError(f"{cfg}: epilogue tiles must divide the warpgroup tile")
    if cfg.lowering not in ("warpgroup", "lane"):
        raise ValueError(f"{cfg}: lowering must be 'warpgroup' or 'lane'")
    if cfg.cluster_dimension not in (None, "M", "N"):
        raise ValueError(f"{cfg}: cluster_dimension must be None, 'M' or 'N'")


def supported(M: int, K: int, N: int, config: Fp8GemmConfig | None = None) -> bool:
    cfg = config or choose_config(M, K, N)
    return cfg is not None and N % cfg.cluster_tile_n == 0 and K % cfg.tile_k == 0 and M >= 1


def choose_config(M: int, K: int, N: int, **overrides) -> Fp8GemmConfig | None:
    """The default tile set for an [M, K] x [K, N] problem (None if N/K cannot be tiled).

    128 x 256 CTA tiles (two warpgroups of 128 x 128, split along N), K steps of 128, 4 stages:
    4 x 48 KB of operand tiles + 32 KB of epilogue buffers fits the 227 KB of SMEM. N not a
    multiple of 256 falls back to 128-wide CTA tiles (warpgroups of 128 x 64); small M to one
    64-row tile per warpgroup split along N.
    """
    kw = {}
    if N % 256:
        kw.update(tile_n=64)
    if M <= 64:
        kw.update(tile_m=64)
    if K % 128:
        kw.update(tile_k=64)
    kw.update(overrides)
    tm, tn = kw.get("tile_m", 128), kw.get("tile_n", 128)
    kw.setdefault("epi_tile_m", min(64, tm))
    kw.setdefault("epi_tile_n", min(64, tn))
    cfg = Fp8GemmConfig(**kw)
    if N % cfg.cluster_tile_n or K % cfg.tile_k:
        return None
    return cfg


def fp8_matmul_ref(xq, x_scale, wq, w_scale, *, w_layout: str = "nk", out_dtype=jnp.bfloat16):
    """jnp reference: exact products of the e4m3 values, f32 accumulation, both scales, cast."""
    dims = ((1,), (1,)) if w_layout == "nk" else ((1,), (0,))
    y = lax.dot_general(xq, wq, (dims, ((), ())), preferred_element_type=jnp.float32)
    y = y * x_scale.reshape(-1, 1).astype(jnp.float32) * w_scale.reshape(1, -1).astype(jnp.float32)
    return y.astype(out_dtype)


def _num_sms(cfg: Fp8GemmConfig, interpret: bool) -> int:
    if cfg.num_sms:
        return cfg.num_sms
    if interpret:
        return 4
    try:
        from jax.extend import backend
        return int(backend.get_default_device().core_count)
    except Exception:  # noqa: BLE001
        return NUM_SMS_H100


def _transforms(plgpu, cols: int, itemsize_bits: int):
    swizzle = plgpu.find_swizzle(cols * itemsize_bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // itemsize_bits)),
            plgpu.SwizzleTransform(swizzle))


def _build(M: int, K: int, N: int, in_dtype, out_dtype, cfg: Fp8GemmConfig, interpret: bool):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    _check(cfg)
    tile_m, tile_n, tile_k = cfg.tile_m, cfg.tile_n, cfg.tile_k
    cta_m, cta_n = cfg.cta_tile_m, cfg.cta_tile_n
    clu_m, clu_n = cfg.cluster_tile_m, cfg.cluster_tile_n
    if M % clu_m or N % clu_n or K % tile_k:
        raise ValueError(f"[{M}, {K}] x [{K}, {N}] is not tiled by {cfg}")
    m_iters, n_iters, k_iters = M // clu_m, N // clu_n, K // tile_k  # cluster tiles
    cluster = 2 if cfg.cluster_dimension else 1
    epi_m, epi_n = cfg.epi_tile_m, cfg.epi_tile_n
    in_bits = jnp.dtype(in_dtype).itemsize * 8
    out_bits = jnp.dtype(out_dtype).itemsize * 8
    op_transforms = _transforms(plgpu, tile_k, in_bits) if cfg.explicit_transforms else ()
    out_transforms = _transforms(plgpu, epi_n, out_bits)
    num_out_slots = cfg._out_slots()
    minor = 0 if cfg.grid_minor_dim == "M" else 1
    wg_split_m = cfg.wg_dimension == "M"

    def spec(shape, shared_along):
        kw = dict(transforms=op_transforms) if op_transforms else {}
        if cfg.cluster_dimension == shared_along:  # both CTAs of the pair read this tile
            kw["collective_axes"] = ("cluster",)
        return plgpu.BlockSpec(shape, lambda k: (0, k), memory_space=plgpu.SMEM, **kw)

    def get_pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40,
            # A [m, k] (shared by a pair split along N), B [n, k] (shared by a pair along M)
            in_specs=[spec((cta_m, tile_k), "N"), spec((cta_n, tile_k), "M")],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=cfg.max_concurrent_steps,
            compute_context=compute_context,
        )

    def kernel(a_gmem, b_gmem, xs_gmem, ws_gmem, out_gmem):
        ignore = lambda *_, **__: None  # noqa: E731 -- allocations do not depend on the bodies

        @functools.partial(
            pl.run_scoped,
            pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem),
            out_smem=plgpu.SMEM((2, num_out_slots, epi_m, epi_n), out_dtype,
                                transforms=out_transforms),
            xs_smem=plgpu.SMEM((2, tile_m), jnp.float32),
            ws_smem=plgpu.SMEM((2, tile_n), jnp.float32),
            xs_bar=plgpu.Barrier(num_barriers=2),
            ws_bar=plgpu.Barrier(num_barriers=2),
            collective_axes="wg",
        )
        def _scope(pipeline_allocs, out_smem, xs_smem, ws_smem, xs_bar, ws_bar):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _tile_loop(info):
                (lin,) = info.index
                m_idx, n_idx = plgpu.planar_snake(lin, (m_iters, n_iters), minor,
                                                  cfg.grid_tile_width)
                if cfg.cluster_dimension == "M":
                    m_idx = m_idx * 2 + lax.axis_index("cluster")
                elif cfg.cluster_dimension == "N":
                    n_idx = n_idx * 2 + lax.axis_index("cluster")
                cta_m_slice = pl.ds(m_idx * cta_m, cta_m)
                cta_n_slice = pl.ds(n_idx * cta_n, cta_n)
                if wg_split_m:
                    wg_m, wg_n = pl.ds(wg * tile_m, tile_m), slice(None)
                    m0, n0 = m_idx * cta_m + wg * tile_m, n_idx * cta_n
                else:
                    wg_m, wg_n = slice(None), pl.ds(wg * tile_n, tile_n)
                    m0, n0 = m_idx * cta_m, n_idx * cta_n + wg * tile_n

                def epilogue(acc):  # acc: [tile_m, tile_n] f32 in the WGMMA layout
                    plgpu.barrier_wait(xs_bar.at[wg])
                    plgpu.barrier_wait(ws_bar.at[wg])
                    xs = plgpu.load(xs_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                    ws = plgpu.load(ws_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(0))
                    acc = acc * lax.broadcast_in_dim(xs, (tile_m, tile_n), [0])
                    acc = acc * lax.broadcast_in_dim(ws, (tile_m, tile_n), [1])
                    out = acc.astype(out_dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for mi in range(tile_m // epi_m):
                        for ni in range(tile_n // epi_n):
                            ms, ns = slice(mi * epi_m, (mi + 1) * epi_m), \
                                slice(ni * epi_n, (ni + 1) * epi_n)
                            slot = (mi * (tile_n // epi_n) + ni) % 2
                            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                            out_smem[wg, slot] = out[ms, ns]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg, slot],
                                out_gmem.at[cta_m_slice, cta_n_slice].at[wg_m, wg_n].at[ms, ns])

                def compute_context(eval_pipeline):
                    # scales first: their TMA lands while the main loop runs
                    plgpu.copy_gmem_to_smem(xs_gmem.at[pl.ds(m0, tile_m)], xs_smem.at[wg],
                                            xs_bar.at[wg])
                    plgpu.copy_gmem_to_smem(ws_gmem.at[pl.ds(n0, tile_n)], ws_smem.at[wg],
                                            ws_bar.at[wg])
                    if cfg.promote:
                        zeros = plgpu.layout_cast(jnp.zeros((tile_m, tile_n), jnp.float32),
                                                  plgpu.Layout.WGMMA)
                        epilogue(eval_pipeline(zeros))
                    else:
                        @functools.partial(pl.run_scoped,
                                           acc_ref=plgpu.ACC((tile_m, tile_n), jnp.float32))
                        def _acc_scope(acc_ref):
                            eval_pipeline(acc_ref)
                            epilogue(acc_ref[...])

                def mma_body(_, a_smem, b_smem, carry):
                    a = a_smem.at[wg_m]
                    b = b_smem.at[wg_n].transpose((1, 0))  # [tile_k, tile_n] view, K fastest
                    if cfg.promote:
                        def step(acc_ref):
                            plgpu.wgmma(acc_ref, a, b)
                            return acc_ref[...]
                        return carry + pl.run_scoped(step, plgpu.ACC((tile_m, tile_n),
                                                                     jnp.float32))
                    plgpu.wgmma(carry, a, b)
                    plgpu.wgmma_wait(0)
                    return carry

                get_pipeline(mma_body, compute_context)(
                    a_gmem.at[cta_m_slice, :], b_gmem.at[cta_n_slice, :],
                    allocations=pipeline_allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    semantics = (plgpu.LoweringSemantics.Warpgroup if cfg.lowering == "warpgroup"
                 else plgpu.LoweringSemantics.Lane)
    num_ctas = min(_num_sms(cfg, interpret) // cluster, m_iters * n_iters)
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((M, N), out_dtype),
        grid=(num_ctas,),
        grid_names=("sm",),
        cluster=(cluster,),
        cluster_names=("cluster",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=semantics),
        kernel_name=f"imp_fp8_gemm_{cta_m}x{cta_n}x{tile_k}_s{cfg.max_concurrent_steps}",
    )


def kmajor_dims(xq: jax.Array, wq: jax.Array) -> tuple[int, int, int]:
    """(M, K, N) of xq [M, K] @ wq[N, K].T, or an error naming both shapes."""
    M, K = xq.shape
    N, K2 = wq.shape
    if K2 != K:
        raise ValueError(f"xq is [M={M}, K={K}] but wq is [N={N}, K={K2}] (K-major layout)")
    return M, K, N


@functools.partial(jax.jit, static_argnames=("config", "interpret", "out_dtype"))
def fp8_matmul(xq: jax.Array, x_scale: jax.Array, wq: jax.Array, w_scale: jax.Array, *,
               config: Fp8GemmConfig | None = None, interpret: bool = False,
               out_dtype=jnp.bfloat16) -> jax.Array:
    """xq [M, K] e4m3, x_scale [M] (or [M, 1]) f32, wq [N, K] e4m3 (K-major), w_scale [N] f32
    -> [M, N] out_dtype. M is padded to the CTA tile (padding rows get scale 0)."""
    M, K, N = kmajor_dims(xq, wq)
    cfg = config or choose_config(M, K, N)
    if cfg is None or not supported(M, K, N, cfg):
        raise ValueError(f"fp8_matmul: N={N}, K={K} not tiled by {cfg}")
    Mp = -(-M // cfg.cluster_tile_m) * cfg.cluster_tile_m
    xs = x_scale.reshape(M).astype(jnp.float32)
    if Mp != M:
        xq = jnp.pad(xq, ((0, Mp - M), (0, 0)))
        xs = jnp.pad(xs, (0, Mp - M))
    ws = w_scale.reshape(N).astype(jnp.float32)
    call = _build(Mp, K, N, xq.dtype, jnp.dtype(out_dtype), cfg, interpret)
    ctx = contextlib.nullcontext()
    if interpret:
        import jax.experimental.pallas.mosaic_gpu as plgpu
        ctx = plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams())
    with ctx:
        y = call(xq, wq, xs, ws)
    return y[:M] if Mp != M else y


def flops(M: int, K: int, N: int) -> int:
    return 2 * M * K * N


__all__ = ["Fp8GemmConfig", "choose_config", "supported", "fp8_matmul",
           "fp8_matmul_ref", "flops", "SMEM_LIMIT"]
