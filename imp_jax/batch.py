"""`imp-jax batch INPUT.jsonl -o OUTPUT.jsonl`: run an OpenAI batch file through one engine.

Input: one request per line in the OpenAI batch format::

    {"custom_id": "r1", "method": "POST", "url": "/v1/completions",
     "body": {"model": "...", "prompt": "Hello", "max_tokens": 16, "temperature": 0}}
    {"custom_id": "r2", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [{"role": "user", "content": "Hi"}]}}

Output: one line per input line, in COMPLETION order (a line is written, flushed and fsynced as
soon as its request finishes)::

    {"id": "batch_req_...", "custom_id": "r1",
     "response": {"status_code": 200, "request_id": "req_...", "body": {<completion object>}},
     "error": null}

Every request goes to the same `LLMEngine`, so they share continuous batching. A bad line never
stops the job; it gets an error line instead:

* line-level problems (malformed JSON, missing/duplicate custom_id, wrong method, unknown url):
  ``"response": null``;
* request-level problems (bad parameters, prompt over the context, chat template failure):
  ``"response": {"status_code": 400, "request_id", "body": {"error": {...}}}``;

and in both cases ``"error": {"code", "message", "param", "line"}`` (``line`` is the 1-based
input line, as in the errors of an OpenAI Batch object).

Resume: re-running with the same OUTPUT skips every request already answered there. A torn
last line (the job was killed mid-write) or any other unreadable line is dropped before new
lines are appended. Error lines that have no usable custom_id (malformed JSON, duplicates) are
keyed by their input line number instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from imp_jax.sampling import MAX_LOGPROBS, SamplingParams

URLS = ("/v1/completions", "/v1/chat/completions")
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_N = 128
MAX_PROMPTS = 1024
# error codes whose lines are keyed by input line number on resume (no usable custom_id)
_LINE_KEYED = ("invalid_json", "invalid_custom_id", "duplicate_custom_id")

# body field -> SamplingParams field, passed through for SamplingParams to validate
_PASSTHROUGH = ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                "frequency_penalty", "repetition_penalty", "seed", "min_tokens", "ignore_eos",
                "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output")
_GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class LineError(Exception):
    """A request that gets an error line. status None: no response object (envelope errors)."""

    def __init__(self, message: str, code: str, param: str | None = None,
                 status: int | None = 400):
        super().__init__(message)
        self.message, self.code, self.param, self.status = message, code, param, status


@dataclass
class _Job:
    """One input line in flight: its engine requests and their finished outputs."""

    line: int
    custom_id: str
    chat: bool
    model: str
    params: SamplingParams
    prompts_ids: list[list[int]]
    prompt_texts: list[str | None]
    echo: bool = False
    return_token_ids: bool = False
    logprobs: int | None = None  # completions: top-N; chat: top_logprobs when logprobs=true
    request_ids: list[str] = field(default_factory=list)
    outputs: dict[int, Any] = field(default_factory=dict)
    created: int = 0


# ------------------------------------------------------------------------------ helpers
def _jtype(v: Any) -> str:
    if v is None:
        return "null"
    for t, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                    (list, "array"), (dict, "object")):
        if isinstance(v, t):
            return name
    return type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else -9999.0


def _hex() -> str:
    return uuid.uuid4().hex


def _dumps(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# ------------------------------------------------------------------------------ output file
def scan_output(path: str) -> tuple[set[str], set[int]]:
    """Read a (possibly partial) output file; drop unreadable lines; return what is done.

    Returns (custom_ids answered, input line numbers answered by line-keyed error lines).
    The file is rewritten (atomically) only when some line is torn or unreadable.
    """
    done_ids: set[str] = set()
    done_lines: set[int] = set()
    if not os.path.exists(path):
        return done_ids, done_lines
    with open(path, "rb") as f:
        data = f.read()
    good: list[bytes] = []
    bad = 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not isinstance(rec, dict) or "custom_id" not in rec:
                raise ValueError("not an output record")
        except ValueError:
            bad += 1
            continue
        good.append(raw)
        err = rec.get("error")
        code = err.get("code") if isinstance(err, dict) else None
        if code in _LINE_KEYED and isinstance(err.get("line"), int):
            done_lines.add(err["line"])
        elif isinstance(rec.get("custom_id"), str):
            done_ids.add(rec["custom_id"])
    clean = b"".join(g + b"\n" for g in good)
    if bad or clean != data:  # torn tail, garbage, blank lines or a missing final newline
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(clean)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path)
        if bad:
            print(f"imp-jax batch: dropped {bad} unreadable line(s) from {path} (a torn write "
                  f"from an interrupted run); they will be redone", file=sys.stderr)
    return done_ids, done_lines


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Writer:
    def __init__(self, path: str):
        self.f = open(path, "ab")

    def write(self, rec: dict) -> None:
        self.f.write((_dumps(rec) + "\n").encode("utf-8"))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


# ------------------------------------------------------------------------------ records
def _error_record(line: int, custom_id, e: LineError) -> dict:
    err = {"code": e.code, "message": e.message, "param": e.param, "line": line}
    response = None
    if e.status is not None:
        response = {"status_code": e.status, "request_id": f"req_{_hex()}",
                    "body": {"error": {"message": e.message, "type": "invalid_request_error",
                                       "param": e.param, "code": e.code}}}
    return {"id": f"batch_req_{_hex()}", "custom_id": custom_id, "response": response,
            "error": err}


def _usage(p: int, c: int) -> dict:
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class _TokenText:
    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, t: int) -> str:
        if self.tok is None:
            return f"token_id:{t}"
        s = self.cache.get(t)
        if s is None:
            s = self.cache[t] = self.tok.decode([t], skip_special_tokens=False)
        return s


def _completion_logprobs(ids, entries, text_start: int, tt: _TokenText) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    off = text_start
    for t, e in zip(ids, entries):
        s = tt(t)
        tokens.append(s)
        offsets.append(off)
        off += len(s)
        lps.append(_finite(e.get(t)))
        tops.append({tt(k): _finite(v) for k, v in e.items()})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(ids, entries, top_n: int, tt: _TokenText) -> dict:
    content = []
    for t, e in zip(ids, entries):
        s = tt(t)
        top = sorted(e.items(), key=lambda kv: -kv[1])[:top_n] if top_n else []
        content.append({"token": s, "logprob": _finite(e.get(t)), "bytes": list(s.encode()),
                        "top_logprobs": [{"token": tt(k), "logprob": _finite(v),
                                          "bytes": list(tt(k).encode())} for k, v in top]})
    return {"content": content}


def _response_body(job: _Job, tt: _TokenText) -> dict:
    outs = [job.outputs[i] for i in range(len(job.prompts_ids))]
    choices, n_gen = [], 0
    for i, out in enumerate(outs):
        for c in out.outputs:
            n_gen += len(c.token_ids)
            if job.chat:
                ch = {"index": c.index,
                      "message": {"role": "assistant", "content": c.text},
                      "logprobs": (_chat_logprobs(c.token_ids, c.logprobs or [], job.logprobs, tt)
                                   if job.logprobs is not None else None),
                      "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            else:
                prefix = (job.prompt_texts[i] or "") if job.echo else ""
                ch = {"index": i * job.params.n + c.index, "text": prefix + c.text,
                      "logprobs": (_completion_logprobs(c.token_ids, c.logprobs or [],
                                                        len(prefix), tt)
                                   if job.logprobs is not None else None),
                      "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            if job.return_token_ids:
                ch["token_ids"] = list(c.token_ids)
                if not job.chat:
                    ch["prompt_token_ids"] = list(out.prompt_token_ids)
            choices.append(ch)
    n_prompt = sum(len(p) for p in job.prompts_ids)
    body = {"id": f"{'chatcmpl' if job.chat else 'cmpl'}-{_hex()}",
            "object": "chat.completion" if job.chat else "text_completion",
            "created": job.created, "model": job.model, "choices": choices,
            "usage": _usage(n_prompt, n_gen)}
    if job.chat and job.return_token_ids:
        body["prompt_token_ids"] = list(job.prompts_ids[0])
    return body


# ------------------------------------------------------------------------------ parsing
class _Parser:
    """Turns one request body into a _Job (raises LineError with status 400 on bad input)."""

    def __init__(self, llm, model_name: str | None, default_model: str | None = None):
        self.llm = llm
        self.model_name = model_name
        self.default_model = model_name or default_model or "imp_jax"
        self.tokenizer = llm.tokenizer
        self.vocab = llm.config.vocab_size
        self.max_model_len = llm.runner.max_model_len
        gen = getattr(llm.model, "generation_config", None) or {}
        self.defaults = {k: gen[k] for k in _GENERATION_KEYS if gen.get(k) is not None}

    # -- fields
    def _int(self, body, name, lo=None, hi=None):
        v = body.get(name)
        if v is None:
            return None
        if not _is_int(v):
            raise LineError(f"{name} must be an integer, got {_jtype(v)}", "invalid_type", name)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"[{lo}, {hi}]" if lo is not None and hi is not None else f">= {lo}"
            raise LineError(f"{name} must be {rng}, got {v}", "invalid_value", name)
        return v

    def _bool(self, body, name, default=False):
        v = body.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise LineError(f"{name} must be a boolean, got {_jtype(v)}", "invalid_type", name)
        return v

    def _model(self, body) -> str:
        m = body.get("model")
        if m is None:
            return self.default_model
        if not isinstance(m, str):
            raise LineError(f"model must be a string, got {_jtype(m)}", "invalid_type", "model")
        if self.model_name is not None and m != self.model_name:
            raise LineError(f"The model `{m}` does not exist (this job serves "
                            f"`{self.model_name}`).", "model_not_found", "model")
        return m

    def _params(self, body, max_tokens, max_tokens_field, logprobs) -> SamplingParams:
        kw: dict[str, Any] = dict(self.defaults)
        for name in _PASSTHROUGH:
            if body.get(name) is not None:
                kw[name] = body[name]
        n = self._int(body, "n", lo=1, hi=MAX_N)
        kw["n"] = 1 if n is None else n
        best_of = body.get("best_of")
        if best_of is not None and best_of != kw["n"]:
            raise LineError("best_of other than n is not supported", "unsupported_value",
                            "best_of")
        if body.get("stop") is not None:
            kw["stop"] = body["stop"]
        if body.get("logit_bias"):
            raise LineError("logit_bias is not supported", "unsupported_value", "logit_bias")
        if body.get("stream"):
            raise LineError("stream is not supported in batch jobs", "unsupported_value",
                            "stream")
        kw["max_tokens"] = max_tokens
        kw["logprobs"] = logprobs
        try:
            return SamplingParams(**kw)
        except (TypeError, ValueError) as e:
            msg = str(e)
            param = msg.split(" ", 1)[0]
            if param == "max_tokens" and max_tokens_field != "max_tokens":
                param, msg = max_tokens_field, max_tokens_field + msg[len("max_tokens"):]
            raise LineError(msg, "invalid_value", param if param.isidentifier() else None) \
                from None

    def _check_length(self, ids: list[int], params: SamplingParams, what: str) -> None:
        gen = params.max_tokens if params.max_tokens is not None else 1
        need = len(ids) + gen
        if need > self.max_model_len:
            raise LineError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {need} tokens ({len(ids)} in the {what}, {gen} in the "
                f"completion). Please reduce the length of the {what} or completion.",
                "context_length_exceeded", what)

    # -- endpoints
    def completion(self, line: int, custom_id: str, body: dict) -> _Job:
        model = self._model(body)
        p = body.get("prompt")
        if p is None:
            raise LineError("prompt is required", "missing_required_parameter", "prompt")
        if isinstance(p, str) or (isinstance(p, list) and p and all(_is_int(t) for t in p)):
            prompts = [p]
        elif isinstance(p, list) and p:
            prompts = p
            for i, q in enumerate(prompts):
                if not (isinstance(q, str) or (isinstance(q, list) and all(_is_int(t) for t in q))):
                    raise LineError(f"prompt[{i}] must be a string or an array of token ids, "
                                    f"got {_jtype(q)}", "invalid_type", "prompt")
            if len(prompts) > MAX_PROMPTS:
                raise LineError(f"at most {MAX_PROMPTS} prompts per request", "invalid_value",
                                "prompt")
        elif isinstance(p, list):
            raise LineError("prompt must not be empty", "invalid_value", "prompt")
        else:
            raise LineError(f"prompt must be a string or an array, got {_jtype(p)}",
                            "invalid_type", "prompt")
        echo = self._bool(body, "echo")
        lp = self._int(body, "logprobs", lo=0, hi=MAX_LOGPROBS)
        if echo and lp is not None:
            raise LineError("echo together with logprobs is not supported", "unsupported_value",
                            "echo")
        if body.get("suffix") is not None:
            raise LineError("suffix is not supported", "unsupported_value", "suffix")
        max_tokens = body["max_tokens"] if "max_tokens" in body else 16
        params = self._params(body, max_tokens, "max_tokens", lp)
        add_special = self._bool(body, "add_special_tokens", True)
        ids_list, texts = [], []
        for q in prompts:
            if isinstance(q, str):
                if self.tokenizer is None:
                    raise LineError("this model has no tokenizer: send token ids",
                                    "invalid_value", "prompt")
                ids = self.tokenizer.encode(q, add_special_tokens=add_special)
                texts.append(q)
            else:
                ids = [int(t) for t in q]
                bad = [t for t in ids if not 0 <= t < self.vocab]
                if bad:
                    raise LineError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                                    f"[0, {self.vocab})", "invalid_value", "prompt")
                texts.append(self.tokenizer.decode(ids, skip_special_tokens=False)
                             if echo and self.tokenizer is not None else None)
            if not ids:
                raise LineError("prompt is empty", "invalid_value", "prompt")
            self._check_length(ids, params, "prompt")
            ids_list.append(ids)
        return _Job(line, custom_id, False, model, params, ids_list, texts, echo=echo,
                    return_token_ids=self._bool(body, "return_token_ids"), logprobs=lp)

    def chat(self, line: int, custom_id: str, body: dict) -> _Job:
        model = self._model(body)
        messages = self._messages(body)
        want_lp = self._bool(body, "logprobs")
        top = self._int(body, "top_logprobs", lo=0, hi=MAX_LOGPROBS)
        if top is not None and not want_lp:
            raise LineError("top_logprobs needs logprobs to be true", "invalid_value",
                            "top_logprobs")
        lp = (top or 0) if want_lp else None
        field_ = ("max_completion_tokens" if body.get("max_completion_tokens") is not None
                  else "max_tokens")
        params = self._params(body, body.get(field_), field_, lp)
        if self.tokenizer is None:
            raise LineError("this model has no tokenizer, so no chat template: use "
                            "/v1/completions with token ids", "invalid_value", "messages")
        try:
            ids = self.llm.chat_prompt(messages,
                                       self._bool(body, "add_generation_prompt", True))
        except Exception as e:  # noqa: BLE001 - template errors are the request's fault
            raise LineError(f"could not apply the chat template: {type(e).__name__}: {e}",
                            "invalid_value", "messages") from None
        if not ids:
            raise LineError("the rendered chat prompt is empty", "invalid_value", "messages")
        self._check_length(ids, params, "messages")
        return _Job(line, custom_id, True, model, params, [ids], [None],
                    return_token_ids=self._bool(body, "return_token_ids"), logprobs=lp)

    def _messages(self, body) -> list[dict]:
        msgs = body.get("messages")
        if msgs is None:
            raise LineError("messages is required", "missing_required_parameter", "messages")
        if not isinstance(msgs, list) or not msgs:
            raise LineError("messages must be a non-empty array", "invalid_value", "messages")
        out = []
        for i, m in enumerate(msgs):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise LineError(f"{where} must be an object, got {_jtype(m)}", "invalid_type",
                                where)
            role = m.get("role")
            if role not in CHAT_ROLES:
                raise LineError(f"{where}.role must be one of {list(CHAT_ROLES)}, got {role!r}",
                                "invalid_value", f"{where}.role")
            content = m.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if not (isinstance(part, dict) and part.get("type") == "text"
                            and isinstance(part.get("text"), str)):
                        raise LineError(f"{where}.content parts must be text parts "
                                        f'{{"type": "text", "text": ...}}', "invalid_value",
                                        f"{where}.content")
                    parts.append(part["text"])
                content = "".join(parts)
            elif content is None and role == "assistant":
                content = ""
            elif not isinstance(content, str):
                raise LineError(f"{where}.content must be a string or an array of text parts",
                                "invalid_type", f"{where}.content")
            msg = {k: v for k, v in m.items() if k not in ("role", "content")}
            msg.update(role=role, content=content)
            out.append(msg)
        return out


# ------------------------------------------------------------------------------ input
def _read_lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            if raw.strip():
                yield i, raw


def _envelope(line: int, raw: bytes) -> tuple[Any, dict]:
    """Parse one input line -> (custom_id, record). LineError(status=None) if unusable."""
    try:
        rec = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise LineError(f"line {line} is not valid JSON: {str(e)[:200]}", "invalid_json",
                        status=None) from None
    if not isinstance(rec, dict):
        raise LineError(f"line {line} must be a JSON object, got {_jtype(rec)}", "invalid_json",
                        status=None)
    cid = rec.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise LineError(f"custom_id must be a non-empty string, got {_jtype(cid)}",
                        "invalid_custom_id", "custom_id", status=None)
    return cid, rec


def _check_route(rec: dict) -> tuple[str, dict]:
    method = rec.get("method", "POST")
    if not isinstance(method, str) or method.upper() != "POST":
        raise LineError(f"method must be POST, got {method!r}", "invalid_method", "method",
                        status=None)
    url = rec.get("url")
    if url not in URLS:
        raise LineError(f"unsupported url {url!r}: expected one of {list(URLS)}", "invalid_url",
                        "url", status=None)
    body = rec.get("body")
    if not isinstance(body, dict):
        raise LineError(f"body must be a JSON object, got {_jtype(body)}", "invalid_body",
                        "body", status=None)
    return url, body


# ------------------------------------------------------------------------------ the job
def run_batch(llm, input_path: str, output_path: str, progress: bool = True, *,
              model_name: str | None = None, default_model: str | None = None,
              max_in_flight: int | None = None) -> dict:
    """Run every request of `input_path` through `llm.engine`; append results to `output_path`.

    Lines already answered in `output_path` are skipped (resume). `model_name`: when given,
    requests naming another model get a `model_not_found` error line; otherwise any model name
    is accepted and echoed back (`default_model` names bodies that give none).
    `max_in_flight`: lines submitted to the engine at once (default: all of them; a bound keeps
    memory flat for huge files).

    Returns counts: {"total", "skipped", "completed", "failed", "written"}.
    """
    if os.path.abspath(input_path) == os.path.abspath(output_path):
        raise ValueError("the output file must differ from the input file")
    parent = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(parent, exist_ok=True)
    done_ids, done_lines = scan_output(output_path)
    total = sum(1 for _ in _read_lines(input_path))
    counts = {"total": total, "skipped": 0, "completed": 0, "failed": 0, "written": 0}
    parser = _Parser(llm, model_name, default_model)
    engine = llm.engine
    tt = _TokenText(llm.tokenizer)
    writer = _Writer(output_path)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="Batch", unit="req", dynamic_ncols=True, file=sys.stderr)
    pending: dict[str, tuple[_Job, int]] = {}  # engine request id -> (job, prompt index)
    jobs_in_flight = 0
    limit = max_in_flight if max_in_flight and max_in_flight > 0 else None

    def emit(rec: dict, ok: bool) -> None:
        writer.write(rec)
        counts["written"] += 1
        counts["completed" if ok else "failed"] += 1
        if bar is not None:
            bar.update(1)
            if counts["failed"]:
                bar.set_postfix(errors=counts["failed"], refresh=False)

    def submit(line: int, raw: bytes, seen: set[str]) -> None:
        nonlocal jobs_in_flight
        cid = None
        try:
            cid, rec = _envelope(line, raw)
            if cid in seen:
                raise LineError(f"duplicate custom_id {cid!r} (first used on an earlier line)",
                                "duplicate_custom_id", "custom_id", status=None)
            seen.add(cid)
        except LineError as e:
            if line in done_lines:
                skip()
                return
            emit(_error_record(line, cid, e), False)
            return
        if cid in done_ids:
            skip()
            return
        try:
            url, body = _check_route(rec)
            job = (parser.chat if url.endswith("chat/completions") else parser.completion)(
                line, cid, body)
            job.created = int(time.time())
            rids = []
            try:
                for ids in job.prompts_ids:
                    rids.append(engine.add_request(ids, job.params))
            except (ValueError, TypeError) as e:
                for r in rids:
                    engine.abort_request(r)
                raise LineError(str(e), "invalid_value") from None
        except LineError as e:
            emit(_error_record(line, cid, e), False)
            return
        job.request_ids = rids
        for i, r in enumerate(rids):
            pending[r] = (job, i)
        jobs_in_flight += 1

    def skip() -> None:
        counts["skipped"] += 1
        if bar is not None:
            bar.update(1)

    def step() -> None:
        nonlocal jobs_in_flight
        for out in engine.step():
            if not out.finished or out.request_id not in pending:
                continue
            job, i = pending.pop(out.request_id)
            job.outputs[i] = out
            if len(job.outputs) == len(job.prompts_ids):
                jobs_in_flight -= 1
                rec = {"id": f"batch_req_{_hex()}", "custom_id": job.custom_id,
                       "response": {"status_code": 200, "request_id": f"req_{_hex()}",
                                    "body": _response_body(job, tt)},
                       "error": None}
                emit(rec, True)

    try:
        seen: set[str] = set()
        for line, raw in _read_lines(input_path):
            while limit is not None and jobs_in_flight >= limit:
                step()
            submit(line, raw, seen)
        while pending:
            step()
    except BaseException:
        for r in list(pending):  # leave the engine clean; what was written stays valid
            engine.abort_request(r)
        raise
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    return counts


# ------------------------------------------------------------------------------ CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imp-jax batch",
        description="Run an OpenAI batch file (JSONL of /v1/completions and "
                    "/v1/chat/completions requests) through one engine; resumable.")
    p.add_argument("input", help="input .jsonl, one request per line")
    p.add_argument("-o", "--output", required=True,
                   help="output .jsonl; re-running skips requests already answered here")
    p.add_argument("--model", default="smollm2-135m",
                   help="preset name, .gguf file, HF dir, orbax dir or random:<shape>")
    p.add_argument("--served-model-name", default=None,
                   help="only accept requests whose body names this model (default: any)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on GPU)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--quantization", default=None, choices=["fp8", "fp8-weight-only", "int8"])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-in-flight", type=int, default=None,
                   help="lines submitted to the engine at once (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not os.path.isfile(args.input):
        print(f"imp-jax batch: no such input file: {args.input}", file=sys.stderr)
        return 2
    from imp_jax import LLM

    start = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len,
              quantization=args.quantization, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, page_size=args.page_size,
              num_pages=args.num_pages, gpu_memory_utilization=args.gpu_memory_utilization)
    try:
        counts = run_batch(llm, args.input, args.output, progress=not args.no_progress,
                           model_name=args.served_model_name, default_model=args.model,
                           max_in_flight=args.max_in_flight)
    except KeyboardInterrupt:
        print(f"imp-jax batch: interrupted; finished requests are in {args.output}, run the "
              f"same command again to resume", file=sys.stderr)
        return 130
    print(f"imp-jax batch: {counts['completed']} completed, {counts['failed']} failed, "
          f"{counts['skipped']} already done, of {counts['total']} "
          f"({time.perf_counter() - start:.1f} s) -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
