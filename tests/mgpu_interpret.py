"""Mosaic GPU kernels' interpret-mode tests on CPU, shared by test_flash_prefill.py and
test_decode_mgpu.py.

Interpret mode needs a bigger XLA CPU thread pool than the suite's process has, so each test
file runs its cases in ONE subprocess (the file itself, run as a script with
`--interpret-worker`) that prints one JSON line {case name: [rel err, max |padding|, nan], ...,
"races": [..., races found]}; the tests then read their case's entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(cases, run_case, race_case) -> None:
    """The subprocess side: every case in interpret mode, `race_case` once more under the
    happens-before race detector (vector clocks over barriers / TMA / SMEM accesses)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc

    res = {}
    for case in cases:
        try:
            res[case[0]] = list(run_case(case, interpret=True))
        except Exception as e:  # noqa: BLE001  (reported per case)
            res[case[0]] = f"{type(e).__name__}: {e}"[:2000]
    try:
        r = run_case(race_case, interpret=plgpu.InterpretGPUParams(detect_races=True))
        res["races"] = [*r, bool(ipc.get_races().races_found)]
    except Exception as e:  # noqa: BLE001
        res["races"] = f"{type(e).__name__}: {e}"[:2000]
    print("RESULTS " + json.dumps(res), flush=True)


def results(test_file: str) -> dict:
    """The pytest side: run `test_file --interpret-worker` and parse its RESULTS line."""
    env = dict(os.environ, NPROC="16", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.abspath(test_file), "--interpret-worker"],
                          env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULTS "):
            return json.loads(line[len("RESULTS "):])
    raise AssertionError(f"interpret worker failed (rc={proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


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
