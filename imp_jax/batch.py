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
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from imp_jax.cli import add_quantization_args
from imp_jax.sampling import MAX_LOGPROBS, SamplingParams
from imp_jax.server import protocol as P
from imp_jax.server.protocol import APIError

URLS = ("/v1/completions", "/v1/chat/completions")
# error codes whose lines are keyed by input line number on resume (no usable custom_id)
_LINE_KEYED = ("invalid_json", "invalid_custom_id", "duplicate_custom_id")


class LineError(APIError):
    """A line-level problem (bad JSON, custom_id, method, url or body): an error line with no
    response object. Request-level problems are plain APIErrors, answered as a response."""

    def __init__(self, message: str, code: str, param: str | None = None):
        super().__init__(message, param=param, code=code)


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
def _hex() -> str:
    return uuid.uuid4().hex


def _dumps(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


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
def _error_record(line: int, custom_id, e: APIError) -> dict:
    err = {"code": e.code, "message": e.message, "param": e.param, "line": line}
    response = None
    if not isinstance(e, LineError):
        response = {"status_code": e.status, "request_id": f"req_{_hex()}", "body": e.body()}
    return {"id": f"batch_req_{_hex()}", "custom_id": custom_id, "response": response,
            "error": err}


def _response_body(job: _Job, tt: P.TokenText) -> dict:
    outs = [job.outputs[i] for i in range(len(job.prompts_ids))]
    choices, n_gen = [], 0
    for i, out in enumerate(outs):
        for c in out.outputs:
            n_gen += len(c.token_ids)
            if job.chat:
                ch = {"index": c.index,
                      "message": {"role": "assistant", "content": c.text},
                      "logprobs": (P.chat_logprobs(c.token_ids, c.logprobs or [], job.logprobs, tt)
                                   if job.logprobs is not None else None),
                      "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            else:
                prefix = (job.prompt_texts[i] or "") if job.echo else ""
                ch = {"index": i * job.params.n + c.index, "text": prefix + c.text,
                      "logprobs": (P.completion_logprobs(c.token_ids, c.logprobs or [],
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
            "usage": P.usage(n_prompt, n_gen)}
    if job.chat and job.return_token_ids:
        body["prompt_token_ids"] = list(job.prompts_ids[0])
    return body


# ------------------------------------------------------------------------------ parsing
class _Parser:
    """Turns one request body into a _Job (raises APIError, status 400, on bad input).

    The fields are read as the server reads them (imp_jax.server.protocol); what differs is
    batch's: any model name is accepted unless --served-model-name is given, `stream` is
    refused, max_tokens must be >= 1 and echo does not combine with logprobs.
    """

    def __init__(self, llm, model_name: str | None, default_model: str | None = None):
        self.llm = llm
        self.model_name = model_name
        self.default_model = model_name or default_model or "imp_jax"
        self.tokenizer = llm.tokenizer
        self.vocab = llm.config.vocab_size
        self.max_model_len = llm.runner.max_model_len
        self.defaults = P.sampling_defaults(getattr(llm.model, "generation_config", None))

    def _model(self, body) -> str:
        m = P.get_str(body, "model", self.default_model)
        if self.model_name is not None and m != self.model_name:
            raise APIError(f"The model `{m}` does not exist (this job serves "
                           f"`{self.model_name}`).", param="model", code="model_not_found")
        return m

    def _params(self, body, max_tokens_field, max_tokens, logprobs) -> SamplingParams:
        if body.get("stream"):
            raise APIError("stream is not supported in batch jobs", param="stream",
                           code="unsupported_value")
        return P.sampling_params(body, self.defaults, max_tokens_field=max_tokens_field,
                                 max_tokens=max_tokens, max_tokens_default=None,
                                 logprobs=logprobs)

    # -- endpoints
    def completion(self, line: int, custom_id: str, body: dict) -> _Job:
        model = self._model(body)
        prompts = P.completion_prompts(body)
        echo = P.get_bool(body, "echo", False)
        lp = P.get_int(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS)
        if echo and lp is not None:
            raise APIError("echo together with logprobs is not supported", param="echo",
                           code="unsupported_value")
        if body.get("suffix") is not None:
            raise APIError("suffix is not supported", param="suffix", code="unsupported_value")
        max_tokens = P.get_int(body, "max_tokens", None, lo=1) if "max_tokens" in body else 16
        params = self._params(body, "max_tokens", max_tokens, lp)
        add_special = P.get_bool(body, "add_special_tokens", True)
        ids_list, texts = [], []
        for q in prompts:
            ids = P.encode_prompt(self.tokenizer, self.vocab, q, add_special)
            if not ids:
                raise APIError("prompt is empty after tokenization", param="prompt",
                               code="invalid_value")
            P.check_length(ids, params, self.max_model_len, "prompt")
            ids_list.append(ids)
            texts.append(q if isinstance(q, str) else
                         self.tokenizer.decode(ids, skip_special_tokens=False)
                         if echo and self.tokenizer is not None else None)
        return _Job(line, custom_id, False, model, params, ids_list, texts, echo=echo,
                    return_token_ids=P.get_bool(body, "return_token_ids", False), logprobs=lp)

    def chat(self, line: int, custom_id: str, body: dict) -> _Job:
        model = self._model(body)
        messages = P.chat_messages(body)
        lp = P.chat_top_logprobs(body)
        params = self._params(body, *P.chat_max_tokens(body), lp)
        ids = P.chat_prompt_ids(self.llm, messages,
                                P.get_bool(body, "add_generation_prompt", True))
        P.check_length(ids, params, self.max_model_len, "messages")
        return _Job(line, custom_id, True, model, params, [ids], [None],
                    return_token_ids=P.get_bool(body, "return_token_ids", False), logprobs=lp)


# ------------------------------------------------------------------------------ input
def _read_lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            if raw.strip():
                yield i, raw


def _envelope(line: int, raw: bytes) -> tuple[Any, dict]:
    """Parse one input line -> (custom_id, record). LineError if unusable."""
    try:
        rec = P.parse_json(raw, f"line {line}")
    except APIError as e:
        raise LineError(e.message, "invalid_json") from None
    cid = rec.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise LineError(f"custom_id must be a non-empty string, got {P.jtype(cid)}",
                        "invalid_custom_id", "custom_id")
    return cid, rec


def _check_route(rec: dict) -> tuple[str, dict]:
    method = rec.get("method", "POST")
    if not isinstance(method, str) or method.upper() != "POST":
        raise LineError(f"method must be POST, got {method!r}", "invalid_method", "method")
    url = rec.get("url")
    if url not in URLS:
        raise LineError(f"unsupported url {url!r}: expected one of {list(URLS)}", "invalid_url",
                        "url")
    body = rec.get("body")
    if not isinstance(body, dict):
        raise LineError(f"body must be a JSON object, got {P.jtype(body)}", "invalid_body",
                        "body")
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
    tt = P.TokenText(llm.tokenizer)
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
                                "duplicate_custom_id", "custom_id")
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
                raise APIError(str(e), code="invalid_value") from None
        except APIError as e:
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
        for out in engine.step(finished_only=True):
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
    add_quantization_args(p)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--page-size", type=int, default=None,
                   help="tokens per KV page (default: 64 for fp8 KV pages, else 16)")
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-admission", choices=["optimistic", "reserve"], default="optimistic",
                   help="reserve: admit a request only while every running one can grow to its "
                        "max_tokens, never preempt (long outputs)")
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
              quantization=args.quantization, quant_policy=args.quant_policy,
              max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, page_size=args.page_size,
              num_pages=args.num_pages, gpu_memory_utilization=args.gpu_memory_utilization,
              kv_admission=args.kv_admission)
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
