"""What the cross-pass pipelined decode loop would rely on (docs/kernels_notes.md, session 15):
wgmma accumulators that outlive a pass of a `fori_loop` (one `run_scoped` around the loop),
read with `plgpu.wgmma_accumulator_load(ref, wait_n=1)` while a later wgmma is in flight,
reset and rescaled by assignment, the next pass's Q K^T issued before this pass's P V. The loop
below is that schedule on small tiles: S_t = A_t B^T, O = O / 2 + bf16(S_t) B.

On CPU: it lowers for Hopper (P from registers, as the fast path, and through SMEM, as the
interpret-safe path), and GPU interpret mode rejects the assignment (pinned). On a GPU:
the numbers against the same loop in jnp."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

os.environ.setdefault("NPROC", str(max(16, os.cpu_count() or 1)))  # interpret-mode threads

N, M = 4, 64                                               # passes; tile rows / cols
SW16 = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _kernel(p_in_registers: bool):
    def entry(a_ref, b_ref, o_ref, a_smem, b_smem, bar):
        plgpu.copy_gmem_to_smem(a_ref, a_smem, bar.at[0])
        plgpu.copy_gmem_to_smem(b_ref, b_smem, bar.at[1])
        plgpu.barrier_wait(bar.at[0])
        plgpu.barrier_wait(bar.at[1])
        bt = b_smem.transpose((1, 0))

        def scoped(s_acc, o_acc):
            plgpu.wgmma(s_acc, a_smem.at[0], bt)                 # S_0, before the loop

            def one_pass(t, carry):
                s = plgpu.wgmma_accumulator_load(s_acc, wait_n=1)   # S_t; O's P V may run
                o = plgpu.wgmma_accumulator_load(o_acc, wait_n=0)   # the last P V is done
                o_acc[...] = o * 0.5                                # rescale
                s_acc[...] = jnp.zeros((M, M), jnp.float32)         # reset, then S_{t+1}
                plgpu.wgmma(s_acc, a_smem.at[jnp.minimum(t + 1, N - 1)], bt)
                p = s.astype(jnp.bfloat16)
                if p_in_registers:
                    plgpu.wgmma(o_acc, p, b_smem)                   # P V, P from registers
                else:
                    a_smem.at[N][...] = p                           # P V, P through SMEM
                    plgpu.commit_smem()
                    plgpu.wgmma(o_acc, a_smem.at[N], b_smem)
                return carry

            lax.fori_loop(0, N, one_pass, 0)
            return plgpu.wgmma_accumulator_load(o_acc, wait_n=0)

        o_ref[...] = pl.run_scoped(scoped, plgpu.ACC((M, M), jnp.float32),
                                   plgpu.ACC((M, M), jnp.float32))
    return entry


def _call(p_in_registers: bool, interpret: bool = False):
    return plgpu.kernel(
        _kernel(p_in_registers), out_type=jax.ShapeDtypeStruct((M, M), jnp.float32),
        scratch_types=[plgpu.SMEM((N + 1, M, M), jnp.bfloat16, transforms=SW16),
                       plgpu.SMEM((M, M), jnp.bfloat16, transforms=SW16),
                       plgpu.Barrier(num_barriers=2)],
        interpret=plgpu.InterpretGPUParams() if interpret else None)


def _inputs():
    a = jax.random.normal(jax.random.PRNGKey(0), (N + 1, M, M), jnp.float32) * 0.1
    b = jax.random.normal(jax.random.PRNGKey(1), (M, M), jnp.float32) * 0.1
    return a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)


def _reference(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    o = jnp.zeros((M, M), jnp.float32)
    for t in range(N):
        o = o * 0.5 + (a[t] @ b.T).astype(jnp.bfloat16).astype(jnp.float32) @ b
    return o


@pytest.mark.parametrize("p_in_registers", [True, False], ids=["p_registers", "p_smem"])
def test_carried_accumulators_lower(p_in_registers):
    text = jax.jit(_call(p_in_registers)).trace(*_inputs()).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_pinned_limit_interpret_mode_assigns_no_accumulator():
    """jax 0.11.2's GPU interpret mode cannot assign a wgmma accumulator, so the pipelined loop
    has no CPU numerics test. When an upgrade lifts this, this fails: add one."""
    with pytest.raises(ValueError, match="Accumulator shape"):
        jax.block_until_ready(_call(False, interpret=True)(*_inputs()))


@pytest.mark.gpu
@pytest.mark.parametrize("p_in_registers", [True, False], ids=["p_registers", "p_smem"])
def test_gpu_carried_accumulators(p_in_registers):
    a, b = _inputs()
    out, ref = _call(p_in_registers)(a, b), _reference(a, b)
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 1e-2
