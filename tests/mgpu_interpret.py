"""Mosaic GPU kernels' interpret-mode tests on CPU, shared by test_flash_prefill.py and
test_decode_mgpu.py.

Interpret mode needs a bigger XLA CPU thread pool than the suite's process has, so each test
file runs its cases in ONE subprocess (the file itself, run as a script with
`--interpret-worker`) that prints one JSON line {case name: [rel err, max |padding|, nan], ...,
"races": [..., races found]}; the tests then read their case's entry. `paged_case` builds the
random ragged batches over shuffled pages that both kernels' tests use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(cases, run_case, race_cases) -> None:
    """The subprocess side: every case in interpret mode, each of `race_cases` (a case or a
    list) once more under the happens-before race detector (vector clocks over barriers / TMA
    / SMEM accesses); "races" holds the worst error and padding, any NaN, any race."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc

    res = {}
    for case in cases:
        try:
            res[case[0]] = list(run_case(case, interpret=True))
        except Exception as e:  # noqa: BLE001  (reported per case)
            res[case[0]] = f"{type(e).__name__}: {e}"[:2000]
    try:
        worst = [0.0, 0.0, False, False]
        for case in race_cases if isinstance(race_cases, list) else [race_cases]:
            err, pad, nan = run_case(case, interpret=plgpu.InterpretGPUParams(detect_races=True))
            races = bool(ipc.get_races().races_found)
            worst = [max(worst[0], err), max(worst[1], pad), worst[2] or nan, worst[3] or races]
        res["races"] = worst
    except Exception as e:  # noqa: BLE001
        res["races"] = f"{type(e).__name__}: {e}"[:2000]
    print("RESULTS " + json.dumps(res), flush=True)


def results(test_file: str) -> dict:
    """The pytest side: run `test_file --interpret-worker` and parse its RESULTS line."""
    env = dict(os.environ, NPROC="16", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.abspath(test_file), "--interpret-worker"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULTS "):
            return json.loads(line[len("RESULTS "):])
    raise AssertionError(f"interpret worker failed (rc={proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def make_tests(test_file: str, cases, tol: float):
    """(interpret_results fixture, test_interpret_vs_reference, test_interpret_no_races) for a
    test module to bind at module level (pytest collects them there)."""
    on_gpu = pytest.mark.skipif(jax.default_backend() == "gpu",
                                reason="interpret cases are CPU-only")

    @pytest.fixture(scope="module")
    def interpret_results():
        return results(test_file)

    @on_gpu
    @pytest.mark.parametrize("case", cases, ids=[c[0] for c in cases])
    def test_interpret_vs_reference(case, interpret_results):
        check_case(interpret_results[case[0]], tol)

    @on_gpu
    def test_interpret_no_races(interpret_results):
        check_no_races(interpret_results["races"], tol)

    return interpret_results, test_interpret_vs_reference, test_interpret_no_races


def check_case(r, tol: float) -> None:
    assert not isinstance(r, str), r
    err, pad_max, has_nan = r
    assert not has_nan
    assert pad_max == 0.0
    assert err < tol, err


def check_no_races(r, tol: float) -> None:
    assert not isinstance(r, str), r
    err, pad_max, has_nan, races = r
    assert err < tol and not has_nan and pad_max == 0.0
    assert not races


def paged_case(seed, qlens, seq_lens, H, KVH, D, page, T_pad=0, S_pad=0, dtype=jnp.bfloat16):
    """(q [T, H, D], k_pages, v_pages, page_table, seq_lens, query_start): random values (never
    zeros), each sequence's pages a random subset of the pool, `S_pad` empty padding sequences
    and `T_pad` padding tokens after the last one."""
    rng = np.random.default_rng(seed)
    qlens = list(qlens) + [0] * S_pad
    seq_lens = list(seq_lens) + [0] * S_pad
    S = len(qlens)
    max_pages = max(1, max(-(-L // page) for L in seq_lens))
    P = S * max_pages + 2
    perm = rng.permutation(np.arange(1, P))[: S * max_pages].reshape(S, max_pages).astype(np.int32)
    for s, L in enumerate(seq_lens):     # padding entries point at page 0
        perm[s, -(-L // page):] = 0
    qs = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    T = int(qs[-1]) + T_pad
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    kp = rng.standard_normal((P, page, KVH, D)).astype(np.float32)
    vp = rng.standard_normal((P, page, KVH, D)).astype(np.float32)
    return (jnp.asarray(q, dtype), jnp.asarray(kp, dtype), jnp.asarray(vp, dtype),
            jnp.asarray(perm), jnp.asarray(np.array(seq_lens, np.int32)), jnp.asarray(qs))


def rel(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def paged_shapes(T, H, KVH, D, S, max_pages, page, dtype=jnp.bfloat16):
    """ShapeDtypeStructs of (q, k_pages, v_pages, page_table, seq_lens, query_start) for
    lowering a paged-attention kernel without data (pool: S * max_pages pages + page 0)."""
    pool = jax.ShapeDtypeStruct((S * max_pages + 1, page, KVH, D), dtype)
    return (jax.ShapeDtypeStruct((T, H, D), dtype), pool, pool,
            jax.ShapeDtypeStruct((S, max_pages), jnp.int32),
            jax.ShapeDtypeStruct((S,), jnp.int32), jax.ShapeDtypeStruct((S + 1,), jnp.int32))

