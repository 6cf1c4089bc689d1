"""The OpenAI-compatible server, end to end: a real uvicorn server on 127.0.0.1 serving the
tiny llama3 checkpoint, called through the official `openai` client (and raw httpx for
hostile requests).

Compile time dominates on CPU, so one server is shared by the module and its engine is sized
so that every step has one of a handful of shapes: max_num_batched_tokens=8 (T is always 8),
max_num_seqs=4 (S in 1, 2, 4) and prompt + output <= 64 tokens (P = 4 pages). The references
come from `LLM.generate` on the same LLM before the server starts (same shapes, so the same
bits). The persistent JAX compilation cache (the project's, or one in the temp dir) makes
reruns and the SIGTERM subprocess cheap.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import imp_jax  # noqa: E402
from imp_jax.sampling import SamplingParams  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "tests", "data", "tiny", "llama3")
MODEL = "tiny-llama3"
KEY = "sk-test-key"
LLM_KW = dict(max_model_len=128, num_pages=48, max_num_seqs=4, max_num_batched_tokens=8)
JAX_CACHE = os.path.join(tempfile.gettempdir(), "imp_jax_test_jax_cache")

PROMPT = "Hello world"
CHAT = [{"role": "user", "content": "hi"}]
SEEDED = dict(temperature=0.8, top_p=0.9, top_k=20, seed=1234)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(base: str, timeout: float, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError("server did not become healthy")


def _use_jax_cache() -> str:
    """The persistent compilation cache in use (conftest / LLM enable one; else ours)."""
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", JAX_CACHE)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        try:  # let the setting take effect even if something compiled earlier in this process
            from jax._src import compilation_cache

            compilation_cache.reset_cache()
        except Exception:  # noqa: BLE001
            pass
    return jax.config.jax_compilation_cache_dir


class Server:
    def __init__(self, llm, refs):
        from imp_jax.server.cli import make_server

        self.llm, self.refs = llm, refs
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = make_server(llm, port=self.port, model_name=MODEL, api_key=KEY,
                                  log_level="warning", drain_timeout=5.0)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        _wait_healthy(self.base, 120)
        self.engine = self._find_state().engine
        self.full = llm.engine.block_manager.num_usable_pages
        self.http = httpx.Client()

    def _find_state(self):
        app = self.server.config.app
        return app.state.imp

    def client(self, **kw):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=KEY, max_retries=0,
                             timeout=kw.pop("timeout", 60), **kw)

    def aclient(self, **kw):
        return openai.AsyncOpenAI(base_url=self.base + "/v1", api_key=KEY, max_retries=0,
                                  timeout=kw.pop("timeout", 120), **kw)

    def post(self, path, body=None, *, content=None, headers=None, **kw):
        h = {"Authorization": f"Bearer {KEY}"}
        h.update(headers or {})
        if content is None:
            content = json.dumps(body)
            h.setdefault("Content-Type", "application/json")
        kw.setdefault("timeout", 60)
        return self.http.post(self.base + path, content=content, headers=h, **kw)

    def wait_pages_free(self, timeout=10.0) -> int:
        bm = self.llm.engine.block_manager
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if bm.num_free_pages == self.full and self.engine.num_unfinished == 0:
                break
            time.sleep(0.02)
        return bm.num_free_pages

    def stop(self):
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def srv():
    _use_jax_cache()
    llm = imp_jax.LLM(MODEL_DIR, **LLM_KW)

    def gen(prompt, **kw):
        return llm.generate([prompt], SamplingParams(**kw), use_tqdm=False)[0]

    refs = {
        "greedy": gen(PROMPT, temperature=0, max_tokens=8),
        "seeded": gen(PROMPT, n=2, max_tokens=8, **SEEDED),
        "logprobs": gen(PROMPT, temperature=0, max_tokens=4, logprobs=2),
        "chat_greedy": llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=8))[0],
        "chat_seeded": llm.chat(CHAT, SamplingParams(max_tokens=8, **SEEDED))[0],
        "echo": gen(PROMPT, temperature=0, max_tokens=1, prompt_logprobs=1),
    }
    s = Server(llm, refs)
    yield s
    s.stop()


def _is_error_body(r) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    return err


# ------------------------------------------------------------------------------ basics
def test_health_and_models(srv):
    assert httpx.get(srv.base + "/health").status_code == 200
    models = srv.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert srv.client().models.retrieve(MODEL).id == MODEL


def test_completion_greedy_matches_generate(srv):
    ref = srv.refs["greedy"]
    r = srv.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                        extra_body={"return_token_ids": True})
    ch = r.choices[0]
    assert ch.token_ids == ref.token_ids
    assert ch.text == ref.text
    assert ch.finish_reason == ref.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_stream_greedy_matches_generate(srv):
    ref = srv.refs["greedy"]
    stream = srv.client().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"return_token_ids": True})
    text, ids, finish, usage = "", [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.text
            ids += ch.token_ids or []
            if ch.finish_reason:
                finish.append(ch.finish_reason)
    assert text == ref.text and ids == ref.token_ids and finish == ["length"]
    assert usage.completion_tokens == 8 and usage.prompt_tokens == len(ref.prompt_token_ids)


def test_completion_seeded_n2_matches_generate(srv):
    ref = srv.refs["seeded"]
    r = srv.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=2,
                                        temperature=SEEDED["temperature"],
                                        top_p=SEEDED["top_p"], seed=SEEDED["seed"],
                                        extra_body={"top_k": SEEDED["top_k"],
                                                    "return_token_ids": True})
    got = sorted(r.choices, key=lambda c: c.index)
    assert [c.token_ids for c in got] == [o.token_ids for o in ref.outputs]
    assert [c.text for c in got] == [o.text for o in ref.outputs]


def test_completion_logprobs_match_generate(srv):
    ref = srv.refs["logprobs"]
    r = srv.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                        logprobs=2, extra_body={"return_token_ids": True})
    ch = r.choices[0]
    assert ch.token_ids == ref.token_ids
    lp = ch.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for t, got, entry in zip(ref.token_ids, lp.token_logprobs, ref.logprobs):
        assert got == pytest.approx(entry[t], abs=1e-5)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_echo_prompt_logprobs_lm_eval_style(srv):
    ref = srv.refs["echo"]
    n = len(ref.prompt_token_ids)
    for max_tokens in (0, 1):
        r = srv.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "echo": True,
                                         "logprobs": 1, "max_tokens": max_tokens,
                                         "temperature": 0})
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        assert ch["text"].startswith(PROMPT)
        lp = ch["logprobs"]
        assert len(lp["tokens"]) == n + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for j in range(1, n):
            want = ref.prompt_logprobs[j][ref.prompt_token_ids[j]]
            assert lp["token_logprobs"][j] == pytest.approx(want, abs=1e-4)
        if max_tokens == 0:
            assert ch["text"] == PROMPT and r.json()["usage"]["completion_tokens"] == 0


def test_chat_greedy_and_stream_match(srv):
    ref = srv.refs["chat_greedy"]
    c = srv.client()
    r = c.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=8,
                                  temperature=0, extra_body={"return_token_ids": True})
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].token_ids == ref.token_ids
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    stream = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    text, roles, finish, usage = "", [], [], None
    for chunk in stream:
        usage = chunk.usage or usage
        for ch in chunk.choices:
            roles += [ch.delta.role] if ch.delta.role else []
            text += ch.delta.content or ""
            finish += [ch.finish_reason] if ch.finish_reason else []
    assert roles == ["assistant"] and text == ref.text and finish == [ref.finish_reason]
    assert usage.completion_tokens == len(ref.token_ids)


def test_chat_seeded_and_logprobs(srv):
    ref = srv.refs["chat_seeded"]
    r = srv.client().chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=SEEDED["temperature"],
        top_p=SEEDED["top_p"], seed=SEEDED["seed"], logprobs=True, top_logprobs=2,
        extra_body={"top_k": SEEDED["top_k"], "return_token_ids": True})
    ch = r.choices[0]
    assert ch.token_ids == ref.token_ids and ch.message.content == ref.text
    assert len(ch.logprobs.content) == len(ref.token_ids)
    assert all(len(t.top_logprobs) == 2 for t in ch.logprobs.content)


def test_stop_string_and_vllm_extras(srv):
    ref = srv.refs["greedy"]
    stop = ref.text[3:5]
    assert stop and ref.text.find(stop) == 3
    r = srv.client().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop],
        extra_body={"min_p": 0.0, "repetition_penalty": 1.0, "min_tokens": 0,
                    "ignore_eos": True})
    assert r.choices[0].text == ref.text[:3] and r.choices[0].finish_reason == "stop"
    # streaming never leaks text past the stop string
    text = "".join(ch.text for chunk in srv.client().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=stop, stream=True)
        for ch in chunk.choices)
    assert text == ref.text[:3]


# ------------------------------------------------------------------------------ load
def test_200_concurrent_streams(srv):
    n_clients, max_tokens = 200, 4

    async def one(client, i):
        prompt = [1 + (i % 300), 5, 6 + (i % 7)]
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            extra_body={"return_token_ids": True, "ignore_eos": True})
        ids, finishes, rid, prompt_ids = [], [], set(), None
        async for chunk in stream:
            rid.add(chunk.id)
            for ch in chunk.choices:
                ids += ch.token_ids or []
                prompt_ids = getattr(ch, "prompt_token_ids", None) or prompt_ids
                if ch.finish_reason:
                    finishes.append(ch.finish_reason)
        return i, rid, ids, finishes, prompt_ids, prompt

    async def main():
        async with srv.aclient() as client:
            return await asyncio.wait_for(
                asyncio.gather(*(one(client, i) for i in range(n_clients))), 150)

    t0 = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - t0
    assert len(results) == n_clients
    ids_seen = set()
    for i, rid, ids, finishes, prompt_ids, prompt in results:
        assert len(rid) == 1
        ids_seen |= rid
        assert finishes == ["length"], (i, finishes)
        assert len(ids) == max_tokens
        assert prompt_ids == prompt  # each client got its own request, nobody else's
    assert len(ids_seen) == n_clients  # none duplicated
    assert srv.wait_pages_free() == srv.full
    print(f"200 streams in {elapsed:.1f}s")


def test_backpressure_503_retry_after(srv):
    eng = srv.engine
    old = eng.max_waiting
    eng.pause()
    try:
        eng.max_waiting = 2
        results = {}

        def call(k):
            results[k] = srv.post("/v1/completions", {"model": MODEL, "prompt": PROMPT,
                                                      "max_tokens": 2, "temperature": 0})

        threads = [threading.Thread(target=call, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while eng.num_waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.num_waiting == 2
        with pytest.raises(openai.APIStatusError) as ei:
            srv.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert ei.value.status_code == 503
        assert int(ei.value.response.headers["retry-after"]) >= 1
        assert ei.value.response.json()["error"]["type"] == "service_unavailable_error"
    finally:
        eng.max_waiting = old
        eng.resume()
    for t in threads:
        t.join(60)
    assert [results[k].status_code for k in range(2)] == [200, 200]
    assert srv.wait_pages_free() == srv.full


# ------------------------------------------------------------------------------ disconnects
def test_disconnect_mid_stream_frees_pages(srv):
    bm = srv.llm.engine.block_manager
    aborted = srv.engine.stats.aborted
    with httpx.stream("POST", srv.base + "/v1/completions",
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      # 110 tokens: still running when the client leaves, on a fast CPU too
                      json={"model": MODEL, "prompt": PROMPT, "max_tokens": 110, "stream": True,
                            "temperature": 0, "ignore_eos": True}) as r:
        assert r.status_code == 200
        lines = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                lines += 1
                if lines == 2:
                    assert bm.num_free_pages < srv.full  # it holds pages now
                    break
    # the connection is closed: the request is aborted and its pages come back
    assert srv.wait_pages_free(10) == srv.full
    assert srv.engine.stats.aborted == aborted + 1
    assert srv.engine.num_unfinished == 0


def test_disconnect_non_streaming_aborts(srv):
    aborted = srv.engine.stats.aborted
    srv.engine.pause()  # keep it queued so the client surely leaves first
    try:
        with pytest.raises(httpx.TimeoutException):
            srv.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 4},
                     timeout=0.5)
        deadline = time.monotonic() + 10
        while srv.engine.stats.aborted == aborted and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        srv.engine.resume()
    assert srv.engine.stats.aborted == aborted + 1
    assert srv.wait_pages_free() == srv.full


# ------------------------------------------------------------------------------ errors
HOSTILE = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b"[1, 2, 3]", 400),
    ("/v1/completions", b"", 400),
    ("/v1/completions", b"\xff\xfe\x00garbage", 400),
    ("/v1/completions", b'{"model": "tiny-llama3", "prompt": "x", "temperature": NaN}', 400),
    ("/v1/completions", b"[" * 100000 + b"]" * 100000, 400),
    ("/v1/completions", {"prompt": "x"}, 400),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404),
    ("/v1/completions", {"model": 7, "prompt": "x"}, 400),
    ("/v1/completions", {"model": MODEL}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": {"a": 1}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 10**9]}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [1, -5]}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "10"}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_k": -7}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "min_p": 2}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 10**6}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 1.5}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 100}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": True}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [1, 2]}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 5}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "frequency_penalty": -3}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "repetition_penalty": 0}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 1.5}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "min_tokens": 9, "max_tokens": 2}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}},
     400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 3}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"1": 5}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hello " * 200, "max_tokens": 4}, 400),
    ("/v1/chat/completions", {"model": MODEL}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
     400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": {}}]},
     400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_logprobs": 2}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_completion_tokens": 0},
     400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [
        {"role": "user", "content": "word " * 200}]}, 400),
    # structured output and tool calls are not implemented: refused, not silently ignored
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT,
                              "response_format": {"type": "json_object"}}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "x",
                         "response_format": {"type": "json_schema", "json_schema": {}}}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "tool_choice": "required"}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "parallel_tool_calls": 5}, 400),
]


def test_hostile_requests_get_openai_errors(srv):
    before = srv.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,
                                             temperature=0).choices[0].text
    for path, body, status in HOSTILE:
        if isinstance(body, bytes):
            r = srv.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = srv.post(path, body)
        assert r.status_code == status, (body if not isinstance(body, bytes) else body[:40],
                                         r.status_code, r.text[:300])
        err = _is_error_body(r)
        assert err["type"] in ("invalid_request_error", "not_found_error")
    # context length and range errors carry a useful message and param
    r = srv.post("/v1/completions", {"model": MODEL, "prompt": "hello " * 200})
    assert _is_error_body(r)["code"] == "context_length_exceeded"
    r = srv.post("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 1.5})
    err = _is_error_body(r)
    assert err["param"] == "top_p" and "top_p" in err["message"]
    # auth
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        r = httpx.post(srv.base + "/v1/completions", json={"model": MODEL, "prompt": "x"},
                       headers=headers)
        assert r.status_code == 401 and _is_error_body(r)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.base + "/v1", api_key="nope",
                      max_retries=0).models.list()
    # wrong method / unknown route
    r = httpx.get(srv.base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and _is_error_body(r)
    r = httpx.get(srv.base + "/v1/nothing-here")
    assert r.status_code == 404 and _is_error_body(r)
    # the openai client maps them too
    with pytest.raises(openai.BadRequestError):
        srv.client().completions.create(model=MODEL, prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        srv.client().chat.completions.create(model="nope", messages=CHAT)
    # still healthy, nothing leaked, and serving the same answers
    assert httpx.get(srv.base + "/health").status_code == 200
    assert srv.wait_pages_free() == srv.full
    after = srv.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,
                                            temperature=0).choices[0].text
    assert after == before


def test_values_beyond_int32_and_no_op_controls_are_served(srv):
    """top_k past int32 (every token kept) and stop ids past the vocabulary with min_tokens
    (they cannot be sampled) run like their in-range equivalents, beside other requests; the
    no-op forms of response_format / tool_choice pass; text parts join with a newline."""
    ref = srv.refs["greedy"]
    r = srv.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 8,
                                     "temperature": 0, "top_k": 2**31, "min_tokens": 2,
                                     "stop_token_ids": [2**40], "response_format":
                                     {"type": "text"}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == ref.text
    r = srv.post("/v1/chat/completions", {"model": MODEL, "max_tokens": 1, "tool_choice": "none",
                                          "return_token_ids": True, "messages": [
                                              {"role": "user", "content": [
                                                  {"type": "text", "text": "h"},
                                                  {"type": "text", "text": "i"}]}]})
    assert r.status_code == 200, r.text
    joined = srv.llm.chat_prompt([{"role": "user", "content": "h\ni"}])
    assert r.json()["prompt_token_ids"] == joined
    assert srv.wait_pages_free() == srv.full


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_n_stream_sends_one_finish_per_choice(srv, path):
    body = {"model": MODEL, "max_tokens": 8, "n": 3, "stream": True, "temperature": 0.9,
            "seed": 7}
    body.update({"prompt": PROMPT} if path == "/v1/completions" else {"messages": CHAT})
    finishes = []
    with httpx.stream("POST", srv.base + path, json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    if ch.get("finish_reason"):
                        finishes.append(ch["index"])
    assert sorted(finishes) == [0, 1, 2]


def test_fault_in_step_fails_only_that_request(srv):
    runner = srv.llm.runner
    orig = runner.step
    poison = 77

    def step(seqs, *a, **kw):
        if any(poison in s.token_ids for s in seqs):
            raise RuntimeError("injected fault")
        return orig(seqs, *a, **kw)

    runner.step = step
    try:
        r = srv.post("/v1/completions", {"model": MODEL, "prompt": [poison] * 3,
                                         "max_tokens": 2})
        assert r.status_code == 500
        assert _is_error_body(r)["type"] == "internal_server_error"
        with pytest.raises(openai.APIError):
            for _ in srv.client().completions.create(model=MODEL, prompt=[poison] * 3,
                                                     max_tokens=2, stream=True):
                pass
        ok = srv.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                             temperature=0)
        assert ok.choices[0].text == srv.refs["greedy"].text
    finally:
        runner.step = orig
    assert httpx.get(srv.base + "/health").status_code == 200
    assert srv.engine.stats.step_errors >= 2
    assert srv.wait_pages_free() == srv.full


def test_metrics_parse_and_move(srv):
    def scrape():
        text = httpx.get(srv.base + "/metrics").text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    m0 = scrape()
    srv.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    m1 = scrape()
    P = "imp_jax:"
    for name in ("generation_tokens_total", "prompt_tokens_total"):
        assert m1[(P + name, ())] > m0[(P + name, ())], name
    assert m1[(P + "time_to_first_token_seconds_count", ())] > \
        m0[(P + "time_to_first_token_seconds_count", ())]
    assert m1[(P + "e2e_request_latency_seconds_count", ())] > \
        m0[(P + "e2e_request_latency_seconds_count", ())]
    key = (P + "request_success_total", (("finished_reason", "length"),))
    assert m1[key] > m0.get(key, 0)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "num_preemptions_total", "request_errors_total",
                 "inter_token_latency_seconds_count"):
        assert (P + name, ()) in m1, name
    assert m1[(P + "kv_cache_usage_perc", ())] == 0.0


# ------------------------------------------------------------------------------ SIGTERM
def test_sigterm_drains_and_exits_zero(srv):
    port = _free_port()
    cache = _use_jax_cache()  # share the compiled programs with this process
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, IMP_JAX_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "imp_jax.server", MODEL_DIR, "--port", str(port),
           "--served-model-name", MODEL, "--max-model-len", "128", "--num-pages", "48",
           "--max-num-seqs", "4", "--max-num-batched-tokens", "8", "--drain-timeout", "20",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, 150, proc)
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=50,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True,
                                                       "return_token_ids": True})
        ids, finishes, sent = [], [], False
        for chunk in stream:
            for ch in chunk.choices:
                ids += ch.token_ids or []
                finishes += [ch.finish_reason] if ch.finish_reason else []
            if ids and not sent:
                proc.send_signal(signal.SIGTERM)  # mid-stream
                sent = True
        assert len(ids) == 50 and finishes == ["length"]  # drained, not cut
        assert proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out = proc.stdout.read().decode(errors="replace")
    assert "Traceback" not in out, out[-3000:]


def test_openai_client_example_runs_against_the_server(srv):
    import subprocess
    import sys

    example = os.path.join(os.path.dirname(__file__), "..", "examples", "openai_client.py")
    r = subprocess.run([sys.executable, example, "--base-url", srv.base + "/v1", "--api-key", KEY,
                        "--max-tokens", "4", "--concurrency", "3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "completion:" in r.stdout and "usage:" in r.stdout and "2: " in r.stdout
