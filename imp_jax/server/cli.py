"""`imp-jax serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...`"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading

from imp_jax.cli import add_quantization_args

log = logging.getLogger("imp_jax.server")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: allowed 0-65535")
    return port


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imp-jax serve",
                                description="OpenAI-compatible server for one model")
    p.add_argument("model", help="preset name, .gguf file, HF directory, orbax dir or random:...")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000, help="0-65535 (0: any free port)")
    p.add_argument("--api-key", default=os.environ.get("IMP_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (env IMP_JAX_API_KEY)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the model's name)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--page-size", type=int, default=None,
                   help="tokens per KV page (default: 64 for fp8 KV pages, else 16)")
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--decode-steps", type=int, default=1,
                   help="decode steps per compiled call: fewer host syncs, chunkier streams")
    add_quantization_args(p)
    p.add_argument("--kv-admission", choices=["optimistic", "reserve"], default="optimistic",
                   help="reserve: admit a request only while every running one can grow to its "
                        "max_tokens, never preempt")
    p.add_argument("--max-waiting", type=int, default=512,
                   help="queued requests before 503 + Retry-After")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    # "trace" is uvicorn's level only: Python's logging takes it as DEBUG
    logging.basicConfig(level="DEBUG" if args.log_level == "trace" else args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from imp_jax.llm import LLM

    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len,
              page_size=args.page_size, num_pages=args.num_pages,
              gpu_memory_utilization=args.gpu_memory_utilization,
              max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=not args.no_prefix_caching,
              quantization=args.quantization, quant_policy=args.quant_policy,
              decode_steps=args.decode_steps,
              kv_admission=args.kv_admission)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    return serve(llm, host=args.host, port=args.port, api_key=args.api_key, model_name=name,
                 max_waiting=args.max_waiting, drain_timeout=args.drain_timeout,
                 warmup=not args.no_warmup, log_level=args.log_level)


def make_server(llm, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                drain_timeout: float = 30.0, **app_kwargs):
    """A uvicorn.Server for `build_app(llm, ...)` (not started)."""
    import uvicorn

    from imp_jax.server.app import build_app

    app = build_app(llm, drain_timeout=drain_timeout, **app_kwargs)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(),
                            timeout_graceful_shutdown=drain_timeout, access_log=False,
                            lifespan="on", timeout_keep_alive=30)
    return _Server(config)


def serve(llm, **kwargs) -> int:
    """Serve until SIGINT/SIGTERM; in-flight requests drain (up to drain_timeout); returns 0."""
    server = make_server(llm, **kwargs)
    server.run()
    return 0


def _server_cls():
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after a graceful shutdown (so the default SIGTERM
            # handler kills the process with -15); a drained server should exit 0 instead.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            original = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, h in original.items():
                    signal.signal(s, h)

    return Server


def _Server(config):
    return _server_cls()(config)
