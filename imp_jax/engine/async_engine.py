"""`AsyncEngine`: an `LLMEngine` driven by one background thread, for asyncio servers.

All JAX work (`LLMEngine.step()`, `add_request`, `abort_request`) happens on the engine thread,
never on the event loop. The event loop talks to it through two inboxes (new requests, aborts)
and gets `RequestOutput` snapshots back through one asyncio.Queue per request.

    engine = AsyncEngine(llm.engine, max_waiting=256)
    engine.start()
    async for out in engine.submit(prompt_ids, params):   # cumulative snapshots
        ...
    await engine.shutdown(drain_timeout=30)

* Back-pressure: when `max_waiting` requests are already waiting (not yet admitted to a batch),
  `submit` raises `EngineOverloadedError` (a server maps it to 503 + Retry-After).
* Fault isolation: an exception inside a step fails the requests scheduled in that step
  (their iterators raise `RequestFailedError`); they are aborted in the engine, so their pages
  are freed, and the other requests and the loop keep going.
* Disconnects: leaving the `async for` early (or cancelling the task) aborts the request; the
  engine thread frees its pages before its next step.
* Shutdown: `shutdown(drain_timeout)` stops accepting (`EngineShuttingDownError`), waits for
  in-flight requests to finish, aborts whatever is left at the timeout, and stops the thread.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
import traceback
import uuid
from typing import AsyncIterator

from imp_jax.engine.llm_engine import LLMEngine, RequestOutput
from imp_jax.sampling import SamplingParams

log = logging.getLogger("imp_jax.async_engine")

__all__ = ["AsyncEngine", "EngineOverloadedError", "EngineShuttingDownError",
           "RequestFailedError", "EngineStats"]


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full: retry later (HTTP 503 + Retry-After)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class EngineShuttingDownError(RuntimeError):
    """The engine is draining or stopped and accepts no new requests (HTTP 503)."""


class RequestFailedError(RuntimeError):
    """The engine failed this request (an exception inside a step, or a dead engine)."""


# Histogram buckets (seconds), vLLM's.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _Histogram:
    """A tiny thread-safe cumulative histogram (exported by the server's Prometheus collector)."""

    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last one is +Inf
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, v: float) -> None:
        with self._lock:
            self.sum += v
            for i, b in enumerate(self.buckets):
                if v <= b:
                    self.counts[i] += 1
                    break
            else:
                self.counts[-1] += 1

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative (le, count) pairs ending with +Inf, and the sum."""
        with self._lock:
            out, acc = [], 0
            for b, c in zip(self.buckets, self.counts):
                acc += c
                out.append((repr(float(b)), acc))
            out.append(("+Inf", acc + self.counts[-1]))
            return out, self.sum


class EngineStats:
    """Counters and histograms the engine thread updates (read by /metrics)."""

    def __init__(self):
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.inter_token = _Histogram(ITL_BUCKETS)
        self.e2e = _Histogram(E2E_BUCKETS)
        self.requests_finished: collections.Counter = collections.Counter()  # by finish reason
        self.request_errors = 0  # requests failed by the engine
        self.step_errors = 0  # steps that raised
        self.rejected_overload = 0
        self.aborted = 0  # requests aborted before they finished (client gone, shutdown)


class _Track:
    """Per-request state owned by the event loop side (queue) and the engine thread (timing)."""

    __slots__ = ("request_id", "queue", "loop", "arrival", "last_token_time", "num_tokens",
                 "done")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = loop
        self.arrival = time.monotonic()
        self.last_token_time: float | None = None
        self.num_tokens = 0
        self.done = False


_ERROR = object()  # queue marker: (_ERROR, exception)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *, max_waiting: int = 512,
                 retry_after: float = 1.0):
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.retry_after = retry_after
        self.stats = EngineStats()
        self._tracks: dict[str, _Track] = {}  # unfinished requests (both threads; under _lock)
        self._new: collections.deque = collections.deque()  # (track, prompt, params, fut)
        self._aborts: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._paused = False
        self._accepting = True
        self._dead: BaseException | None = None
        self._ids = itertools.count()
        self._last_scheduled: list[str] = []
        # Record which sequences each step schedules, so a failing step fails only those.
        sched = engine.scheduler
        orig_schedule = sched.schedule

        def schedule(*a, **kw):
            out = orig_schedule(*a, **kw)
            self._last_scheduled = [ss.seq.request_id for ss in out.scheduled]
            return out

        sched.schedule = schedule

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "AsyncEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="imp_jax-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def is_running(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and not self._stop
                and self._dead is None)

    @property
    def accepting(self) -> bool:
        """New requests are taken (they wait in the queue until `start()` if not started)."""
        return self._accepting and not self._stop and self._dead is None

    def pause(self) -> None:
        """Stop stepping (requests are still accepted into the waiting queue up to the bound)."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._wake.notify_all()

    async def shutdown(self, drain_timeout: float = 30.0) -> bool:
        """Stop accepting, let in-flight requests finish (up to drain_timeout seconds), abort
        the rest, stop the thread. Returns True if everything drained in time."""
        self._accepting = False
        self.resume()
        deadline = time.monotonic() + max(0.0, drain_timeout)
        while self.num_unfinished and time.monotonic() < deadline and self.is_running:
            await asyncio.sleep(0.02)
        drained = self.num_unfinished == 0
        with self._lock:
            leftover = list(self._tracks)
        for rid in leftover:
            self.abort(rid)
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
        # Anyone still waiting hears about it.
        for track in list(self._tracks.values()):
            self._deliver(track, (_ERROR, EngineShuttingDownError("server shut down")))
        return drained

    # ------------------------------------------------------------------ counts
    @property
    def num_unfinished(self) -> int:
        return len(self._tracks)

    @property
    def num_waiting(self) -> int:
        """Requests not yet in a batch: still in the inbox or in the scheduler's waiting queue."""
        return len(self._new) + len(self.engine.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    # ------------------------------------------------------------------ requests
    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:16]}-{next(self._ids)}"

    async def submit(self, prompt: str | list[int], params: SamplingParams,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request and return an async iterator of its cumulative snapshots.

        Raises before returning (so a server can still answer with a status code):
        EngineOverloadedError, EngineShuttingDownError, and add_request's ValueError/TypeError
        (e.g. the prompt does not fit the context). The iterator raises RequestFailedError if
        the engine fails the request. Leaving it early aborts the request.
        """
        if not self.accepting:
            raise EngineShuttingDownError("the server is shutting down or its engine stopped")
        request_id = request_id or self.new_request_id()
        loop = asyncio.get_running_loop()
        track = _Track(request_id, loop)
        fut = loop.create_future()
        with self._lock:
            if self.num_waiting >= self.max_waiting:
                self.stats.rejected_overload += 1
                raise EngineOverloadedError(
                    f"too many requests waiting ({self.max_waiting}); retry later",
                    self.retry_after)
            if request_id in self._tracks:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._tracks[request_id] = track
            self._new.append((track, prompt, params, fut))
            self._wake.notify_all()
        try:
            await fut  # add_request's verdict (raises its ValueError/TypeError)
        except BaseException:
            self.abort(request_id)
            raise
        return self._stream(track)

    async def _stream(self, track: _Track) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await track.queue.get()
                # Snapshots are cumulative: skip to the newest one already delivered.
                while not isinstance(item, tuple) and not item.finished:
                    try:
                        item = track.queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                if isinstance(item, tuple):
                    finished = True
                    raise item[1]
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(track.request_id)

    async def generate(self, prompt, params, request_id=None) -> RequestOutput:
        """Submit and wait for the final snapshot."""
        last = None
        async for out in await self.submit(prompt, params, request_id):
            last = out
        return last

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, non-blocking); its pages are freed before the next step."""
        with self._lock:
            track = self._tracks.pop(request_id, None)
            if track is None:
                return
            track.done = True
            self.stats.aborted += 1
            self._aborts.append(request_id)
            self._wake.notify_all()

    # ------------------------------------------------------------------ the engine thread
    def _deliver(self, track: _Track, item) -> None:
        try:
            track.loop.call_soon_threadsafe(track.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _run(self) -> None:
        eng = self.engine
        try:
            while True:
                with self._lock:
                    while (not self._stop and not self._new and not self._aborts
                           and (self._paused or not eng.has_unfinished_requests())):
                        self._wake.wait(0.5)
                    if self._stop:
                        break
                    new = list(self._new)
                    self._new.clear()
                    aborts = list(self._aborts)
                    self._aborts.clear()
                    paused = self._paused
                for rid in aborts:
                    eng.abort_request(rid)
                for track, prompt, params, fut in new:
                    if track.done:  # aborted before it was added
                        self._resolve(fut, None)
                        continue
                    try:
                        eng.add_request(prompt, params, track.request_id)
                    except Exception as e:  # noqa: BLE001 - the caller gets it
                        with self._lock:
                            self._tracks.pop(track.request_id, None)
                        self._resolve(fut, e)
                        continue
                    track.arrival = time.monotonic()
                    self._resolve(fut, None)
                if paused or not eng.has_unfinished_requests():
                    continue
                self._step()
        except BaseException as e:  # the loop itself broke: fail everyone, stay dead
            log.exception("engine thread died")
            self._dead = e
            with self._lock:
                tracks = list(self._tracks.values())
                self._tracks.clear()
                pending = list(self._new)
                self._new.clear()
            for _, _, _, fut in pending:
                self._resolve(fut, RequestFailedError(f"engine stopped: {e!r}"))
            for t in tracks:
                self._deliver(t, (_ERROR, RequestFailedError(f"engine stopped: {e!r}")))

    def _resolve(self, fut: asyncio.Future, exc: BaseException | None) -> None:
        def set_():
            if fut.done():
                return
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

        try:
            fut.get_loop().call_soon_threadsafe(set_)
        except RuntimeError:
            pass

    def _step(self) -> None:
        eng = self.engine
        self._last_scheduled = []
        try:
            outputs = eng.step()
        except Exception as e:  # noqa: BLE001 - fault isolation
            self._fail_step(e)
            return
        now = time.monotonic()
        for out in outputs:
            with self._lock:
                track = self._tracks.get(out.request_id)
                if track is not None and out.finished:
                    self._tracks.pop(out.request_id, None)
                    track.done = True
            if track is None:  # aborted meanwhile
                continue
            n = sum(len(c.token_ids) for c in out.outputs)
            if n > track.num_tokens:
                if track.last_token_time is None:
                    self.stats.ttft.observe(now - track.arrival)
                else:
                    gap = (now - track.last_token_time) / max(1, n - track.num_tokens)
                    for _ in range(n - track.num_tokens):
                        self.stats.inter_token.observe(gap)
                track.num_tokens, track.last_token_time = n, now
            if out.finished:
                self.stats.e2e.observe(now - track.arrival)
                for c in out.outputs:
                    self.stats.requests_finished[c.finish_reason or "unknown"] += 1
            self._deliver(track, out)

    def _fail_step(self, e: Exception) -> None:
        eng = self.engine
        self.stats.step_errors += 1
        log.error("engine step failed: %s", "".join(traceback.format_exception(e)))
        seq_ids = self._last_scheduled
        by_seq = getattr(eng, "_by_seq", {})
        affected = []
        for sid in seq_ids:
            req = by_seq.get(sid, (None,))[0]
            rid = req.request_id if req is not None else sid.split("#")[0]
            if rid not in affected:
                affected.append(rid)
        if not affected:  # failed before scheduling: everything running is suspect
            affected = list({s.request_id.split("#")[0] for s in eng.scheduler.running})
        err = RequestFailedError(f"the engine failed this request: {type(e).__name__}: {e}")
        try:  # a step that consumed the device state: rebuild it, requeue the others
            if eng.recover():
                log.error("device state lost in a failed step: KV cache rebuilt, running "
                          "requests requeued")
        except Exception:  # noqa: BLE001
            log.exception("engine recovery failed")
        for rid in affected:
            try:
                eng.abort_request(rid)
            except Exception:  # noqa: BLE001
                log.exception("abort after a failed step")
            with self._lock:
                track = self._tracks.pop(rid, None)
            if track is not None:
                track.done = True
                self.stats.request_errors += 1
                self._deliver(track, (_ERROR, err))
