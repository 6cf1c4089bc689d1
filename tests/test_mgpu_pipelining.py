"""The wgmma schedules a pipelined decode loop relies on (docs/kernels_notes.md, session 15),
on small tiles: the next pass's Q K^T issued before this pass's P V, then read with
`plgpu.wgmma_accumulator_load(ref, wait_n=1)` while the P V is still in flight.

* "run_state" (what `decode_mgpu`'s `pipelined_loop` does): per pass, a `run_state` over the
  P V accumulator and plain refs, a nested `run_scoped` for the Q K^T accumulators; the P V
  is waited for as `run_state` returns. S_t = A_t B^T; O = (O + bf16(S_t) B) / 2.
* "assign": accumulators that outlive the passes (one `run_scoped` around the loop), reset and
  rescaled by assignment. S_t as above; O = O / 2 + bf16(S_t) B.

On CPU both lower for Hopper; GPU interpret mode runs neither (no register-LHS wgmma, no
accumulator assignment: pinned). On a GPU: the numbers against the same loops in jnp."""

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


def _load(a_ref, b_ref, a_smem, b_smem, bar):
    """A and B into SMEM; B^T (the Q K^T's K-major operand) as a view."""
    plgpu.copy_gmem_to_smem(a_ref, a_smem, bar.at[0])
    plgpu.copy_gmem_to_smem(b_ref, b_smem, bar.at[1])
    plgpu.barrier_wait(bar.at[0])
    plgpu.barrier_wait(bar.at[1])
    return b_smem.transpose((1, 0))


def _kernel(p_in_registers: bool):
    def entry(a_ref, b_ref, o_ref, a_smem, b_smem, bar):
        bt = _load(a_ref, b_ref, a_smem, b_smem, bar)

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


def _run_state_kernel(a_ref, b_ref, o_ref, a_smem, b_smem, bar):
    bt = _load(a_ref, b_ref, a_smem, b_smem, bar)

    def first(s_acc):
        plgpu.wgmma(s_acc, a_smem.at[0], bt)
        return s_acc[...]

    def one_pass(t, carry):
        acc, p = carry

        def body(refs):
            o_acc, p_ref = refs

            def scoped(s_acc):
                plgpu.wgmma(s_acc, a_smem.at[jnp.minimum(t + 1, N - 1)], bt)   # S_{t+1}
                plgpu.wgmma(o_acc, p_ref[...].astype(jnp.bfloat16), b_smem)     # P V of t
                p_ref[...] = plgpu.wgmma_accumulator_load(s_acc, wait_n=1)       # P V runs
            pl.run_scoped(scoped, plgpu.ACC((M, M), jnp.float32))
        acc, p = pl.run_state(body)((plgpu.ACC.init(acc), p))
        return acc * 0.5, p

    o_ref[...] = lax.fori_loop(0, N, one_pass, (jnp.zeros((M, M), jnp.float32),
                                                pl.run_scoped(first, plgpu.ACC((M, M),
                                                                               jnp.float32))))[0]


def _call(p_in_registers: bool, interpret: bool = False, schedule: str = "assign"):
    entry = _run_state_kernel if schedule == "run_state" else _kernel(p_in_registers)
    return plgpu.kernel(
        entry, out_type=jax.ShapeDtypeStruct((M, M), jnp.float32),
        scratch_types=[plgpu.SMEM((N + 1, M, M), jnp.bfloat16, transforms=SW16),
                       plgpu.SMEM((M, M), jnp.bfloat16, transforms=SW16),
                       plgpu.Barrier(num_barriers=2)],
        interpret=plgpu.InterpretGPUParams() if interpret else None)


def _inputs():
    a = jax.random.normal(jax.random.PRNGKey(0), (N + 1, M, M), jnp.float32) * 0.1
    b = jax.random.normal(jax.random.PRNGKey(1), (M, M), jnp.float32) * 0.1
    return a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)


def _reference(a, b, schedule):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    pv = lambda t: (a[t] @ b.T).astype(jnp.bfloat16).astype(jnp.float32) @ b  # noqa: E731
    o = jnp.zeros((M, M), jnp.float32)
    for t in range(N):
        o = (o + pv(t)) * 0.5 if schedule == "run_state" else o * 0.5 + pv(t)
    return o


SCHEDULES = [("assign", True), ("assign", False), ("run_state", True)]
IDS = ["assign-p_registers", "assign-p_smem", "run_state"]


@pytest.mark.parametrize("schedule,p_in_registers", SCHEDULES, ids=IDS)
def test_carried_accumulators_lower(schedule, p_in_registers):
    text = jax.jit(_call(p_in_registers, schedule=schedule)).trace(*_inputs()).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_pinned_limit_interpret_mode_assigns_no_accumulator():
    """jax 0.11.2's GPU interpret mode cannot assign a wgmma accumulator, so the pipelined loop
    has no CPU numerics test. When an upgrade lifts this, this fails: add one."""
    with pytest.raises(ValueError, match="Accumulator shape"):
        jax.block_until_ready(_call(False, interpret=True)(*_inputs()))


@pytest.mark.gpu
@pytest.mark.parametrize("schedule,p_in_registers", SCHEDULES, ids=IDS)
def test_gpu_carried_accumulators(schedule, p_in_registers):
    a, b = _inputs()
    out = _call(p_in_registers, schedule=schedule)(a, b)
    ref = _reference(a, b, schedule)
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 1e-2
