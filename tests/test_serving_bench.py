"""`imp-jax bench serve`: the metrics arithmetic on synthetic streams, and one end-to-end run on
CPU (the real server as a subprocess serving the tiny llama3 checkpoint, two load levels)."""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from imp_jax.server.bench import make_levels, request_metrics, summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "tests", "data", "tiny", "llama3")


def test_itl_is_per_token_when_chunks_carry_several_tokens():
    t0 = 100.0
    # first token at +0.1 s, then two chunks of 4 tokens 0.2 s apart (a 4-step decode block)
    m = request_metrics(t0, [(t0 + 0.1, 1), (t0 + 0.3, 4), (t0 + 0.5, 4)], t0 + 0.5)
    assert m["output_tokens"] == 9
    assert m["ttft"] == pytest.approx(0.1)
    assert m["e2e"] == pytest.approx(0.5)
    assert m["chunk_gaps"] == pytest.approx([0.2, 0.2])
    assert m["itl"] == pytest.approx([0.05] * 8)  # one sample per token after the first chunk
    assert m["tpot"] == pytest.approx(0.4 / 8)
    assert m["chunk_tokens"] == [1, 4, 4]
    # a first chunk of several tokens: its tokens have no gap to measure
    m = request_metrics(t0, [(t0 + 0.1, 3), (t0 + 0.2, 1)], t0 + 0.2)
    assert m["itl"] == pytest.approx([0.1]) and m["tpot"] == pytest.approx(0.1 / 3)
    # nothing streamed
    m = request_metrics(t0, [], t0 + 1)
    assert m["output_tokens"] == 0 and m["ttft"] is None and m["itl"] == []


def _rec(n, ttft, gap, usage=None, error=None):
    chunks = [(ttft, 1)] + [(ttft + gap * i, 1) for i in range(1, n)]
    usage = n if usage is None else (None if usage is False else usage)
    r = {"error": error, "usage_tokens": usage, "prompt_tokens": 16,
         "finish_reason": "length", "in_flight": 1}
    r.update(request_metrics(0.0, chunks if error is None else [], ttft + gap * n))
    return r


def test_summarize_counts_failures_and_token_mismatches():
    recs = [_rec(8, 0.01 * (i + 1), 0.002) for i in range(10)]
    recs.append(_rec(7, 0.05, 0.002))  # one token short
    recs.append(_rec(8, 0.05, 0.002, usage=9))  # usage disagrees with the stream
    recs.append(_rec(8, 0.05, 0.002, usage=False))  # no usage at the end of the stream
    recs.append(_rec(0, 0.0, 0.0, error="RuntimeError: HTTP 503"))
    m = summarize(recs, duration=2.0, expected_output=8)
    assert (m["completed"], m["failed"], m["token_mismatches"]) == (13, 1, 3)
    assert m["errors"] == ["RuntimeError: HTTP 503"]
    assert m["total_output_tokens"] == 8 * 12 + 7
    assert m["output_throughput"] == pytest.approx(m["total_output_tokens"] / 2.0)
    assert m["request_throughput"] == pytest.approx(6.5)
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "chunk_gap_ms", "e2e_s"):
        d = m[key]
        assert d["min"] <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"], key
    assert m["itl_ms"]["p50"] == pytest.approx(2.0)
    assert m["tokens_per_chunk"] == 1.0


def test_levels_cross_rates_with_concurrency():
    lv = make_levels("2,inf", "1,8", "10,20")
    assert [(x["max_concurrency"], x["request_rate"], x["num_prompts"]) for x in lv] == [
        (1, 2.0, 10), (1, math.inf, 10), (8, 2.0, 20), (8, math.inf, 20)]
    assert [x["num_prompts"] for x in make_levels("1,2,inf", "4", "5,6,7")] == [5, 6, 7]
    assert make_levels("inf", None, "3") == [
        {"request_rate": math.inf, "max_concurrency": None, "num_prompts": 3}]
    for bad in (("0", None, "1"), ("inf", "0", "1"), ("inf", "1,2,3", "1,2")):
        with pytest.raises(ValueError):
            make_levels(*bad)


def test_bad_server_option_fails_before_starting_anything():
    from imp_jax.cli import main

    start = time.monotonic()
    with pytest.raises(SystemExit) as e:  # rejected by `imp-jax serve`'s own parser
        main(["bench", "serve", "--model", MODEL_DIR, "--no-such-option", "1"])
    assert e.value.code == 2
    assert time.monotonic() - start < 10


def test_bench_serve_end_to_end_on_cpu(tmp_path, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    from imp_jax.cli import main

    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--model", MODEL_DIR, "--input-len", "16", "--output-len", "12",
               "--max-concurrency", "1,4", "--request-rate", "200", "--num-prompts", "3,8",
               "--decode-steps", "4", "--ready-timeout", "300",
               # these go to `imp-jax serve`: small fixed shapes keep CPU compiles few
               "--max-num-seqs", "4", "--max-num-batched-tokens", "16",
               "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "TTFT ms" in table and table.count("\n| 200 |") == 2
    res = json.loads(out.read_text())
    assert res["server_exit_code"] == 0  # drained and exited cleanly on SIGTERM
    assert isinstance(res["compiles_after_warmup"], int)  # the server process reported it
    assert res["server_ready_s"] > 0 and res["warmup"]["failed"] == 0
    assert "--max-model-len" in res["server_argv"]  # defaulted to input + output + 16
    assert [(lv["max_concurrency"], lv["request_rate"], lv["num_prompts"])
            for lv in res["levels"]] == [(1, 200.0, 3), (4, 200.0, 8)]
    for lv in res["levels"]:
        m = lv["metrics"]
        n = lv["num_prompts"]
        assert (m["completed"], m["failed"], m["token_mismatches"]) == (n, 0, 0), m
        assert m["total_output_tokens"] == 12 * n
        assert m["total_input_tokens"] == 16 * n  # the server's usage: token-id prompts as sent
        assert 1 <= m["max_in_flight"] <= lv["max_concurrency"]
        assert m["duration_s"] > 0 and m["request_throughput"] > 0
        assert m["output_throughput"] > 0
        for key in ("ttft_ms", "itl_ms", "tpot_ms", "chunk_gap_ms", "e2e_s"):
            d = m[key]
            assert d["mean"] > 0 and d["p50"] > 0, key
            assert d["min"] <= d["p50"] <= d["p99"] <= d["max"], key
        assert m["ttft_ms"]["p50"] < m["e2e_s"]["p50"] * 1e3
        # decode_steps=4 reached the server: 4-token decode blocks arrive as one chunk
        assert m["tokens_per_chunk_max"] >= 4
        assert m["tokens_per_chunk"] > 1
