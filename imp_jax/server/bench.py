"""`imp-jax bench serve`: the OpenAI server under load, like vLLM's benchmark_serving.

    imp-jax bench serve --model random:llama3-8b --input-len 256 --output-len 128 \\
        --max-concurrency 1,8,32,64 --num-prompts 16,64,128,128 --decode-steps 8 \\
        --max-num-seqs 64 --json serve.json

It starts the real server (`imp-jax serve` as a subprocess on 127.0.0.1 and a free port, every
engine program compiled before /health turns ready) or uses one at --base-url, then drives
POST /v1/completions with streaming requests (random token-id prompts of --input-len tokens,
max_tokens --output-len, ignore_eos, greedy) at each level: every pair of a request rate
(--request-rate, Poisson arrivals; "inf" sends all at once) and a cap on requests in flight
(--max-concurrency; default none). Per level: completed / failed requests, request and output
token throughput, time to first token (TTFT), inter-token latency (ITL), time per output token
(TPOT) and end-to-end latency; a table on stdout, JSON with --json. Latencies count from when
a request is sent (after it waited for a free slot under --max-concurrency), as vLLM's do.

ITL is per token. The engine runs several decode steps per compiled call (--decode-steps) and
a reader that falls behind gets several snapshots merged, so one streamed chunk may carry
several tokens: a chunk's gap to the previous chunk is split evenly over its tokens (the raw
chunk gaps and the tokens per chunk are reported too). A chunk is what one read off the socket
brought: SSE events that arrived together have no gap between them to measure. Every event
carries its token ids (`return_token_ids`) and the stream ends with the server's usage, so each
request's token count is checked against --output-len; mismatches are reported.

Every option this parser does not know goes to `imp-jax serve` (--max-num-seqs,
--max-num-batched-tokens, --gpu-memory-utilization, --num-pages, --page-size, --dtype,
--quantization, --no-prefix-caching, --max-waiting, ...: see `imp-jax serve --help`), which
checks them before anything starts. --max-model-len defaults to input + output + 16 here (the
model's full context would size a huge page table).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

__all__ = ["main", "request_metrics", "summarize", "make_levels"]


# ------------------------------------------------------------------------------ arguments
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imp-jax bench serve", allow_abbrev=False,
        description="Request rate / concurrency vs TTFT and inter-token latency of the server.",
        epilog="Other options go to `imp-jax serve` (see `imp-jax serve --help`).")
    p.add_argument("--model", default="random:llama3-8b",
                   help="what the server loads (also gives the vocab size for random prompts)")
    p.add_argument("--base-url", default=None,
                   help="benchmark a server already running there (e.g. http://127.0.0.1:8000) "
                        "instead of starting one; server options are then ignored")
    p.add_argument("--api-key", default=os.environ.get("IMP_JAX_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (and given to the started server)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    p.add_argument("--decode-steps", type=int, default=None,
                   help="decode steps per compiled call in the started server")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompt-kind", choices=["ids", "text"], default="ids",
                   help="ids: random token ids of --input-len tokens; text: the same ids decoded "
                        "with the model's tokenizer (an HF / orbax directory), re-tokenized by "
                        "the server (the prompt length then varies a little)")
    p.add_argument("--request-rate", default="inf",
                   help="comma list of requests/s (Poisson arrivals); 'inf' sends all at once")
    p.add_argument("--max-concurrency", default=None,
                   help="comma list of caps on requests in flight (default: no cap)")
    p.add_argument("--num-prompts", default="64",
                   help="requests per level: one number, one per --max-concurrency value, or "
                        "one per level")
    p.add_argument("--warmup-prompts", type=int, default=None,
                   help="untimed requests (all at once) before the levels; default the largest "
                        "level's concurrency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=1800.0,
                   help="seconds to wait for /health (the server compiles its programs first)")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--server-log", default=None,
                   help="the started server's output (default: a temporary file)")
    p.add_argument("--json", default=None, help="save the results here")
    return p


def _parse_rates(s: str) -> list[float]:
    out = []
    for x in str(s).split(","):
        x = x.strip().lower()
        r = math.inf if x in ("inf", "infinity") else float(x)
        if not r > 0:
            raise ValueError(f"--request-rate values must be > 0 or 'inf', got {x!r}")
        out.append(r)
    return out


def _parse_ints(s: str, what: str) -> list[int]:
    out = [int(x) for x in str(s).split(",")]
    if any(v < 1 for v in out):
        raise ValueError(f"{what} values must be >= 1, got {s!r}")
    return out


def make_levels(rates: str, concurrency: str | None, num_prompts: str) -> list[dict]:
    """Every (concurrency, rate) pair, concurrency outer; num_prompts is one number, one per
    concurrency value or one per level."""
    rs = _parse_rates(rates)
    cs = _parse_ints(concurrency, "--max-concurrency") if concurrency else [None]
    ns = _parse_ints(num_prompts, "--num-prompts")
    n_levels = len(rs) * len(cs)
    levels = []
    for ci, c in enumerate(cs):
        for ri, r in enumerate(rs):
            k = ci * len(rs) + ri
            if len(ns) == n_levels:
                n = ns[k]
            elif len(ns) == len(cs):
                n = ns[ci]
            elif len(ns) == 1:
                n = ns[0]
            else:
                raise ValueError(f"--num-prompts needs 1, {len(cs)} (one per concurrency) or "
                                 f"{n_levels} (one per level) values, got {len(ns)}")
            levels.append({"request_rate": r, "max_concurrency": c, "num_prompts": n})
    return levels


# ------------------------------------------------------------------------------ metrics
def request_metrics(t_send: float, chunks: list[tuple[float, int]], t_end: float) -> dict:
    """Latencies of one streamed request from its chunk arrival times.

    chunks: (arrival time, tokens in the chunk) for every chunk that carried tokens.
    Returns ttft, e2e, tpot (None for one token), the per-token ITL samples (a chunk's gap to
    the previous chunk split evenly over its tokens; tokens of the first chunk have none), the
    raw chunk gaps and the tokens per chunk.
    """
    n = sum(k for _, k in chunks)
    e2e = t_end - t_send
    if not chunks:
        return {"output_tokens": 0, "ttft": None, "e2e": e2e, "tpot": None, "itl": [],
                "chunk_gaps": [], "chunk_tokens": []}
    ttft = chunks[0][0] - t_send
    itl, gaps = [], []
    for (t0, _), (t1, k) in zip(chunks, chunks[1:]):
        gaps.append(t1 - t0)
        itl.extend([(t1 - t0) / k] * k)
    tpot = (e2e - ttft) / (n - 1) if n > 1 else None
    return {"output_tokens": n, "ttft": ttft, "e2e": e2e, "tpot": tpot, "itl": itl,
            "chunk_gaps": gaps, "chunk_tokens": [k for _, k in chunks]}


def _dist(xs, scale: float = 1.0) -> dict | None:
    if len(xs) == 0:
        return None
    a = np.asarray(xs, np.float64) * scale
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "min": float(a.min()), "max": float(a.max())}


def summarize(results: list[dict], duration: float, expected_output: int) -> dict:
    """Aggregate of one level (latencies in ms, e2e in s)."""
    ok = [r for r in results if r["error"] is None]
    failed = [r for r in results if r["error"] is not None]
    # the streamed token ids, the server's usage and the request must all agree
    mismatched = [r for r in ok if not r["output_tokens"] == r["usage_tokens"] == expected_output]
    out_tokens = sum(r["output_tokens"] for r in ok)
    in_tokens = sum(r["prompt_tokens"] or 0 for r in ok)
    chunk_tokens = [k for r in ok for k in r["chunk_tokens"]]
    return {
        "completed": len(ok),
        "failed": len(failed),
        "errors": sorted({r["error"] for r in failed})[:5],
        "token_mismatches": len(mismatched),
        "mismatch_examples": [{"output_tokens": r["output_tokens"], "usage": r["usage_tokens"],
                               "finish_reason": r["finish_reason"]} for r in mismatched[:5]],
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": out_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else 0.0,
        "max_in_flight": max((r.get("in_flight", 0) for r in results), default=0),
        "ttft_ms": _dist([r["ttft"] for r in ok if r["ttft"] is not None], 1e3),
        "tpot_ms": _dist([r["tpot"] for r in ok if r["tpot"] is not None], 1e3),
        "itl_ms": _dist([x for r in ok for x in r["itl"]], 1e3),
        "chunk_gap_ms": _dist([x for r in ok for x in r["chunk_gaps"]], 1e3),
        "tokens_per_chunk": float(np.mean(chunk_tokens)) if chunk_tokens else None,
        "tokens_per_chunk_max": max(chunk_tokens, default=None),
        "e2e_s": _dist([r["e2e"] for r in ok]),
    }


# ------------------------------------------------------------------------------ load generator
class _Client:
    def __init__(self, base_url: str, model: str, api_key: str | None, timeout: float):
        import httpx

        self.url = base_url.rstrip("/") + "/v1/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=30.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        self.in_flight = 0

    async def close(self):
        await self.http.aclose()

    async def request(self, prompt, output_len: int) -> dict:
        body = {"model": self.model, "prompt": prompt, "max_tokens": output_len,
                "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}, "return_token_ids": True}
        chunks: list[tuple[float, int]] = []
        rec = {"error": None, "usage_tokens": None, "prompt_tokens": None,
               "finish_reason": None}
        self.in_flight += 1
        rec["in_flight"] = self.in_flight
        t_send = time.perf_counter()
        try:
            async with self.http.stream("POST", self.url, json=body,
                                        headers=self.headers) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    raise RuntimeError(f"HTTP {r.status_code}: {text[:200]}")
                # A "chunk" is what one read off the socket brought: SSE events that arrived
                # together share one arrival time (no gap between them to measure).
                buf, done = b"", False
                async for data in r.aiter_bytes():
                    now = time.perf_counter()
                    buf += data
                    *lines, buf = buf.split(b"\n")
                    k = 0
                    for line in lines:
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                            break
                        k += self._event(json.loads(payload), rec)
                    if k:
                        chunks.append((now, k))
                    if done:
                        break
                if not done:
                    raise RuntimeError("the stream ended without [DONE]")
        except Exception as e:  # noqa: BLE001 - a failed request is a result
            rec["error"] = f"{type(e).__name__}: {e}"[:300]
        finally:
            self.in_flight -= 1
        rec.update(request_metrics(t_send, chunks, time.perf_counter()))
        return rec

    @staticmethod
    def _event(obj: dict, rec: dict) -> int:
        """Fold one SSE event into `rec`; return how many tokens it carried."""
        if "error" in obj:
            raise RuntimeError(f"stream error: {obj['error'].get('message')}")
        k = 0
        for ch in obj.get("choices") or []:
            k += len(ch.get("token_ids") or [])
            if ch.get("finish_reason") is not None:
                rec["finish_reason"] = ch["finish_reason"]
        usage = obj.get("usage")
        if usage:
            rec["usage_tokens"] = usage.get("completion_tokens")
            rec["prompt_tokens"] = usage.get("prompt_tokens")
        return k


async def _run_level(client: _Client, prompts: list, output_len: int, rate: float,
                     concurrency: int | None, seed: int) -> tuple[list[dict], float]:
    """Send every prompt (Poisson arrivals at `rate`, at most `concurrency` in flight);
    return the per-request records and the level's wall time."""
    rng = np.random.default_rng(seed)
    sem = asyncio.Semaphore(concurrency) if concurrency else None

    async def one(p):
        if sem is None:
            return await client.request(p, output_len)
        async with sem:
            return await client.request(p, output_len)

    start = time.perf_counter()
    tasks = []
    for i, p in enumerate(prompts):
        tasks.append(asyncio.create_task(one(p)))
        if rate != math.inf and i + 1 < len(prompts):
            await asyncio.sleep(float(rng.exponential(1.0 / rate)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def _random_prompts(n: int, length: int, vocab: int, rng) -> list[list[int]]:
    lo, hi = min(10, vocab - 1), max(min(10, vocab - 1) + 1, vocab - 10)
    return rng.integers(lo, hi, size=(n, length)).tolist()


def _vocab_size(model: str) -> int:
    """The model's vocabulary size, from its config alone (no weights loaded)."""
    from imp_jax.loaders import read_config

    return read_config(model).vocab_size


def _text_tokenizer(model: str):
    from checkpoints.presets import PRESETS

    if model in PRESETS or model.startswith("random:") or model.endswith(".gguf") or \
            not os.path.isfile(os.path.join(model, "tokenizer.json")):
        raise ValueError("--prompt-kind text needs a model directory with tokenizer.json; "
                         "use --prompt-kind ids")
    from imp_jax.tokenizer import Tokenizer

    return Tokenizer.from_dir(model)


# ------------------------------------------------------------------------------ the server
def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _server_argv(args, server_args: list[str]) -> list[str]:
    """The `imp-jax serve` arguments, checked by its own parser before anything starts."""
    from imp_jax.server import cli

    argv = [args.model, "--host", args.host, "--port", str(args.port), *server_args]
    if args.api_key:
        argv += ["--api-key", args.api_key]
    if args.decode_steps is not None:
        argv += ["--decode-steps", str(args.decode_steps)]
    ns = cli.parser().parse_args(argv)  # bad server options fail here
    if ns.max_model_len is None:
        argv += ["--max-model-len", str(args.input_len + args.output_len + 16)]
    return argv


def _wait_ready(base_url: str, timeout: float, server: "_ServerProcess | None" = None) -> None:
    """Poll /health until it answers 200 (the server loads and compiles first)."""
    import httpx

    start = time.perf_counter()
    next_note = start + 30
    while time.perf_counter() - start < timeout:
        if server is not None and server.proc.poll() is not None:
            raise RuntimeError(f"the server exited with {server.proc.returncode}:\n"
                               f"{server.tail()}")
        try:
            if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.perf_counter() > next_note:
            print(f"  waiting for the server (loading, compiling): "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
            next_note += 30
        time.sleep(0.25)
    raise TimeoutError(f"{base_url} was not ready within {timeout:.0f} s" +
                       (f":\n{server.tail()}" if server is not None else ""))


class _ServerProcess:
    def __init__(self, argv: list[str], log_path: str):
        import imp_jax

        root = os.path.dirname(os.path.dirname(os.path.abspath(imp_jax.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get(
            "PYTHONPATH", "").split(os.pathsep) if p])
        self.log_path = log_path
        self._log = open(log_path, "w")
        cmd = [sys.executable, "-m", "imp_jax.server", *argv]
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL)

    def wait_ready(self, base_url: str, timeout: float) -> float:
        _wait_ready(base_url, timeout, self)
        return time.perf_counter() - self.start

    def tail(self, n: int = 40) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def _device_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [x.strip() for x in out.stdout.splitlines() if x.strip()]
    return ", ".join(names) or None


# ------------------------------------------------------------------------------ report
def _fmt(d: dict | None, key: str, fmt: str = "{:.1f}") -> str:
    return "-" if d is None else fmt.format(d[key])


def table(levels: list[dict]) -> str:
    head = ("| rate req/s | max conc | ok / failed | tokens ok | duration s | req/s | "
            "out tok/s | TTFT ms mean / p50 / p99 | ITL ms mean / p50 / p99 | "
            "chunk gap ms p50 (tok/chunk) | TPOT ms mean | E2E s p50 / p99 |")
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    for lv in levels:
        m = lv["metrics"]
        rate = "inf" if lv["request_rate"] == math.inf else f"{lv['request_rate']:g}"
        conc = "-" if lv["max_concurrency"] is None else str(lv["max_concurrency"])
        ttft, itl, e2e = m["ttft_ms"], m["itl_ms"], m["e2e_s"]
        tpc = "-" if m["tokens_per_chunk"] is None else f"{m['tokens_per_chunk']:.1f}"
        rows.append(
            f"| {rate} | {conc} | {m['completed']} / {m['failed']} | "
            f"{m['completed'] - m['token_mismatches']}/{m['completed']} | "
            f"{m['duration_s']:.1f} | {m['request_throughput']:.2f} | "
            f"{m['output_throughput']:.0f} | "
            f"{_fmt(ttft, 'mean')} / {_fmt(ttft, 'p50')} / {_fmt(ttft, 'p99')} | "
            f"{_fmt(itl, 'mean', '{:.2f}')} / {_fmt(itl, 'p50', '{:.2f}')} / "
            f"{_fmt(itl, 'p99', '{:.2f}')} | "
            f"{_fmt(m['chunk_gap_ms'], 'p50')} ({tpc}) | "
            f"{_fmt(m['tpot_ms'], 'mean', '{:.2f}')} | "
            f"{_fmt(e2e, 'p50', '{:.2f}')} / {_fmt(e2e, 'p99', '{:.2f}')} |")
    return "\n".join(rows)


def _json_safe(x):
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


# ------------------------------------------------------------------------------ main
async def _compiled_programs(base_url: str) -> int | None:
    """The server's `imp_jax:compiled_programs` counter from /metrics (None if absent)."""
    import httpx

    async with httpx.AsyncClient() as h:
        text = (await h.get(base_url + "/metrics", timeout=30)).text
    for line in text.splitlines():
        if line.split("{")[0].split(" ")[0].endswith("compiled_programs_total"):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


async def _bench(args, base_url: str, levels: list[dict], vocab: int, tokenizer) -> dict:
    import httpx

    async with httpx.AsyncClient() as h:
        r = await h.get(base_url + "/v1/models", timeout=30,
                        headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key
                        else {})
        r.raise_for_status()
        served = r.json()["data"][0]["id"]
    client = _Client(base_url, served, args.api_key, args.request_timeout)
    rng = np.random.default_rng(args.seed)

    def prompts(n):
        ids = _random_prompts(n, args.input_len, vocab, rng)  # fresh ones: no prefix-cache hits
        if tokenizer is None:
            return ids
        return [tokenizer.decode(p, skip_special_tokens=True) for p in ids]

    try:
        n_warm = args.warmup_prompts
        if n_warm is None:
            n_warm = max(min(lv["max_concurrency"] or lv["num_prompts"], lv["num_prompts"])
                         for lv in levels)
        warm = None
        if n_warm > 0:
            print(f"warm-up: {n_warm} requests", file=sys.stderr)
            res, dur = await _run_level(client, prompts(n_warm), args.output_len, math.inf,
                                        None, args.seed)
            warm = {"num_prompts": n_warm, "duration_s": dur,
                    "failed": sum(r["error"] is not None for r in res)}
            if warm["failed"]:
                err = next(r["error"] for r in res if r["error"] is not None)
                raise RuntimeError(f"{warm['failed']}/{n_warm} warm-up requests failed: {err}")
        compiled = await _compiled_programs(base_url)
        out = []
        for i, lv in enumerate(levels):
            rate = "inf" if lv["request_rate"] == math.inf else f"{lv['request_rate']:g}/s"
            print(f"level {i + 1}/{len(levels)}: rate {rate}, max concurrency "
                  f"{lv['max_concurrency'] or '-'}, {lv['num_prompts']} requests",
                  file=sys.stderr)
            res, dur = await _run_level(client, prompts(lv["num_prompts"]), args.output_len,
                                        lv["request_rate"], lv["max_concurrency"],
                                        args.seed + 1 + i)
            m = summarize(res, dur, args.output_len)
            out.append({**lv, "metrics": m})
            print(f"  {m['completed']} ok, {m['failed']} failed, {m['duration_s']:.1f} s, "
                  f"{m['output_throughput']:.0f} output tok/s", file=sys.stderr)
            if m["errors"]:
                print(f"  errors: {m['errors']}", file=sys.stderr)
        late = await _compiled_programs(base_url)
        return {"served_model": served, "warmup": warm, "levels": out,
                "compiles_after_warmup": None if None in (late, compiled) else late - compiled}
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args, server_args = parser().parse_known_args(argv)
    try:
        levels = make_levels(args.request_rate, args.max_concurrency, args.num_prompts)
        if args.input_len < 1 or args.output_len < 1:
            raise ValueError("--input-len and --output-len must be >= 1")
        vocab = _vocab_size(args.model)
        tokenizer = _text_tokenizer(args.model) if args.prompt_kind == "text" else None
        if args.base_url is None:
            if args.port == 0:
                args.port = _free_port(args.host)
            srv_argv = _server_argv(args, server_args)
        elif server_args or args.decode_steps is not None:
            raise ValueError(f"server options {server_args or ['--decode-steps']} need a "
                             f"started server (leave out --base-url)")
    except (ValueError, FileNotFoundError) as e:
        print(f"imp-jax bench serve: error: {e}", file=sys.stderr)
        return 2

    server = None
    result = {"model": args.model, "input_len": args.input_len, "output_len": args.output_len,
              "prompt_kind": args.prompt_kind, "decode_steps": args.decode_steps,
              "device": _device_name() or "cpu", "date": time.strftime("%Y-%m-%d"),
              "command": "imp-jax bench serve " + " ".join(argv)}
    try:
        if args.base_url is None:
            log_path = args.server_log or os.path.join(
                tempfile.mkdtemp(prefix="imp_jax_bench_serve_"), "server.log")
            print(f"starting the server: imp-jax serve {' '.join(srv_argv)}; log {log_path}",
                  file=sys.stderr)
            server = _ServerProcess(srv_argv, log_path)
            base_url = f"http://{args.host}:{args.port}"
            result["server_argv"] = srv_argv
            result["server_ready_s"] = server.wait_ready(base_url, args.ready_timeout)
            print(f"server ready after {result['server_ready_s']:.1f} s", file=sys.stderr)
        else:
            base_url = args.base_url.rstrip("/")
            _wait_ready(base_url, args.ready_timeout)
        result.update(asyncio.run(_bench(args, base_url, levels, vocab, tokenizer)))
    except (RuntimeError, TimeoutError) as e:
        print(f"imp-jax bench serve: error: {e}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            result["server_exit_code"] = server.stop()
    print(table(result["levels"]))
    if result.get("compiles_after_warmup"):
        print(f"WARNING: the server compiled {result['compiles_after_warmup']} programs during "
              f"the run (the latencies of some requests include a compile)", file=sys.stderr)
    bad = sum(lv["metrics"]["failed"] + lv["metrics"]["token_mismatches"]
              for lv in result["levels"])
    if bad:
        print(f"WARNING: {bad} requests failed or got a wrong number of tokens",
              file=sys.stderr)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(_json_safe(result), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
