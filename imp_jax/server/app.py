"""The OpenAI-compatible FastAPI app: /v1/completions, /v1/chat/completions, /v1/models,
/health, /metrics. `build_app(llm, ...)` wraps a loaded `imp_jax.LLM`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from imp_jax.engine.async_engine import (AsyncEngine, EngineOverloadedError,
                                         EngineShuttingDownError, RequestFailedError)
from imp_jax.sampling import MAX_LOGPROBS, SamplingParams
from imp_jax.server import protocol as P
from imp_jax.server.metrics import Metrics

log = logging.getLogger("imp_jax.server")

MAX_REQUEST_BYTES = 16 * 2**20


class _ClientGone(Exception):
    pass


class _SSEResponse(StreamingResponse):
    """StreamingResponse that always runs `on_close` (aborting the requests), even when the
    client leaves before the body iterator started."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class ServerState:
    def __init__(self, llm, model_name: str, api_key: str | None, engine: AsyncEngine,
                 drain_timeout: float, warmup: bool):
        self.llm, self.model_name, self.api_key = llm, model_name, api_key
        self.engine, self.drain_timeout, self.warmup = engine, drain_timeout, warmup
        self.ready = False
        self.draining = False
        self.created = int(time.time())
        self.metrics = Metrics(engine)
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.runner.max_model_len
        self.vocab = llm.config.vocab_size


def build_app(llm, *, model_name: str | None = None, api_key: str | None = None,
              max_waiting: int = 512, drain_timeout: float = 30.0, warmup: bool = True,
              retry_after: float = 1.0) -> FastAPI:
    """An OpenAI-compatible app serving `llm` (an `imp_jax.LLM`).

    model_name: the id clients pass as "model" (default: the model path's last component).
    api_key: when set, /v1/* needs "Authorization: Bearer <api_key>".
    max_waiting: requests allowed to wait for a batch slot before 503 + Retry-After.
    drain_timeout: seconds in-flight requests get to finish at shutdown.
    warmup: compile the common step shapes before /health turns 200.
    """
    if model_name is None:
        src = getattr(getattr(llm, "model", None), "source", None) or "imp_jax"
        model_name = str(src).rstrip("/").split("/")[-1] or "imp_jax"
    engine = AsyncEngine(llm.engine, max_waiting=max_waiting, retry_after=retry_after)
    state = ServerState(llm, model_name, api_key, engine, drain_timeout, warmup)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_start(state))
        try:
            yield
        finally:
            state.draining = True
            state.ready = False
            with contextlib.suppress(BaseException):
                await task
            drained = await engine.shutdown(drain_timeout)
            log.info("engine stopped (%s)", "drained" if drained else "drain timed out")
            # _start froze the start-up heap (when it warmed up): an embedding process gets
            # its collector back
            from imp_jax.bench import unfreeze_gc

            unfreeze_gc()

    app = FastAPI(title="imp_jax OpenAI-compatible server", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.imp = state

    # ------------------------------------------------------------------ errors
    @app.exception_handler(P.APIError)
    async def _api_error(request: Request, e: P.APIError):
        state.metrics.http_error(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        state.metrics.http_error(e.status_code)
        msg = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404:
            msg = f"{request.method} {request.url.path}: not found"
        return JSONResponse(P.error_body(msg, P._TYPES.get(e.status_code,
                                                            "invalid_request_error")),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        state.metrics.http_error(400)
        return JSONResponse(P.error_body(str(e.errors())[:500]), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error")
        state.metrics.http_error(500)
        return JSONResponse(P.error_body(f"internal error: {type(e).__name__}: {e}",
                                         "internal_server_error"), status_code=500)

    # ------------------------------------------------------------------ plain endpoints
    @app.get("/health")
    async def health():
        if state.ready and engine.accepting and not state.draining:
            return Response(status_code=200)
        why = "draining" if state.draining else ("engine stopped" if engine._dead else
                                                  "loading / warming up")
        return JSONResponse(P.error_body(f"not ready: {why}", "service_unavailable_error"),
                            status_code=503)

    @app.get("/metrics")
    async def metrics():
        data, ctype = state.metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/v1/models")
    async def models(request: Request):
        _auth(state, request)
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _auth(state, request)
        if model_id != state.model_name:
            raise _unknown_model(model_id)
        return _model_card(state)

    @app.post("/v1/completions")
    async def completions(request: Request):
        _auth(state, request)
        body = P.parse_json(await _read_body(request))
        return await _completions(state, request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _auth(state, request)
        body = P.parse_json(await _read_body(request))
        return await _chat(state, request, body)

    return app


# ---------------------------------------------------------------------------------- helpers
async def _start(state: ServerState) -> None:
    if state.warmup:  # every engine program, so no request pays for a compile
        t0 = time.monotonic()
        n = await asyncio.to_thread(state.llm.warmup)
        log.info("warm-up: compiled %d programs in %.1fs", n, time.monotonic() - t0)
        from imp_jax.bench import freeze_gc  # start-up objects out of the cyclic GC's walk

        freeze_gc()
    state.engine.start()
    state.ready = True


def _auth(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    h = request.headers.get("authorization")
    if not h:
        raise P.APIError("You didn't provide an API key. Pass it as 'Authorization: Bearer "
                         "<key>'.", 401, code="invalid_api_key")
    scheme, _, key = h.partition(" ")
    if scheme.lower() != "bearer" or key.strip() != state.api_key:
        raise P.APIError("Incorrect API key provided.", 401, code="invalid_api_key")


async def _read_body(request: Request) -> bytes:
    n = request.headers.get("content-length")
    if n is not None and n.isdigit() and int(n) > MAX_REQUEST_BYTES:
        raise P.APIError(f"request body over {MAX_REQUEST_BYTES} bytes", 413,
                         code="request_too_large")
    chunks, size = [], 0
    async for c in request.stream():
        size += len(c)
        if size > MAX_REQUEST_BYTES:
            raise P.APIError(f"request body over {MAX_REQUEST_BYTES} bytes", 413,
                             code="request_too_large")
        chunks.append(c)
    return b"".join(chunks)


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "imp_jax", "root": state.model_name,
            "max_model_len": state.max_model_len}


def _unknown_model(name) -> P.APIError:
    return P.APIError(f"The model `{name}` does not exist.", 404, "invalid_request_error",
                      "model", "model_not_found")


def _check_model(state: ServerState, body: dict) -> str:
    m = body.get("model")
    if m is None:
        raise P.APIError("model is required", param="model", code="missing_required_parameter")
    if not isinstance(m, str):
        raise P._bad_type("model", "a string", m)
    if m != state.model_name:
        raise _unknown_model(m)
    return m


async def _submit_all(state: ServerState, prompts_ids: list[list[int]], params: SamplingParams,
                      base_id: str) -> tuple[list[str], list[AsyncIterator]]:
    rids, its = [], []
    try:
        for i, ids in enumerate(prompts_ids):
            rid = f"{base_id}-{i}"
            it = await state.engine.submit(ids, params, rid)
            rids.append(rid)
            its.append(it)
    except BaseException as e:
        for rid in rids:
            state.engine.abort(rid)
        if isinstance(e, EngineOverloadedError):
            ra = str(max(1, math.ceil(e.retry_after)))
            raise P.APIError(str(e), 503, "service_unavailable_error", code="overloaded",
                             headers={"Retry-After": ra}) from None
        if isinstance(e, EngineShuttingDownError):
            raise P.APIError(str(e), 503, "service_unavailable_error", code="shutting_down",
                             headers={"Retry-After": "5"}) from None
        if isinstance(e, (ValueError, TypeError)):
            raise P.APIError(str(e), 400, code="invalid_value") from None
        raise
    return rids, its


async def _merge(its: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """(index, snapshot) from several request streams as they come."""
    if len(its) == 1:
        async for out in its[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, it):
        try:
            async for out in it:
                await q.put((i, out))
        except BaseException as e:  # noqa: BLE001
            await q.put((i, e))
            return
        await q.put((i, done))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(its)]
    try:
        left = len(its)
        while left:
            i, item = await q.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _aborter(state, rids: list[str]):
    """A callable that aborts every request of one HTTP call (idempotent)."""
    def abort_all():
        for rid in rids:
            state.engine.abort(rid)
    return abort_all


async def _final_outputs(request: Request, its: list[AsyncIterator], abort_all) -> list | None:
    """Final snapshots of a non-streaming call; None when the client disconnected. Whatever
    happens, the call's requests are aborted afterwards (a no-op for finished ones)."""
    try:
        return await _collect(request, its)
    except _ClientGone:
        return None
    except RequestFailedError as e:
        raise _failed(e) from None
    finally:
        abort_all()


async def _collect(request: Request, its: list[AsyncIterator]) -> list:
    """Final snapshot of every stream; a client disconnect cancels (and so aborts) them."""

    async def last(it):
        out = None
        async for out in it:
            pass
        return out

    work = asyncio.ensure_future(asyncio.gather(*(last(it) for it in its)))

    async def watch():
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(BaseException):
            await work
        raise _ClientGone()
    return work.result()


def _failed(e: BaseException) -> P.APIError:
    return P.APIError(str(e), 500, "internal_server_error", code="engine_error")


# ---------------------------------------------------------------------------------- completions
async def _completions(state: ServerState, request: Request, body: dict):
    model = _check_model(state, body)
    opts = P.Options(model)
    P.stream_opts(body, opts)
    prompts = P.completion_prompts(body)
    opts.echo = P.get_bool(body, "echo", False)
    if body.get("suffix") is not None:
        raise P.APIError("suffix is not supported", param="suffix", code="unsupported_value")
    lp = P.get_int(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS)
    plp = P.get_int(body, "prompt_logprobs", None, lo=0, hi=MAX_LOGPROBS)
    if opts.echo and lp is not None:
        plp = lp if plp is None else plp
    if "max_tokens" in body:
        max_tokens = P.get_int(body, "max_tokens", None, lo=0)
    else:
        max_tokens = 16
    opts.drop_output = max_tokens == 0
    opts.return_token_ids = P.get_bool(body, "return_token_ids", False)
    opts.tokens_as_ids = P.get_bool(body, "return_tokens_as_token_ids", False)
    add_special = P.get_bool(body, "add_special_tokens", True)
    defaults = P.sampling_defaults(state.llm.model.generation_config)
    params = P.sampling_params(body, defaults, max_tokens=max_tokens, max_tokens_default=None,
                               logprobs=lp, prompt_logprobs=plp, drop_output=opts.drop_output)
    if opts.drop_output and params.min_tokens:
        raise P.APIError("min_tokens must be 0 when max_tokens is 0", param="min_tokens")
    ids_list = [P.encode_prompt(state.tokenizer, state.vocab, p, add_special) for p in prompts]
    for ids in ids_list:
        if not ids:
            raise P.APIError("prompt is empty after tokenization", param="prompt")
        P.check_length(ids, params, state.max_model_len, "prompt")
    base = f"cmpl-{uuid.uuid4().hex}"
    created = P.now()
    rids, its = await _submit_all(state, ids_list, params, base)
    state.metrics.request("completions")
    tt = P.TokenText(state.tokenizer, opts.tokens_as_ids)

    def prompt_text(i):
        p = prompts[i]
        return p if isinstance(p, str) else (state.tokenizer.decode(p, skip_special_tokens=False)
                                             if state.tokenizer is not None else "")

    abort_all = _aborter(state, rids)
    if not opts.stream:
        outs = await _final_outputs(request, its, abort_all)
        if outs is None:  # the client went away
            return Response(status_code=499)
        choices, n_gen = [], 0
        for i, out in enumerate(outs):
            ptext = prompt_text(i) if opts.echo else ""
            for c in out.outputs:
                ids = [] if opts.drop_output else list(c.token_ids)
                text = "" if opts.drop_output else c.text
                n_gen += len(ids)
                logprobs = None
                if lp is not None:
                    all_ids, entries = [], []
                    if opts.echo:
                        all_ids += out.prompt_token_ids
                        pl = list(out.prompt_logprobs or [])
                        entries += (pl + [None] * len(out.prompt_token_ids))[
                            :len(out.prompt_token_ids)]
                    all_ids += ids
                    entries += list(c.logprobs or [])[:len(ids)]
                    logprobs = P.completion_logprobs(all_ids, entries, 0, tt)
                ch = {"index": i * params.n + c.index, "text": ptext + text,
                      "logprobs": logprobs,
                      "finish_reason": "length" if opts.drop_output else c.finish_reason,
                      "stop_reason": c.stop_reason}
                if opts.return_token_ids:
                    ch["token_ids"] = ids
                    ch["prompt_token_ids"] = out.prompt_token_ids
                if plp is not None and not opts.echo:
                    ch["prompt_logprobs"] = out.prompt_logprobs
                choices.append(ch)
        n_prompt = sum(len(x) for x in ids_list)
        return {"id": base, "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": P.usage(n_prompt, n_gen)}

    n_prompt_total = sum(len(x) for x in ids_list)

    async def events():
        sent: dict[tuple[int, int], list[int]] = {}  # (prompt, choice) -> [chars, tokens]
        totals = {}
        done = set()  # choices whose finish_reason went out (later outputs repeat them)
        hold = max((len(s) for s in params.stop), default=1) - 1
        try:
            async for i, out in _merge(its):
                for c in out.outputs:
                    if not c.token_ids and c.finish_reason is None:
                        continue  # a prefill chunk: nothing to say yet
                    key = (i, c.index)
                    if key in done:
                        continue
                    st = sent.get(key)
                    first = st is None
                    if first:
                        st = sent[key] = [0, 0]
                    finished = c.finish_reason is not None
                    text, ids, lps = c.text, c.token_ids, c.logprobs
                    if opts.drop_output:
                        text, ids, lps = "", [], []
                    end = len(text) if finished else max(st[0], len(text) - hold)
                    delta, new_ids = text[st[0]:end], ids[st[1]:]
                    ptext = ""
                    lp_obj = None
                    if lp is not None:
                        all_ids, entries = [], []
                        if first and opts.echo:
                            all_ids += out.prompt_token_ids
                            pl = list(out.prompt_logprobs or [])
                            entries += (pl + [None] * len(all_ids))[:len(all_ids)]
                        all_ids += new_ids
                        entries += list(lps or [])[st[1]:st[1] + len(new_ids)]
                        lp_obj = P.completion_logprobs(all_ids, entries, 0, tt)
                    if first and opts.echo:
                        ptext = prompt_text(i)
                    st[0], st[1] = end, len(ids)
                    totals[key] = len(ids)
                    if not (delta or ptext or finished or (new_ids and (
                            lp is not None or opts.return_token_ids))):
                        continue
                    ch = {"index": i * params.n + c.index, "text": ptext + delta,
                          "logprobs": lp_obj,
                          "finish_reason": (("length" if opts.drop_output else c.finish_reason)
                                            if finished else None)}
                    if finished:
                        ch["stop_reason"] = c.stop_reason
                        done.add(key)
                    if opts.return_token_ids:
                        ch["token_ids"] = new_ids
                        if first:
                            ch["prompt_token_ids"] = out.prompt_token_ids
                    chunk = {"id": base, "object": "text_completion", "created": created,
                             "model": model, "choices": [ch]}
                    if opts.include_usage:
                        chunk["usage"] = (P.usage(n_prompt_total, sum(totals.values()))
                                          if opts.continuous_usage else None)
                    yield _sse(chunk)
            if opts.include_usage:
                yield _sse({"id": base, "object": "text_completion", "created": created,
                            "model": model, "choices": [],
                            "usage": P.usage(n_prompt_total, sum(totals.values()))})
        except RequestFailedError as e:
            yield _sse(_failed(e).body())
        yield "data: [DONE]\n\n"

    return _SSEResponse(events(), abort_all)


# ---------------------------------------------------------------------------------- chat
async def _chat(state: ServerState, request: Request, body: dict):
    model = _check_model(state, body)
    opts = P.Options(model)
    P.stream_opts(body, opts)
    messages = P.chat_messages(body)
    lp = P.chat_top_logprobs(body)
    field, max_tokens = P.chat_max_tokens(body)
    opts.return_token_ids = P.get_bool(body, "return_token_ids", False)
    opts.tokens_as_ids = P.get_bool(body, "return_tokens_as_token_ids", False)
    opts.add_generation_prompt = P.get_bool(body, "add_generation_prompt", True)
    defaults = P.sampling_defaults(state.llm.model.generation_config)
    params = P.sampling_params(body, defaults, max_tokens_field=field, max_tokens=max_tokens,
                               max_tokens_default=None, logprobs=lp)
    ids = P.chat_prompt_ids(state.llm, messages, opts.add_generation_prompt)
    P.check_length(ids, params, state.max_model_len, "messages")
    base = f"chatcmpl-{uuid.uuid4().hex}"
    created = P.now()
    rids, its = await _submit_all(state, [ids], params, base)
    state.metrics.request("chat")
    tt = P.TokenText(state.tokenizer, opts.tokens_as_ids)

    abort_all = _aborter(state, rids)
    if not opts.stream:
        outs = await _final_outputs(request, its, abort_all)
        if outs is None:  # the client went away
            return Response(status_code=499)
        (out,) = outs
        choices, n_gen = [], 0
        for c in out.outputs:
            n_gen += len(c.token_ids)
            ch = {"index": c.index,
                  "message": {"role": "assistant", "content": c.text, "refusal": None,
                              "tool_calls": []},
                  "logprobs": (P.chat_logprobs(c.token_ids, c.logprobs or [], lp, tt)
                               if lp is not None else None),
                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            if opts.return_token_ids:
                ch["token_ids"] = list(c.token_ids)
            choices.append(ch)
        resp = {"id": base, "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": P.usage(len(ids), n_gen)}
        if opts.return_token_ids:
            resp["prompt_token_ids"] = ids
        return resp

    async def events():
        sent: dict[int, list[int]] = {}
        hold = max((len(s) for s in params.stop), default=1) - 1

        def chunk(choices, usage=None):
            d = {"id": base, "object": "chat.completion.chunk", "created": created,
                 "model": model, "choices": choices}
            if opts.include_usage:
                d["usage"] = usage
            return _sse(d)

        last = None
        try:
            for k in range(params.n):  # the role comes first, like OpenAI
                sent[k] = [0, 0]
                ch = {"index": k, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}
                if opts.return_token_ids and k == 0:
                    ch["prompt_token_ids"] = ids
                yield chunk([ch], P.usage(len(ids), 0) if opts.continuous_usage else None)
            done = set()  # choices whose finish_reason went out (later outputs repeat them)
            async for _, out in _merge(its):
                n_gen = sum(len(c.token_ids) for c in out.outputs)
                for c in out.outputs:
                    if c.index in done:
                        continue
                    st = sent[c.index]
                    finished = c.finish_reason is not None
                    end = len(c.text) if finished else max(st[0], len(c.text) - hold)
                    delta, new_ids = c.text[st[0]:end], c.token_ids[st[1]:]
                    lp_obj = None
                    if lp is not None and new_ids:
                        lp_obj = P.chat_logprobs(new_ids, (c.logprobs or [])[st[1]:], lp, tt)
                    st[0], st[1] = end, len(c.token_ids)
                    if not (delta or finished or (new_ids and (
                            lp is not None or opts.return_token_ids))):
                        continue
                    ch = {"index": c.index, "delta": {"content": delta} if delta else {},
                          "logprobs": lp_obj,
                          "finish_reason": c.finish_reason if finished else None}
                    if finished:
                        ch["stop_reason"] = c.stop_reason
                        done.add(c.index)
                    if opts.return_token_ids:
                        ch["token_ids"] = new_ids
                    yield chunk([ch], P.usage(len(ids), n_gen) if opts.continuous_usage
                                else None)
                last = out
            if opts.include_usage:
                n_gen = sum(len(c.token_ids) for c in last.outputs) if last is not None else 0
                yield chunk([], P.usage(len(ids), n_gen))
        except RequestFailedError as e:
            yield _sse(_failed(e).body())
        yield "data: [DONE]\n\n"

    return _SSEResponse(events(), abort_all)
