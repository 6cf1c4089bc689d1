"""`imp-jax bench` end to end on a tiny random model (CPU): every figure present and sane."""

import gc
import json

import pytest

from imp_jax import bench
from imp_jax.bench import main


def _rows(tmp_path, argv):
    out = tmp_path / "bench.json"
    assert main(argv + ["--model", "random:tiny", "--json", str(out), "--no-progress"]) == 0
    # the timed pass ran with the start-up heap frozen; the caller gets its collector back
    assert gc.get_freeze_count() == 0
    return json.loads(out.read_text())["rows"]


def test_warmup_freezes_the_start_up_heap(monkeypatch):
    frozen = []
    monkeypatch.setattr(bench, "freeze_gc", lambda: frozen.append(True))
    bench.main(["latency", "--model", "random:tiny", "--batch", "1", "--input-len", "8",
                "--output-len", "3", "--no-progress"])
    assert frozen, "bench's warm-up did not freeze the heap"


def test_latency_rows(tmp_path):
    rows = _rows(tmp_path, ["latency", "--batch", "1,4", "--input-len", "16",
                            "--output-len", "9", "--decode-steps", "4"])
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        assert r["ttft_ms"] > 0 and r["itl_ms"] > 0 and r["decode_tok_s"] > 0
        assert 0 < r["fraction_of_ceiling"] and r["ceiling_tb_s"] > 0
        assert r["host_ms_per_step"] >= 0


def test_latency_when_the_batch_prefills_over_several_steps(tmp_path):
    # 4 prompts of 60 tokens through a 64-token budget, 3 tokens each: the first request is
    # done before the last has its first token, so no step returns every request's
    # first token (which once left the decode time at zero)
    rows = _rows(tmp_path, ["latency", "--batch", "4", "--input-len", "60", "--output-len", "3",
                            "--max-num-batched-tokens", "64", "--decode-steps", "4"])
    assert rows[0]["ttft_ms"] > 0 and rows[0]["itl_ms"] > 0 and rows[0]["decode_tok_s"] > 0


def test_throughput_runs_each_length_pair_once(tmp_path):
    rows = _rows(tmp_path, ["throughput", "--num-prompts", "12", "--input-len", "8,20",
                            "--output-len", "12,5", "--max-num-seqs", "4",
                            "--max-num-batched-tokens", "64", "--decode-steps", "4"])
    assert [(r["input_len"], r["output_len"]) for r in rows] == [(8, 12), (20, 5)]
    for r in rows:
        assert r["num_prompts"] == 12 and r["output_tok_s"] > 0
        assert r["total_tok_s"] > r["output_tok_s"]
        assert r["compiles"] == 0  # warm-up compiled every program the timed pass ran
    assert rows[0]["blocks_ahead"] > 0  # 12 tokens at 4 per block: decode blocks ran ahead
    # the warm-up's figures travel with each row: its programs (0 where an earlier test in this
    # process traced them), seconds, and the compilation cache it started from (tests run with
    # the persistent cache on, conftest.py)
    assert all(r["warmup_programs"] >= 0 and r["warmup_s"] > 0 for r in rows)
    assert isinstance(rows[0]["cache_files_before_warmup"], int)
    assert all(r["page_size"] == 16 and r["kv_dtype"] == "float32" for r in rows)  # KV layout
    assert "decode_block" in rows[0]["step_kinds"]
    for r in rows:  # 12 prompts through 4 rows: prompt steps ran, each kind timed
        kinds = r["step_kinds"]
        assert "prompt" in kinds and set(kinds) <= {"prompt", "mixed", "decode", "decode_block"}
        assert all(k["calls"] > 0 and k["seconds"] > 0 for k in kinds.values())
        # each figure is rounded to the microsecond, hence the 2 us of slack
        assert all(0 < k["host_s"] + k["dispatch_s"] <= k["seconds"] + 2e-6
                   for k in kinds.values())


def test_mismatched_length_lists_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit, match="same number of lengths"):
        _rows(tmp_path, ["throughput", "--input-len", "8,9,10", "--output-len", "4,5"])
    with pytest.raises(SystemExit, match="integers >= 1, got '1,x'"):
        _rows(tmp_path, ["latency", "--batch", "1,x"])
    with pytest.raises(SystemExit, match="integers >= 1, got '0'"):
        _rows(tmp_path, ["latency", "--input-len", "0"])
    for flags, says in ((["--random-range", "5"], "--random-range 5.0: allowed [0, 1)"),
                        (["--num-prompts", "0"], "'0': expected an integer >= 1"),
                        (["--json", str(tmp_path / "no" / "x.json")], "its folder does not")):
        with pytest.raises(SystemExit):  # before anything loads
            main(["throughput", "--model", "random:tiny", "--no-progress", *flags])
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--peer-modes 'hf-eager,hf-fast': allowed a comma list "
                                         "of hf-eager, hf-static-compile"):
        _rows(tmp_path, ["throughput", "--peer", "hf", "--peer-modes", "hf-eager,hf-fast"])


def test_compilation_cache_files_counts_the_cache(tmp_path, monkeypatch):
    import jax

    from imp_jax import llm

    class Config:  # stands in for jax.config: pointing the real one elsewhere mid-run would
        jax_compilation_cache_dir = None  # move the cache of every later test

    monkeypatch.setattr(llm, "jax", type("J", (), {"config": Config}))
    assert llm.compilation_cache_files() is None
    (tmp_path / "a").mkdir()
    for name in ("x", "a/y", "a/z"):
        (tmp_path / name).write_text("1")
    Config.jax_compilation_cache_dir = str(tmp_path)
    assert llm.compilation_cache_files() == 3
    assert jax.config.jax_compilation_cache_dir != str(tmp_path)  # the real one untouched
