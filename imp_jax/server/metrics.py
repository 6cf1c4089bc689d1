"""Prometheus metrics of the server (a registry per app; values read at scrape time)."""

from __future__ import annotations

import collections
import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

from imp_jax.engine.async_engine import AsyncEngine

PREFIX = "imp_jax:"


class Metrics:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self.http_errors: collections.Counter = collections.Counter()
        self.requests: collections.Counter = collections.Counter()
        self.registry.register(self)

    def http_error(self, status: int) -> None:
        with self._lock:
            self.http_errors[str(status)] += 1

    def request(self, endpoint: str) -> None:
        with self._lock:
            self.requests[endpoint] += 1

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # prometheus_client collector protocol
    def collect(self):
        ae = self.engine
        eng = ae.engine
        st = ae.stats
        bm = eng.block_manager

        def gauge(name, doc, value):
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        def counter(name, doc, value):
            return CounterMetricFamily(PREFIX + name, doc, value=value)

        yield gauge("num_requests_running", "Requests in the running batch.", ae.num_running)
        yield gauge("num_requests_waiting", "Requests waiting for a batch slot.", ae.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache pages in use (0-1).", bm.usage)
        yield gauge("num_free_pages", "Free KV-cache pages.", bm.num_free_pages)
        yield gauge("prefix_cache_hit_rate", "Prefix-cache hit rate (tokens).",
                    bm.prefix_cache_hit_rate)
        yield counter("prompt_tokens", "Prefill tokens computed.", eng.stats["prompt_tokens"])
        yield counter("generation_tokens", "Tokens generated.", eng.stats["generation_tokens"])
        yield counter("num_preemptions", "Sequences preempted (recomputed later).",
                      eng.stats["preemptions"])
        yield counter("engine_steps", "Engine steps run.", eng.stats["steps"])
        yield counter("compiled_programs", "Step programs traced (flat after the warm-up).",
                      eng.runner.num_compiles)
        yield counter("request_errors", "Requests failed by the engine.", st.request_errors)
        yield counter("step_errors", "Engine steps that raised.", st.step_errors)
        yield counter("requests_aborted", "Requests aborted before finishing.", st.aborted)
        yield counter("requests_rejected_overload", "Requests refused with 503 (queue full).",
                      st.rejected_overload)
        fin = CounterMetricFamily(PREFIX + "request_success", "Finished samples by reason.",
                                  labels=["finished_reason"])
        for reason, n in sorted(st.requests_finished.items()):
            fin.add_metric([reason], n)
        yield fin
        with self._lock:
            errs, reqs = dict(self.http_errors), dict(self.requests)
        he = CounterMetricFamily(PREFIX + "http_errors", "Error responses by status.",
                                 labels=["status"])
        for code, n in sorted(errs.items()):
            he.add_metric([code], n)
        yield he
        rq = CounterMetricFamily(PREFIX + "requests", "Accepted requests by endpoint.",
                                 labels=["endpoint"])
        for ep, n in sorted(reqs.items()):
            rq.add_metric([ep], n)
        yield rq
        for name, doc, h in (
                ("time_to_first_token_seconds", "Time to first token.", st.ttft),
                ("inter_token_latency_seconds", "Time between output tokens.", st.inter_token),
                ("e2e_request_latency_seconds", "End-to-end request latency.", st.e2e)):
            buckets, total = h.snapshot()
            yield HistogramMetricFamily(PREFIX + name, doc, buckets=buckets, sum_value=total)
