"""benchmarks/scaling.py: the multi-GPU scaling runner, end to end on 8 fake CPU devices.

The script never imports jax itself (every part is a subprocess), so these tests run it as a
subprocess too: the all-reduce sweep and one tensor-parallel (tp=2) latency run of the tiny
llama3 checkpoint, then the table it writes. The rest (table arithmetic, dry-run commands,
budget skips, the NCCL_NVLS_ENABLE guard) needs no device and runs in milliseconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "scaling.py")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CUDA_VISIBLE_DEVICES")}
    env.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
                "NCCL_NVLS_ENABLE": "0", **extra})
    return env


def _run(args, timeout=120, **extra):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=_env(**extra),
                          capture_output=True, text=True, timeout=timeout)


def _load():
    spec = importlib.util.spec_from_file_location("scaling_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_allreduce_and_tp2_latency_end_to_end(tmp_path):
    out = tmp_path / "out"
    p = _run(["--preset", "cpu", "--only", "allreduce|tiny-lat-tp2", "--ar-max-mib", "2",
              "--out", str(out), "--budget-s", "110"], timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # the exact commands are printed, with the device count each subprocess sees
    assert re.search(r"XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu "
                     r"\S+ \S+scaling.py allreduce", p.stdout), p.stdout[-2000:]
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in p.stdout
    assert "-m imp_jax.cli bench latency --model tests/data/tiny/llama3 --mesh tp=2" in p.stdout

    res = json.loads((out / "results.json").read_text())
    ar = res["allreduce"]
    assert ar["info"]["devices"] == 8 and ar["info"]["nccl_nvls_enable"] == "0"
    assert [r["bytes"] for r in ar["sweep"]] == [1 << 20, 2 << 20]
    for r in ar["sweep"] + ar["decode"]:
        assert "error" not in r, r
        assert r["time_us"] > 0 and r["busbw_gb_s"] > 0, r
        assert r["hlo_all_reduces"] >= 1 and "SUSPECT" not in r["note"], r
        assert r["busbw_gb_s"] == pytest.approx(
            r["algbw_gb_s"] * 2 * (r["devices"] - 1) / r["devices"])
    # decode sizes for the tp=2 group and all 8 devices, the tiny model's hidden size included
    assert {(r["devices"], r["hidden"], r["rows"]) for r in ar["decode"]} >= {
        (2, 64, 4), (8, 4096, 1), (2, 8192, 64)}

    (cfg,) = res["configs"]
    assert cfg["name"] == "tiny-lat-tp2" and cfg["rc"] == 0 and cfg["mesh"] == "tp=2"
    (bench,) = cfg["rows"]
    assert bench["mode"] == "latency" and bench["batch"] == 1 and bench["itl_ms"] > 0
    (row,) = res["table"]
    assert row["gpus"] == 2 and row["tok_s"] == pytest.approx(bench["decode_tok_s"])
    assert row["speedup"] is None  # no one-device run of the same benchmark in this run
    assert 0 < row["floor_ms"] and 0 < row["frac_floor"] < 1
    assert row["ar_ms_est"] > 0  # (2 * 2 layers + 1) all-reduces of [4, 64]
    md = (out / "scaling.md").read_text()
    assert "## All-reduce" in md and "| tiny-lat-tp2 | tp=2 | 2 | latency | 1 |" in md
    assert (out / "bench_tiny-lat-tp2.log").exists() and (out / "allreduce.log").exists()


@pytest.mark.slow
def test_tp_check_against_one_device(tmp_path):
    """`--only check`: the tiny llama3 in bf16 through the engine at tp=2 and tp=4, each with
    exactly its devices visible, against the one-device run's logits, tokens and logprobs."""
    p = _run(["--preset", "cpu", "--only", "check", "--out", str(tmp_path), "--budget-s", "100"],
             timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=4" in p.stdout
    assert "scaling.py check --model tests/data/tiny/llama3 --mesh tp=4" in p.stdout
    res = json.loads((tmp_path / "check.json").read_text())
    ref, *checks = res["checks"]
    assert res["passed"] and ref["reference"] and ref["devices"] == 1 and ref["mesh"] is None
    assert [(c["mesh"], c["devices"]) for c in checks] == [("tp=2", 2), ("tp=4", 4)]
    for c in checks:
        assert c["dtype"] == "bfloat16" and c["passed"] and c["first_tokens_equal"], c
        # bf16: the all-reduce order rounds (not bit-equal), within the tolerance
        assert 0 < c["logits_rel_err"] <= c["tol"] == 2e-2, c
        assert c["decode_logprobs"] > 0 and c["decode_rel_err"] <= c["tol"], c
        # parted (if at all) only where the one-device run's own margin was within 2 tol
        assert c["prefill_argmax_equal"] > 0.9 and (c["divergence_margin"] or 0) <= 2 * c["tol"], c
        assert len(c["first_divergence"]) == len(c["tokens"]) == 3
        assert all(len(t) == 16 for t in c["tokens"])
    md = (tmp_path / "scaling.md").read_text()
    assert re.search(r"\| check-tiny-tp4 \| tp=4 \| \S+ \(tol 0.02\) \|.*\| PASS \|", md), md
    assert (tmp_path / "check-tiny-tp2.log").exists()
    # the reference logits stay out of --out, in a temporary folder removed at the end
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    ref_npz = meta["commands"][0].split("--save ")[1].split()[0]
    assert ref_npz.endswith("check-tiny_ref.npz") and not os.path.exists(ref_npz)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".npz")]


def test_check_compare_fails_on_errors():
    """The verdict of `scaling.py check` (numpy only): within tolerance passes; a logit error,
    a different first token or a decode logprob off by more than tol fails."""
    import numpy as np

    s = _load()
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(n, 50)).astype(np.float32) for n in (3, 7)]
    tokens = [[1, 2, 3], [4, 5, 6]]
    # step 2 of prompt 0: token 3 (the reference's) and 7 nearly tied
    lps = [[{"1": -1.0}, {"2": -2.0, "9": -3.0}, {"3": -1.0, "7": -1.01}],
           [{"4": -1.0}, {"5": -1.0}, {"6": -1.0}]]
    ref = dict(logits=logits, tokens=tokens, logprobs=lps)
    ok = s.compare(ref, [x * 1.001 for x in logits], [[1, 2, 7], [4, 5, 6]], lps, 2e-2)
    assert ok["passed"] and ok["first_divergence"] == [2, None] and ok["token_match"] == 5 / 6
    scale = max(float(np.abs(x).max()) for x in logits[:1])
    assert ok["divergence_margin"] == pytest.approx(0.01 / scale)
    # parting where the reference was sure (a margin of 1.0), or on a token outside its top-N
    for step in ({"3": -1.0, "7": -2.0}, {"3": -1.0, "8": -1.01}):
        sure = [lps[0][:2] + [step], lps[1]]
        res = s.compare(dict(ref, logprobs=sure), logits, [[1, 2, 7], [4, 5, 6]], sure, 2e-2)
        assert not res["passed"] and res["divergence_margin"] > 2 * 2e-2
    # steps 1 and 2 of prompt 0 (2 + 2 ids: step 2, where it diverges, still has the same
    # context) and steps 1 and 2 of prompt 1
    assert 0 < ok["logits_rel_err"] < 2e-3 and ok["decode_logprobs"] == 6
    assert ok["decode_top_overlap"] == 1
    bad = [logits[0], logits[1] + 0.1 * np.abs(logits[1]).max()]
    assert not s.compare(ref, bad, tokens, lps, 2e-2)["passed"]
    first = s.compare(ref, logits, [[1, 2, 3], [8, 5, 6]], lps, 2e-2)
    assert not first["passed"] and not first["first_tokens_equal"]
    off = [lps[0], [{"4": -1.0}, {"5": -1.5}, {"6": -1.0}]]
    assert not s.compare(ref, logits, tokens, off, 2e-2)["passed"]
    # equal where they meet, but the top-N lists share only the sampled token: vacuous, fails
    thin = [[{"1": -1.0}, {"2": -2.0, "8": -3.0, "7": -4.0}, {"3": -1.0}], lps[1]]
    res = s.compare(ref, logits, tokens, thin, 2e-2)
    assert not res["passed"] and res["decode_rel_err"] == 0 and res["decode_top_overlap"] < 1


def test_check_without_reference_fails(tmp_path):
    """A tp check whose one-device reference did not run is skipped, and the call exits 1."""
    p = _run(["--preset", "cpu", "--only", "check-tiny-tp2", "--out", str(tmp_path)], timeout=60)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "no reference" in p.stdout and "check: not passed: check-tiny-tp2" in p.stdout


def test_table_speedup_and_floor():
    s = _load()
    bench = lambda tok, itl, bw: dict(mode="latency", batch=1, input_len=128,  # noqa: E731
                                      output_len=64, decode_tok_s=tok, itl_ms=itl,
                                      bandwidth_tb_s=bw, ceiling_tb_s=3.0, device="H100")
    dims = dict(layers=32, hidden=4096)
    results = [dict(name="a", model="m", mesh=None, tp=1, dp=1, devices=1, dims=dims,
                    rows=[bench(100.0, 10.0, 1.5)]),  # 15 GB a step
               dict(name="b", model="m", mesh="tp=4", tp=4, dp=1, devices=4, dims=dims,
                    rows=[bench(300.0, 10 / 3, 4.5)]),
               dict(name="c", model="m", mesh="tp=2", tp=2, dp=1, devices=2, dims=dims,
                    rows=[], error="exit 1")]
    ar = dict(decode=[dict(devices=4, rows=4, hidden=4096, bytes=4 * 4096 * 2, time_us=10.0)])
    a, b = s.scaling_rows(results, ar)
    assert a["speedup"] == 1 and a["efficiency"] == 1 and a["ar_ms_est"] is None
    assert a["floor_ms"] == pytest.approx(5.0) and a["frac_floor"] == pytest.approx(0.5)
    assert b["speedup"] == pytest.approx(3) and b["efficiency"] == pytest.approx(0.75)
    assert b["floor_ms"] == pytest.approx(1.25)  # 15 GB / (4 x 3 TB/s)
    assert b["ar_ms_est"] == pytest.approx(65 * 10e-3)  # 2 x 32 + 1 all-reduces of 10 us
    assert b["frac_floor_ar"] == pytest.approx((1.25 + 0.65) / (10 / 3))
    md = s.markdown([a, b], ar, dict(preset="x", platform="gpu", devices=4, date="d",
                                     skipped=["z: budget"], failed=["c: exit 1"],
                                     commands=["cmd"]))
    assert "| b | tp=4 | 4 | latency | 1 | 300.0 | 3.00 | 0.75 |" in md
    assert "* z: budget" in md and "* c: exit 1" in md


def test_merge_joins_two_runs(tmp_path):
    def bench(tok):
        return dict(mode="throughput", num_prompts=256, input_len=128, output_len=128,
                    output_tok_s=tok, device="H100")

    def write(d, preset, configs, ar=None):
        d.mkdir()
        meta = dict(preset=preset, platform="gpu", devices=4, date="d", commands=[preset],
                    skipped=[], failed=[])
        (d / "results.json").write_text(json.dumps(dict(meta=meta, allreduce=ar,
                                                        configs=configs)))

    cfg = lambda name, tp, tok: dict(name=name, model="m", mesh=f"tp={tp}" if tp > 1  # noqa
                                     else None, tp=tp, dp=1, devices=tp, rows=[bench(tok)])
    write(tmp_path / "a", "h100x4", [cfg("thr-tp1", 1, 1000.0)], ar=dict(sweep=[], decode=[]))
    write(tmp_path / "b", "h100x4-more", [cfg("thr-tp2", 2, 1500.0)])
    p = subprocess.run([sys.executable, SCRIPT, "merge", str(tmp_path / "a"),
                        str(tmp_path / "b" / "results.json"), "--out", str(tmp_path / "m")],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "m" / "results.json").read_text())
    assert res["meta"]["preset"] == "h100x4 + h100x4-more"
    assert [(r["config"], r["speedup"]) for r in res["table"]] == [("thr-tp1", 1.0),
                                                                   ("thr-tp2", 1.5)]


def test_dry_run_check_commands():
    p = _run(["--preset", "h200x4-check", "--platform", "gpu", "--dry-run"], timeout=60)
    assert p.returncode == 0, p.stderr
    cmds = [line[2:] for line in p.stdout.splitlines() if line.startswith("$ ")]
    assert len(cmds) == 3 and all("scaling.py check --model random:llama3-8b" in c
                                  for c in cmds)
    assert "CUDA_VISIBLE_DEVICES=0 " in cmds[0] and "--save TMP/check-8b_ref.npz" in cmds[0]
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3 " in cmds[2] and "--mesh tp=4 " in cmds[2]
    assert "--ref TMP/check-8b_ref.npz" in cmds[2]


def test_dry_run_gpu_commands():
    p = _run(["--preset", "h100x4", "--platform", "gpu", "--dry-run"], timeout=60)
    assert p.returncode == 0, p.stderr
    cmds = [line[2:] for line in p.stdout.splitlines() if line.startswith("$ ")]
    assert "allreduce" in cmds[0] and "CUDA_VISIBLE_DEVICES" not in cmds[0]
    assert "--groups 2,4" in cmds[0]
    lat = {c.split("--json ")[1]: c for c in cmds[1:]}
    assert "CUDA_VISIBLE_DEVICES=0 " in lat["OUT/bench_8b-lat-tp1.json"]
    assert "--mesh" not in lat["OUT/bench_8b-lat-tp1.json"]
    assert "CUDA_VISIBLE_DEVICES=0,1 " in lat["OUT/bench_8b-lat-tp2.json"]
    assert "--mesh tp=2 " in lat["OUT/bench_8b-lat-tp2.json"]
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3 " in lat["OUT/bench_70b-lat-tp4.json"]
    assert all(c.startswith("NCCL_NVLS_ENABLE=0 ") for c in cmds)


def test_budget_skips_and_says_so(tmp_path):
    p = _run(["--preset", "cpu", "--skip-allreduce", "--only", "tiny-lat", "--budget-s", "1",
              "--out", str(tmp_path)], timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("skipped: ") >= 3
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert [s.split(":")[0] for s in meta["skipped"]] == ["tiny-lat-tp1", "tiny-lat-tp2",
                                                          "tiny-lat-tp4"]


def test_nvls_must_stay_off():
    p = _run(["--dry-run"], timeout=60, NCCL_NVLS_ENABLE="1")
    assert p.returncode != 0 and "NCCL_NVLS_ENABLE" in p.stderr
