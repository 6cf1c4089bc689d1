"""`imp-jax batch`: OpenAI batch files through one engine, per-line errors, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import imp_jax
from imp_jax.batch import run_batch
from imp_jax.sampling import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "data", "tiny", "llama3")
SHAPE = dict(max_model_len=128, num_pages=128, page_size=4)


@pytest.fixture(scope="module")
def llm():
    return imp_jax.LLM(TINY, **SHAPE)


def _line(cid, url, body, **extra):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body, **extra})


def _cmpl(cid, prompt, **body):
    return _line(cid, "/v1/completions", {"model": "tiny", "prompt": prompt, **body})


def _chat(cid, messages, **body):
    return _line(cid, "/v1/chat/completions", {"model": "tiny", "messages": messages, **body})


def _write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _read(path):
    with open(path) as f:
        raw = f.read()
    assert raw.endswith("\n")
    return [json.loads(x) for x in raw.splitlines()]


def _by_id(records):
    return {r["custom_id"]: r for r in records}


def test_completions_and_chat_match_generate(llm, tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    lines = [
        _cmpl("c0", "hello world", max_tokens=5, temperature=0, return_token_ids=True),
        _cmpl("c1", [5, 6, 7, 8, 9], max_tokens=3, temperature=0, return_token_ids=True,
              repetition_penalty=1.3, presence_penalty=0.5),
        _cmpl("c2", "the quick brown fox", max_tokens=6, temperature=0, stop=["o"]),
        _chat("h0", msgs, max_completion_tokens=4, temperature=0, return_token_ids=True),
        _chat("h1", [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "text", "text": "b"}]}],
              max_tokens=5, temperature=0, frequency_penalty=1.0),
        _cmpl("c3", ["one", [10, 11]], max_tokens=2, temperature=0),  # two prompts, one line
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, lines)
    counts = run_batch(llm, str(inp), str(out), progress=False)
    assert counts == {"total": 6, "skipped": 0, "completed": 6, "failed": 0, "written": 6}

    g = dict(temperature=0)
    prompts = ["hello world", [5, 6, 7, 8, 9], "the quick brown fox",
               llm.chat_prompt(msgs), llm.chat_prompt([{"role": "user", "content": "a\nb"}]),
               "one", [10, 11]]
    params = [SamplingParams(max_tokens=5, **g),
              SamplingParams(max_tokens=3, repetition_penalty=1.3, presence_penalty=0.5, **g),
              SamplingParams(max_tokens=6, stop=["o"], **g),
              SamplingParams(max_tokens=4, **g),
              SamplingParams(max_tokens=5, frequency_penalty=1.0, **g),
              SamplingParams(max_tokens=2, **g), SamplingParams(max_tokens=2, **g)]
    ref = llm.generate(prompts, params, use_tqdm=False)

    recs = _read(out)
    assert len(recs) == 6
    got = _by_id(recs)
    for r in recs:
        assert r["error"] is None and r["id"].startswith("batch_req_")
        assert r["response"]["status_code"] == 200 and r["response"]["request_id"]
        body = r["response"]["body"]
        assert body["model"] == "tiny"
        u = body["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]

    for cid, i in (("c0", 0), ("c1", 1), ("c2", 2)):
        body = got[cid]["response"]["body"]
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        (ch,) = body["choices"]
        assert ch["text"] == ref[i].text
        assert ch["finish_reason"] == ref[i].finish_reason
        assert body["usage"] == {"prompt_tokens": len(ref[i].prompt_token_ids),
                                 "completion_tokens": len(ref[i].token_ids),
                                 "total_tokens": len(ref[i].prompt_token_ids)
                                 + len(ref[i].token_ids)}
    for cid, i in (("c0", 0), ("c1", 1)):
        ch = got[cid]["response"]["body"]["choices"][0]
        assert ch["token_ids"] == ref[i].token_ids
        assert ch["prompt_token_ids"] == ref[i].prompt_token_ids
    for cid, i in (("h0", 3), ("h1", 4)):
        body = got[cid]["response"]["body"]
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        (ch,) = body["choices"]
        assert ch["message"] == {"role": "assistant", "content": ref[i].text}
        assert ch["finish_reason"] == ref[i].finish_reason
        assert body["usage"]["prompt_tokens"] == len(prompts[i])
    assert got["h0"]["response"]["body"]["choices"][0]["token_ids"] == ref[3].token_ids
    assert got["h0"]["response"]["body"]["prompt_token_ids"] == prompts[3]
    choices = got["c3"]["response"]["body"]["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert [c["text"] for c in choices] == [ref[5].text, ref[6].text]


def test_errors_are_recorded_per_line(llm, tmp_path):
    ok = dict(max_tokens=2, temperature=0)
    lines = [
        _cmpl("ok1", "hello", **ok),
        '{"custom_id": "broken", "method": "POST", ',  # malformed JSON
        _line("emb", "/v1/embeddings", {"input": "x"}),  # unknown url
        _cmpl("temp", "hello", max_tokens=2, temperature=-1),  # SamplingParams ValueError
        _cmpl("topp", "hello", max_tokens=2, top_p=0),
        _cmpl("long", list(range(1, 127)), max_tokens=8),  # over the 128-token context
        _chat("nomsg", [], max_tokens=2),
        _cmpl("ok1", "again", **ok),  # duplicate custom_id
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}),
        _cmpl("vocab", [1, 99999], max_tokens=2),
        _chat("ok2", [{"role": "user", "content": "hi"}], **ok),
        # in range for the API, past int32 inside (it once crashed the job): served
        _cmpl("bigk", "hello", top_k=2**31, min_tokens=1, stop_token_ids=[2**40], **ok),
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, lines)
    counts = run_batch(llm, str(inp), str(out), progress=False)
    assert counts["total"] == 12 and counts["completed"] == 3 and counts["failed"] == 9
    recs = _read(out)
    assert len(recs) == 12
    for r in recs:
        assert set(r) == {"id", "custom_id", "response", "error"}
    ok_recs = [r for r in recs if r["error"] is None]
    assert sorted(r["custom_id"] for r in ok_recs) == ["bigk", "ok1", "ok2"]
    errs = {r["error"]["line"]: r for r in recs if r["error"] is not None}
    assert sorted(errs) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    for r in errs.values():
        assert set(r["error"]) >= {"code", "message"} and r["error"]["message"]

    assert errs[2]["custom_id"] is None and errs[2]["response"] is None
    assert errs[2]["error"]["code"] == "invalid_json"
    assert errs[3]["custom_id"] == "emb" and errs[3]["response"] is None
    assert errs[3]["error"]["code"] == "invalid_url"
    # bad params: the SamplingParams message, as a 400 response
    with pytest.raises(ValueError) as e:
        SamplingParams(temperature=-1)
    assert errs[4]["error"]["message"] == str(e.value)
    assert errs[4]["error"]["param"] == "temperature"
    assert errs[4]["response"]["status_code"] == 400
    assert errs[4]["response"]["body"]["error"]["message"] == str(e.value)
    assert "top_p" in errs[5]["error"]["message"]
    assert errs[6]["error"]["code"] == "context_length_exceeded"
    assert errs[6]["response"]["status_code"] == 400
    assert errs[7]["custom_id"] == "nomsg" and errs[7]["response"]["status_code"] == 400
    assert errs[8]["custom_id"] == "ok1" and errs[8]["error"]["code"] == "duplicate_custom_id"
    assert errs[9]["custom_id"] is None and errs[9]["error"]["code"] == "invalid_custom_id"
    assert "vocabulary" in errs[10]["error"]["message"]

    # nothing left to do on a rerun: no line is written twice
    again = run_batch(llm, str(inp), str(out), progress=False)
    assert again["skipped"] == 12 and again["written"] == 0
    assert len(_read(out)) == 12


def test_torn_last_line_is_dropped_and_redone(llm, tmp_path):
    lines = [_cmpl(f"r{i}", f"item {i}", max_tokens=2 + i % 3, temperature=0) for i in range(6)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, lines)
    run_batch(llm, str(inp), str(out), progress=False)
    full = _by_id(_read(out))
    # what an interrupted run leaves: some whole lines, then half of one
    with open(out) as f:
        raw = f.read().splitlines(keepends=True)
    with open(out, "w") as f:
        f.writelines(raw[:3])
        f.write(raw[3][:len(raw[3]) // 2])
    counts = run_batch(llm, str(inp), str(out), progress=False)
    assert counts["skipped"] == 3 and counts["completed"] == 3
    recs = _read(out)
    assert sorted(r["custom_id"] for r in recs) == [f"r{i}" for i in range(6)]
    for r in recs:
        assert (r["response"]["body"]["choices"][0]["text"]
                == full[r["custom_id"]]["response"]["body"]["choices"][0]["text"])


# The CLI with every engine step slowed down, so a kill lands half-way through the job.
_SLOW_CLI = (
    "import sys, time\n"
    "import imp_jax.engine.llm_engine as E\n"
    "step = E.LLMEngine.step\n"
    "def slow(self, *args, **kwargs):\n"
    "    time.sleep(0.05)\n"
    "    return step(self, *args, **kwargs)\n"
    "E.LLMEngine.step = slow\n"
    "import imp_jax.cli\n"
    "sys.exit(imp_jax.cli.main(sys.argv[1:]))\n"
)


def test_resume_after_sigkill(llm, tmp_path):
    n = 40
    lines = []
    for i in range(n):
        if i % 5 == 4:
            lines.append(_chat(f"q{i}", [{"role": "user", "content": f"question {i}"}],
                               max_tokens=1 + i % 7, temperature=0))
        else:
            lines.append(_cmpl(f"q{i}", f"prompt number {i}", max_tokens=1 + i % 7,
                               temperature=0))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, lines)
    args = ["batch", str(inp), "-o", str(out), "--model", TINY, "--max-model-len", "128",
            "--num-pages", "128", "--page-size", "4", "--max-num-seqs", "8", "--no-progress"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, *args], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 80
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 5:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    first = out.read_bytes()
    n_first = first.count(b"\n")
    assert 5 <= n_first < n

    # the resumed job admits with "reserve" (no preemption): the answers must not change
    done = subprocess.run([sys.executable, "-m", "imp_jax.cli", *args, "--kv-admission",
                           "reserve"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    final = out.read_bytes()
    assert final.startswith(first.rsplit(b"\n", 1)[0])  # earlier lines kept as they were
    recs = _read(out)
    ids = [r["custom_id"] for r in recs]
    assert sorted(ids) == sorted(f"q{i}" for i in range(n))  # each exactly once
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in recs)
    assert f"{n - n_first} completed, 0 failed, {n_first} already done" in done.stderr

    # every answer (before and after the kill) is the greedy one
    got = _by_id(recs)
    prompts, params = [], []
    for i in range(n):
        if i % 5 == 4:
            prompts.append(llm.chat_prompt([{"role": "user", "content": f"question {i}"}]))
        else:
            prompts.append(f"prompt number {i}")
        params.append(SamplingParams(max_tokens=1 + i % 7, temperature=0))
    ref = []
    for k in range(0, n, 8):  # batches of the sizes the other tests compiled for
        ref += llm.generate(prompts[k:k + 8], params[k:k + 8], use_tqdm=False)
    for i in range(n):
        ch = got[f"q{i}"]["response"]["body"]["choices"][0]
        text = ch["message"]["content"] if i % 5 == 4 else ch["text"]
        assert text == ref[i].text, i
