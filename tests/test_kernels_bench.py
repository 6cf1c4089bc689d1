"""benchmarks/kernels.py, the decode-attention benchmark, in its CPU smoke mode (Pallas interpret
mode): the options that pick Mosaic GPU configs (--mgpu-configs), time them in interleaved
rounds (--rounds) and set the calls per timed run (--calls)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "kernels.py")


def run(*args, out=None):
    cmd = [sys.executable, SCRIPT, "--smoke", "--kv", "bf16", "--mgpu-only", *args]
    if out is not None:
        cmd += ["--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_given_configs_in_rounds(tmp_path):
    p = run("--shapes", "2x128", "--rounds", "2", "--calls", "3", "--mgpu-configs",
            '[{"num_splits": 1}, {"num_splits": 2}]', out=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (row,) = json.loads((tmp_path / "kernels_bench.json").read_text())["rows"]
    assert row["n_calls"] == 3
    recs = row["mgpu_all"]
    assert ["num_splits=1" in r["cfg"] for r in recs] == [True, False]
    assert "num_splits=2" in recs[1]["cfg"]
    for r in recs:                    # each figure is the median of its two rounds
        assert len(r["rounds_us"]) == 2 and min(r["rounds_us"]) <= r["us"] <= max(r["rounds_us"])
        assert r["rel_err"] < 2e-2
    assert row["mgpu_us"] == min(r["us"] for r in recs)


@pytest.mark.parametrize("args,msg", [
    (["--mgpu-configs", '[{"block": 64}]'], "unknown keys ['block']"),
    (["--mgpu-configs", "{}"], "expected a JSON list of objects"),
    (["--mgpu-configs", "[{"], "not JSON"),
    (["--calls", "0"], "--calls 0: must be >= 1")])
def test_bad_options_are_named(args, msg, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("kernels_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--smoke", *args])
    with pytest.raises(SystemExit):
        mod.main()
    assert msg in capsys.readouterr().err
