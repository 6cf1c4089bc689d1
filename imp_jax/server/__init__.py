"""OpenAI-compatible HTTP server: `imp-jax serve MODEL` -> `imp_jax.server.main(argv)`.

    from imp_jax.server import build_app
    app = build_app(imp_jax.LLM("smollm2-135m"), api_key="secret")   # a FastAPI app

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics. FastAPI, uvicorn and prometheus_client come with the `serve` extra.
"""

from __future__ import annotations

__all__ = ["build_app", "main", "serve"]


def build_app(llm, **kwargs):
    from imp_jax.server.app import build_app as _build

    return _build(llm, **kwargs)


def main(argv=None) -> int:
    from imp_jax.server.cli import main as _main

    return _main(argv)


def serve(llm, **kwargs) -> int:
    from imp_jax.server.cli import serve as _serve

    return _serve(llm, **kwargs)
