"""OpenAI request parsing/validation and response formatting (no FastAPI here).

Requests are parsed by hand rather than with pydantic models so that every error is an OpenAI
error body with status 400 and the offending `param`, the numeric ranges come from
`SamplingParams`' own validation, and bools / floats are never silently coerced to ints.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from imp_jax.sampling import MAX_LOGPROBS, SamplingParams

MAX_N = 128  # samples per request
MAX_PROMPTS = 1024  # prompts in one /v1/completions request
MAX_STOP = 32  # stop strings
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, type: str | None = None,
                 param: str | None = None, code: str | int | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
          413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable_error"}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --------------------------------------------------------------------------------------------
# Field helpers
# --------------------------------------------------------------------------------------------


def parse_json(raw: bytes, what: str = "the request body") -> dict:
    """`raw` as a JSON object; APIError(code="invalid_json") naming `what` otherwise."""
    if not raw.strip():
        raise APIError(f"{what} is empty: expected a JSON object", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(f"{what} is not valid UTF-8", code="invalid_json") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except APIError:
        raise
    except (ValueError, RecursionError) as e:
        raise APIError(f"could not parse {what} as JSON: {str(e)[:200]}",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(f"{what} must be a JSON object, got {jtype(body)}", code="invalid_json")
    return body


def _reject_constant(name: str):
    raise APIError(f"{name} is not valid JSON (non-finite numbers are not allowed)",
                   code="invalid_json")


def jtype(v: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if v is None:
        return "null"
    for t, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                    (list, "array"), (dict, "object")):  # bool before int: bool is an int
        if isinstance(v, t):
            return name
    return type(v).__name__


def _bad_type(name: str, want: str, v: Any) -> APIError:
    return APIError(f"{name} must be {want}, got {jtype(v)}", param=name, code="invalid_type")



def _check_unsupported_output_controls(body: dict) -> None:
    """Structured output and tool calling are not implemented: a request that asks for them
    gets a 400, not free text that looks like an answer. Their no-op values pass."""
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        if kind != "text":
            raise APIError(f"response_format {kind!r} is not supported; allowed: "
                           '{"type": "text"}', param="response_format", code="unsupported_value")
    if body.get("tools"):
        raise APIError("tools (function calling) are not supported", param="tools",
                       code="unsupported_value")
    choice = body.get("tool_choice")
    if choice not in (None, "none", "auto"):
        raise APIError(f"tool_choice {choice!r} is not supported; allowed: \"none\", \"auto\" "
                       "(with no tools)", param="tool_choice", code="unsupported_value")
    get_bool(body, "parallel_tool_calls", False)  # a type check: nothing runs in parallel


def get_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad_type(name, "a boolean", v)
    return v


def get_int(body: dict, name: str, default: int | None, lo: int | None = None,
            hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad_type(name, "an integer", v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if lo is not None and hi is not None else (
            f">= {lo}" if lo is not None else f"<= {hi}")
        raise APIError(f"{name} must be {rng}, got {v}", param=name, code="invalid_value")
    return v


def get_number(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad_type(name, "a number", v)
    if not math.isfinite(v):
        raise APIError(f"{name} must be finite, got {v}", param=name, code="invalid_value")
    return float(v)


def get_str(body: dict, name: str, default: str | None = None) -> str | None:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, str):
        raise _bad_type(name, "a string", v)
    return v


# --------------------------------------------------------------------------------------------
# Sampling parameters
# --------------------------------------------------------------------------------------------

# generation_config keys that become a request's sampling defaults
GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# request field -> SamplingParams field (numbers validated by SamplingParams itself)
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")
_INT_FIELDS = ("top_k", "min_tokens", "seed")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")


@dataclass
class Options:
    """What a request asks for beyond SamplingParams."""

    model: str
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    echo: bool = False
    drop_output: bool = False  # max_tokens=0: generate one token for the logprobs, return none
    logprobs: int | None = None  # completions: top-N; chat: top_logprobs (when logprobs=True)
    return_token_ids: bool = False
    tokens_as_ids: bool = False
    add_generation_prompt: bool = True
    extra: dict = field(default_factory=dict)


def sampling_defaults(generation_config: dict | None) -> dict:
    """The model's generation_config values that a request's sampling fields override."""
    gen = generation_config or {}
    return {k: gen[k] for k in GENERATION_KEYS if gen.get(k) is not None}


def sampling_params(body: dict, defaults: dict, *, max_tokens_field: str = "max_tokens",
                    max_tokens: int | None = None, max_tokens_default: int | None = 16,
                    logprobs: int | None = None, prompt_logprobs: int | None = None,
                    drop_output: bool = False) -> SamplingParams:
    kw: dict[str, Any] = dict(defaults)
    for name in _FLOAT_FIELDS:
        v = get_number(body, name)
        if v is not None:
            kw[name] = v
    for name in _INT_FIELDS:
        v = get_int(body, name, None)
        if v is not None:
            kw[name] = v
    for name in _BOOL_FIELDS:
        if body.get(name) is not None:
            kw[name] = get_bool(body, name, False)
    n = get_int(body, "n", 1, lo=1, hi=MAX_N)
    best_of = body.get("best_of")
    if best_of is not None:
        best_of = get_int(body, "best_of", None)
        if best_of != n:
            raise APIError("best_of other than n is not supported", param="best_of",
                           code="unsupported_value")
    kw["n"] = n
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad_type("stop", "a string or an array of strings", stop)
        if len(stop) > MAX_STOP:
            raise APIError(f"stop may hold at most {MAX_STOP} strings", param="stop",
                           code="invalid_value")
        kw["stop"] = [s for s in stop]
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                for i in ids):
            raise _bad_type("stop_token_ids", "an array of integers", ids)
        kw["stop_token_ids"] = ids
    logit_bias = body.get("logit_bias")
    if logit_bias:
        raise APIError("logit_bias is not supported", param="logit_bias",
                       code="unsupported_value")
    _check_unsupported_output_controls(body)
    if drop_output:
        kw["max_tokens"] = 1
    else:
        kw["max_tokens"] = max_tokens if max_tokens is not None else max_tokens_default
    kw["logprobs"] = logprobs
    kw["prompt_logprobs"] = prompt_logprobs
    try:
        return SamplingParams(**kw)
    except (TypeError, ValueError) as e:
        msg = str(e)
        param = msg.split(" ", 1)[0]
        if param == "max_tokens":
            param = max_tokens_field
            msg = max_tokens_field + msg[len("max_tokens"):]
        raise APIError(msg, param=param if param.isidentifier() else None,
                       code="invalid_value") from None


def chat_top_logprobs(body: dict) -> int | None:
    """Chat logprobs / top_logprobs -> how many top alternatives to return (None: no logprobs)."""
    want = get_bool(body, "logprobs", False)
    top = get_int(body, "top_logprobs", None, lo=0, hi=MAX_LOGPROBS)
    if top is not None and not want:
        raise APIError("top_logprobs needs logprobs to be true", param="top_logprobs",
                       code="invalid_value")
    return (top or 0) if want else None


def chat_max_tokens(body: dict) -> tuple[str, int | None]:
    """(the field that sets it, max tokens): max_completion_tokens, else max_tokens."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    return name, get_int(body, name, None, lo=1)


def stream_opts(body: dict, opts: Options) -> None:
    opts.stream = get_bool(body, "stream", False)
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise _bad_type("stream_options", "an object", so)
        if not opts.stream:
            raise APIError("stream_options is only allowed when stream is true",
                           param="stream_options", code="invalid_value")
        opts.include_usage = get_bool(so, "include_usage", False)
        opts.continuous_usage = get_bool(so, "continuous_usage_stats", False)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def completion_prompts(body: dict) -> list[str | list[int]]:
    """prompt: a string, an array of strings, an array of token ids, or an array of those."""
    p = body.get("prompt")
    if p is None:
        raise APIError("prompt is required", param="prompt", code="missing_required_parameter")
    if isinstance(p, str):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in p):
        prompts = [list(p)]
    elif isinstance(p, list) and p:
        prompts = []
        for i, q in enumerate(p):
            if isinstance(q, str):
                prompts.append(q)
            elif (isinstance(q, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                              for t in q)):
                prompts.append(list(q))
            else:
                raise APIError(f"prompt[{i}] must be a string or an array of token ids, got "
                               f"{jtype(q)}", param="prompt", code="invalid_type")
    elif isinstance(p, list):
        raise APIError("prompt must not be empty", param="prompt", code="invalid_value")
    else:
        raise _bad_type("prompt", "a string or an array", p)
    if len(prompts) > MAX_PROMPTS:
        raise APIError(f"at most {MAX_PROMPTS} prompts per request", param="prompt",
                       code="invalid_value")
    for q in prompts:
        if (isinstance(q, str) and not q) or (isinstance(q, list) and not q):
            raise APIError("prompt must not be empty", param="prompt", code="invalid_value")
    return prompts


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise APIError("messages is required", param="messages",
                       code="missing_required_parameter")
    if not isinstance(msgs, list):
        raise _bad_type("messages", "an array", msgs)
    if not msgs:
        raise APIError("messages must not be empty", param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(f"{where} must be an object, got {jtype(m)}", param=where,
                           code="invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise APIError(f"{where}.role must be one of {list(CHAT_ROLES)}, got {role!r}",
                           param=f"{where}.role", code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" \
                        or not isinstance(part.get("text"), str):
                    raise APIError(f"{where}.content[{j}] must be a text part "
                                   f'{{"type": "text", "text": ...}} (only text is supported)',
                                   param=f"{where}.content", code="invalid_value")
                parts.append(part["text"])
            content = "\n".join(parts)  # as vLLM joins a message's text parts
        elif content is None:
            if role != "assistant":
                raise APIError(f"{where}.content is required", param=f"{where}.content",
                               code="missing_required_parameter")
            content = ""
        elif not isinstance(content, str):
            raise APIError(f"{where}.content must be a string or an array of text parts, got "
                           f"{jtype(content)}", param=f"{where}.content", code="invalid_type")
        msg = {k: v for k, v in m.items() if k not in ("role", "content")}
        msg.update(role=role, content=content)
        out.append(msg)
    return out


def encode_prompt(tokenizer, vocab_size: int, prompt: str | list[int],
                  add_special_tokens: bool) -> list[int]:
    """A prompt from completion_prompts -> token ids (token ids are checked against the vocab)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise APIError("this model has no tokenizer: send token ids", param="prompt",
                           code="invalid_value")
        return tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise APIError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                       f"[0, {vocab_size})", param="prompt", code="invalid_value")
    return list(prompt)


def check_length(ids: list[int], params: SamplingParams, max_model_len: int,
                 param: str) -> None:
    """400 context_length_exceeded when the prompt plus max_tokens do not fit the model."""
    gen = params.max_tokens if params.max_tokens is not None else 1
    need = len(ids) + gen
    if need > max_model_len:
        raise APIError(
            f"This model's maximum context length is {max_model_len} tokens. However, "
            f"you requested {need} tokens ({len(ids)} in the {param}, {gen} in the "
            f"completion). Please reduce the length of the {param} or completion.",
            param=param, code="context_length_exceeded")


def chat_prompt_ids(llm, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """chat_messages -> prompt token ids through the model's chat template."""
    if llm.tokenizer is None:
        raise APIError("this model has no tokenizer, so no chat template: use /v1/completions "
                       "with token ids", param="messages", code="invalid_value")
    try:
        ids = llm.chat_prompt(messages, add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - template errors are the request's fault
        raise APIError(f"could not apply the chat template: {type(e).__name__}: {e}",
                       param="messages", code="invalid_value") from None
    if not ids:
        raise APIError("the rendered chat prompt is empty", param="messages",
                       code="invalid_value")
    return ids


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenText:
    """Token id -> the string OpenAI's logprobs show (cached)."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self.tok, self.as_ids = tokenizer, as_ids
        self._cache: dict[int, str] = {}

    def __call__(self, t: int) -> str:
        if self.as_ids or self.tok is None:
            return f"token_id:{t}"
        s = self._cache.get(t)
        if s is None:
            s = self.tok.decode([t], skip_special_tokens=False)
            self._cache[t] = s
        return s


def completion_logprobs(ids: list[int], entries: list, text_start: int,
                        tt: TokenText) -> dict:
    """OpenAI completions logprobs for tokens `ids` with per-token {id: lp} entries (or None)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    off = text_start
    for t, e in zip(ids, entries):
        s = tt(t)
        tokens.append(s)
        offsets.append(off)
        off += len(s)
        if e is None:
            token_lps.append(None)
            tops.append(None)
        else:
            token_lps.append(_finite(e.get(t)))
            tops.append({tt(k): _finite(v) for k, v in e.items()})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(ids: list[int], entries: list, top_n: int, tt: TokenText) -> dict:
    content = []
    for t, e in zip(ids, entries):
        s = tt(t)
        top = sorted(e.items(), key=lambda kv: -kv[1])[:top_n] if top_n else []
        content.append({
            "token": s, "logprob": _finite(e.get(t)), "bytes": list(s.encode("utf-8")),
            "top_logprobs": [{"token": tt(k), "logprob": _finite(v),
                              "bytes": list(tt(k).encode("utf-8"))} for k, v in top]})
    return {"content": content}


def _finite(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else -9999.0
