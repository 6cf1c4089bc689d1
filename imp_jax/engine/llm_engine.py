"""The engine loop: requests in, scheduler -> runner -> sampler, text out.

`LLMEngine.step()` asks the scheduler for this step's work (decodes, prefill chunks, newly
admitted requests), runs it as one compiled forward over the paged cache, applies the sampled
tokens, and checks every request's stop conditions. Requests join and leave between any two
steps (continuous batching); a request whose pages run out is preempted and recomputed later
by the scheduler, never dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from typing import Iterable

import jax
import numpy as np

from imp_jax.engine.block_manager import BlockManager
from imp_jax.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from imp_jax.engine.sequence import Sequence, SequenceStatus
from imp_jax.runner import ModelRunner, StepSeq, bucket
from imp_jax.sampling import SamplingParams, SamplingTensors


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, float]] | None = None  # per token: {sampled id and top-N: logprob}
    cumulative_logprob: float = 0.0

    def snapshot(self) -> "CompletionOutput":
        """A copy the engine will not mutate (it appends to this one's lists); built directly,
        not with dataclasses.replace: the engine takes one per request per step."""
        return CompletionOutput(self.index, self.text, list(self.token_ids), self.finish_reason,
                                self.stop_reason,
                                None if self.logprobs is None else list(self.logprobs),
                                self.cumulative_logprob)


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[dict[int, float] | None] | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    # The first sample's fields, so `outs[0].text` reads naturally when n == 1.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs


# A dispatched-ahead block's input tokens are on the device (the previous block's last ones):
# every row's StepSeq gets this placeholder.
_AHEAD_IDS = (0,)


class _Sample:
    """One of a request's n samples: its scheduler Sequence plus text and stop state."""

    def __init__(self, index, seq, detok, seed):
        self.index, self.seq, self.detok, self.seed = index, seq, detok, seed
        self.out = CompletionOutput(index, "", [])
        self.text = ""  # full decoded text (stop strings are searched here)


class _Request:
    def __init__(self, request_id, prompt, prompt_ids, params):
        self.request_id, self.prompt, self.prompt_ids, self.params = (
            request_id, prompt, prompt_ids, params)
        self.samples: list[_Sample] = []
        # samples 1..n-1 wait until sample 0 has computed the prompt, then join as prefix-cache
        # hits instead of recomputing it
        self.held: list[Sequence] = []
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.metrics = {"arrival_time": time.monotonic()}

    def output(self) -> RequestOutput:
        return RequestOutput(
            self.request_id, self.prompt, self.prompt_ids,
            [s.out.snapshot() for s in self.samples],
            all(s.out.finish_reason is not None for s in self.samples),
            None if self.prompt_logprobs is None else list(self.prompt_logprobs),
            dict(self.metrics))


def token_ids(prompt, name: str = "prompt") -> list[int]:
    """A prompt given as token ids: a list / tuple / numpy or JAX array of ints (not bools,
    floats, bytes) -> a list of ints; anything else raises a TypeError naming `name`."""
    if hasattr(prompt, "__array__") and not isinstance(prompt, (list, tuple)):
        arr = np.asarray(prompt)  # numpy / JAX arrays of token ids
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{name} must be a string or a list of token ids, got an array of "
                            f"shape {arr.shape} and dtype {arr.dtype}")
        return arr.astype(np.int64).tolist()
    if isinstance(prompt, (dict, bytes, bytearray)) or not hasattr(prompt, "__iter__"):
        raise TypeError(f"{name} must be a string or a list of token ids, got "
                        f"{type(prompt).__name__}")
    ids = list(prompt)
    bad = next((t for t in ids if isinstance(t, (bool, np.bool_))
                or not isinstance(t, (int, np.integer))), None)
    if bad is not None:
        raise TypeError(f"{name} must be a string or a list of token ids (ints), got an element "
                        f"{bad!r} ({type(bad).__name__})")
    return [int(t) for t in ids]


def _sample_id(request_id: str, i: int, n: int) -> str:
    """The scheduler's sequence id of sample i of a request with n samples."""
    return f"{request_id}#{i}" if n > 1 else request_id


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer, *, eos_token_ids: Iterable[int] = (),
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 1024,
                 enable_prefix_caching: bool = True, long_prefill_token_threshold: int = 0,
                 decode_steps: int = 1, async_decode: bool = True,
                 kv_admission: str = "optimistic"):
        self.runner, self.tokenizer = runner, tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = BlockManager(runner.cache.num_pages, runner.page_size,
                                          enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens,
                                   long_prefill_token_threshold, runner.max_model_len,
                                   kv_admission)
        self.decode_steps = decode_steps  # decode steps per compiled call (see _decode_block)
        # Dispatch decode block N+1 before reading block N (see _dispatch_ahead).
        self.async_decode = async_decode
        # (its SchedulerOutput, its SampleOutput, its SamplingTensors)
        self._ahead: tuple[SchedulerOutput, object, SamplingTensors] | None = None
        self._requests: dict[str, _Request] = {}
        self._by_seq: dict[str, tuple[_Request, _Sample]] = {}
        self._ids = itertools.count()
        self.stats = {"steps": 0, "host_time": 0.0, "prompt_tokens": 0, "generation_tokens": 0,
                      "preemptions": 0, "decode_blocks": 0, "blocks_ahead": 0,
                      # per kind of step ("prompt", "mixed", "decode", "decode_block"):
                      # [calls, wall seconds of step(), host seconds (host_time's share),
                      #  seconds in the runner's call (inputs built, programs enqueued)]
                      "step_kinds": {}}

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, *, score_from: int | None = None) -> str:
        """Queue a request; returns its id. `prompt` is text or token ids.

        `score_from` (token index) asks for prompt logprobs from that position on, bypassing
        the prefix cache only where it would skip them (used by `LLM.score`).
        """
        params = params or SamplingParams()
        if params.best_of not in (None, params.n):
            raise ValueError(f"best_of={params.best_of} is not supported: every sample is "
                             f"returned (n={params.n}); leave best_of unset or equal to n")
        if request_id is None:  # the next free number (a caller may have used one as an id)
            request_id = next(i for i in map(str, self._ids) if not self._in_use(i, params.n))
        request_id = str(request_id)
        if self._in_use(request_id, params.n):
            raise ValueError(f"request id {request_id!r} is already in use: by a request in "
                             f"flight, or by a sample id ('<request id>#<i>') of one with n > 1")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, token_ids(prompt)
        vocab = self.runner.cfg.vocab_size
        if not ids:
            raise ValueError("prompt is empty: it must contain at least one token")
        if min(ids) < 0 or max(ids) >= vocab:  # builtins over the list; the message's list
            bad = [t for t in ids if not 0 <= t < vocab]  # only when there is one to show
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        req = _Request(request_id, text, ids, params)
        if score_from is None and params.prompt_logprobs is not None:
            score_from = 1
        seqs = []
        for i in range(params.n):
            seq = Sequence(_sample_id(request_id, i, params.n), ids, params)
            if score_from is not None:
                seq.max_cached_tokens = max(0, score_from - 1)
            seqs.append(seq)
        for seq in seqs:  # check every sample fits before queueing any of them
            self.scheduler.check_fits(seq)
        base_seed = params.seed if params.seed is not None else random.getrandbits(31)
        from imp_jax.tokenizer import IncrementalDetokenizer

        for i, seq in enumerate(seqs):
            detok = None
            if self.tokenizer is not None:
                # the prompt's last ids as context: SentencePiece decoders drop a leading space
                detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens,
                                               prefix_ids=ids[-6:])
            sample = _Sample(i, seq, detok, base_seed + i)
            if params.logprobs is not None:
                sample.out.logprobs = []
            req.samples.append(sample)
            if i == 0:
                self.scheduler.add(seq)
            else:
                req.held.append(seq)
            self._by_seq[seq.request_id] = (req, sample)
        self._requests[request_id] = req
        return request_id

    def _in_use(self, request_id: str, n: int) -> bool:
        """Whether the request id, or one of its samples' sequence ids, is taken: samples of
        an n > 1 request are sequences "<id>#<i>", which another request's id could equal."""
        return request_id in self._requests or any(
            _sample_id(request_id, i, n) in self._by_seq for i in range(n))

    def abort_request(self, request_id: str) -> bool:
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        for s in req.samples:
            if s.out.finish_reason is None:
                self.scheduler.abort(s.seq.request_id)
                s.out.finish_reason = "abort"
            self._by_seq.pop(s.seq.request_id, None)
        return True

    def recover(self) -> bool:
        """After a step raised: if the device state is gone (the donated KV cache was consumed),
        rebuild it and requeue every running request to be recomputed, so the failure costs
        time, not requests. Returns True when it rebuilt."""
        self._ahead = None  # its block may be what failed; recomputed like the rest
        if not self.runner.cache_lost:
            return False
        self.runner.reset_cache()
        self.stats["preemptions"] += self.scheduler.requeue_all()
        self.block_manager.reset_prefix_cache()  # cached pages' KV is gone too
        self.stats["recoveries"] = self.stats.get("recoveries", 0) + 1
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # ------------------------------------------------------------------ the step
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one scheduled step (or a block of decode steps); return a snapshot of every
        request that progressed, or with `finished_only` of those that finished (callers that
        do not stream skip ~1000 snapshots per step)."""
        t0 = time.perf_counter()
        if self._ahead is not None:  # a decode block the previous step dispatched
            (sched, out, tensors), self._ahead = self._ahead, None
            n_steps, logits = out.tokens.shape[0], None
            t1 = time.perf_counter()
        else:
            sched = self.scheduler.schedule()
            self.stats["preemptions"] += len(sched.preempted)
            if sched.is_empty:
                return []
            n_steps = self._decode_block(sched)
            seqs, tensors, num_logprobs = self._prepare(sched, block=n_steps)
            t1 = time.perf_counter()
            if n_steps > 1:
                out = self.runner.decode_steps(seqs, tensors, n_steps, num_logprobs)
                logits = None
        t_dispatch = 0.0
        if n_steps > 1:
            self.stats["decode_blocks"] += 1
            # Queue the next block behind this one before reading it: the device never waits
            # for the host's bookkeeping of this block.
            self._ahead = self._dispatch_ahead(sched, n_steps, tensors)
        else:
            result = self.runner.step(seqs, tensors, num_logprobs)
            t_dispatch = result.enqueue_s
            # numpy on the host, not an eager device op (one more compile per shape)
            out, logits = jax.tree.map(lambda a: np.asarray(a)[None], result.sample), \
                result.logits
        # The one host sync: the sampled tokens decide what runs next.
        tokens = np.asarray(out.tokens)  # [n_steps, rows]
        t2 = time.perf_counter()
        # Python lists, one per row (its value at each step): each row's share of the block is
        # applied at once below, and numpy scalar indexing costs microseconds each at ~1000
        # rows x 8 steps per block
        tokens = tokens.T.tolist()
        lps = np.asarray(out.logprobs).T.tolist()
        if out.top_ids.shape[-1]:
            top_ids, top_lps = (np.swapaxes(np.asarray(a), 0, 1).tolist()
                                for a in (out.top_ids, out.top_logprobs))
        else:  # no top-N asked for: one shared row of empty lists, not ~8000 new ones
            top_ids = top_lps = [[[]] * n_steps] * len(tokens)
        if logits is not None:
            self._prompt_logprobs(sched, seqs, result)
        scheduled, by_seq = sched.scheduled, self._by_seq
        touched: dict[str, _Request] = {}
        prompt_tokens = 0
        for ss in scheduled:
            entry = by_seq.get(ss.seq.request_id)
            if entry is not None:
                req = entry[0]
                touched[req.request_id] = req
                if ss.start_pos < len(req.prompt_ids):
                    prompt_tokens += min(ss.end_pos, len(req.prompt_ids)) - ss.start_pos
        self.stats["prompt_tokens"] += prompt_tokens
        # rows whose work counts (not aborted since they were scheduled)
        rows = self.scheduler.live_rows(sched)
        new_tokens = []  # per row of `rows`: the tokens it keeps
        finished = []  # (tokens kept, row, request, sample) of the rows that finish here
        now = time.monotonic()
        for i in rows:
            ss = scheduled[i]
            if not ss.is_last_chunk:  # a prompt chunk before the last: no token
                new_tokens.append([])
                continue
            req, sample = by_seq[ss.seq.request_id]
            if "first_token_time" not in req.metrics:
                req.metrics["first_token_time"] = now
            kept = self._append(req, sample, tokens[i], lps[i], top_ids[i], top_lps[i])
            new_tokens.append(kept)
            if sample.out.finish_reason is not None:
                finished.append((len(kept), i, req, sample))
        self.scheduler.update_block(sched, rows, new_tokens)
        self.stats["generation_tokens"] += sum(map(len, new_tokens))
        # Release finished rows in the order one step at a time would (by step, then row): the
        # order their pages return to the free and prefix-cache lists.
        finished.sort(key=lambda f: f[:2])
        for _, _, _, sample in finished:
            self.scheduler.finish(sample.seq, sample.out.finish_reason)
        outputs = []
        for req in touched.values():
            if req.held and req.samples[0].out.token_ids:  # the prompt's pages are cached now
                for seq in req.held:
                    self.scheduler.add(seq)
                req.held = []
        for req in touched.values():
            if finished_only and any(s.out.finish_reason is None for s in req.samples):
                continue
            out = req.output()
            if out.finished:
                out.metrics["finished_time"] = time.monotonic()
                self._requests.pop(req.request_id, None)
                for s in req.samples:
                    self._by_seq.pop(s.seq.request_id, None)
            outputs.append(out)
        self.stats["steps"] += n_steps
        t3 = time.perf_counter()
        host = (t1 - t0) + (t3 - t2)
        self.stats["host_time"] += host
        kind = self.stats["step_kinds"].setdefault(_step_kind(sched, n_steps), [0, 0.0, 0.0, 0.0])
        kind[0] += 1
        kind[1] += t3 - t0
        kind[2] += host
        kind[3] += t_dispatch
        return outputs

    def _decode_block(self, sched: SchedulerOutput) -> int:
        """How many decode steps to run in one compiled call: `decode_steps` when every
        scheduled sequence is a plain decode; else 1. A sequence that reaches its length limit
        inside the block runs only its remaining steps (`_steps_left`); stops (EOS, stop
        strings) inside a block are found afterwards and the extra tokens dropped. A waiting
        request holds blocks back only when it could start now (see `_reserve`)."""
        n = self.decode_steps
        if n <= 1:
            return 1
        # from the end: a step's prompt chunks follow its decodes (Scheduler.schedule), so a
        # mixed step of ~1000 decodes is told apart at once
        for ss in reversed(sched.scheduled):
            seq, p = ss.seq, ss.seq.sampling_params
            if (ss.num_new_tokens != 1 or not ss.is_last_chunk
                    or seq.num_output_tokens < p.min_tokens
                    or p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                    or p.frequency_penalty != 0.0):
                return 1
        return n if self._reserve(sched, n) else 1

    def _steps_left(self, seq: Sequence) -> int:
        """Decode steps seq may still run before it finishes by length."""
        return self.scheduler.max_total_tokens(seq) - seq.num_tokens

    def _reserve(self, sched: SchedulerOutput, tokens: int) -> bool:
        """Allocate pages for up to `tokens` more tokens of every scheduled decode (each
        capped by its `_steps_left`), if a block of them may run: no waiting request could
        start now (it would wait a whole block), and the pages exist for everyone at once (not
        each on its own)."""
        sched_, bm = self.scheduler, self.block_manager
        if sched_.can_admit_next():
            return False
        # one pass computes each row's growth and pages; only rows that need a page allocate
        grow, pages = [], 0
        for ss in sched.scheduled:
            seq = ss.seq
            g = min(tokens, self._steps_left(seq))
            need = bm.num_new_pages_needed(seq, g)
            if need:
                grow.append((seq, g))
                pages += need
        if pages > bm.num_free_pages:
            return False
        for seq, g in grow:
            bm.allocate(seq, g)
        return True

    def _dispatch_ahead(self, sched: SchedulerOutput, n: int, tensors: SamplingTensors):
        """Dispatch the decode block after `sched`'s (not yet read) block of n steps, fed by its
        last tokens on the device; returns (its SchedulerOutput, its SampleOutput, its
        SamplingTensors) or None. `tensors`: those of `sched`'s block.

        Only when the next step would be the same block anyway: every sequence still running,
        one at least with steps left after this block, no waiting request that could start,
        pages for both blocks (rows that reach their length limit stop writing where they do,
        see `_prepare`). A sequence that stops (EOS, stop string) or is aborted in
        the first block wastes its row of the second, whose tokens `Scheduler.live_rows` drops;
        its pages may go to another sequence, whose writes the device orders after this
        block's."""
        if not self.async_decode or any(
                ss.seq.status is not SequenceStatus.RUNNING
                or ss.seq.num_computed_tokens != ss.start_pos for ss in sched.scheduled):
            return None
        if all(self._steps_left(ss.seq) <= n for ss in sched.scheduled):
            return None  # everyone finishes by length in this block
        if not self._reserve(sched, 2 * n):  # both blocks: this one's tokens are not read yet
            return None
        nxt = SchedulerOutput([ScheduledSeq(ss.seq, 1, ss.start_pos + n, True)
                               for ss in sched.scheduled])
        seqs, tensors, num_logprobs = self._prepare(nxt, ahead=n, block=n, rows_of=tensors)
        out = self.runner.decode_steps(seqs, tensors, n, num_logprobs, continue_previous=True)
        self.stats["blocks_ahead"] += 1
        return nxt, out, tensors

    def _prepare(self, sched: SchedulerOutput, ahead: int = 0, block: int = 0,
                 rows_of: SamplingTensors | None = None):
        """StepSeqs + sampling tensors of a step; `block` > 1: a decode block of that many
        steps, `ahead` steps after the block whose tokens are not read yet. `rows_of`: the
        sampling tensors of a step over the same sequences in the same order (the block a
        dispatched-ahead one follows): only their `step` column changes."""
        seqs, params, seeds, steps = [], [], [], []
        num_logprobs = 0
        by_seq, max_total = self._by_seq, self.scheduler.max_total_tokens
        vocab = self.runner.cfg.vocab_size
        for ss in sched.scheduled:  # ~1000 rows: lengths read once per row, no helpers
            seq = ss.seq
            p: SamplingParams = seq.sampling_params
            n_prompt, n_out = len(seq.prompt_token_ids), len(seq.output_token_ids)
            banned = ()
            if n_out < p.min_tokens:  # ids outside the vocabulary cannot be sampled anyway
                banned = tuple(t for t in self.eos_token_ids | set(p.stop_token_ids or ())
                               if t < vocab)
            penalties = (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
                         or p.frequency_penalty != 0.0)
            wants_logits = seq.max_cached_tokens is not None and ss.start_pos < n_prompt
            ids = _AHEAD_IDS if ahead else seq.token_ids_slice(
                ss.start_pos, ss.start_pos + ss.num_new_tokens)
            row_steps = None
            if block > 1:  # rows that reach their length limit inside the block stop there
                row_steps = max(0, min(block, max_total(seq) - n_prompt - n_out - ahead))
            seqs.append(StepSeq(ids, ss.start_pos,
                                seq.page_ids, all_logits=wants_logits,
                                history=seq.all_token_ids if penalties else None,
                                prompt_len=n_prompt, banned=banned,
                                steps=row_steps))
            params.append(p)
            seeds.append(by_seq[seq.request_id][1].seed)
            steps.append(n_out + ahead)
            if p.logprobs and p.logprobs > num_logprobs:
                num_logprobs = p.logprobs
        if rows_of is not None:  # from_params costs ~1 ms at ~1000 rows
            tensors = dataclasses.replace(rows_of, step=np.asarray(steps, np.int32))
        else:
            tensors = SamplingTensors.from_params(params, seeds, steps)
        # One program per power of two of top-N, so a request asking for 3 reuses the 4 one.
        return seqs, tensors, bucket(num_logprobs) if num_logprobs else 0

    def _prompt_logprobs(self, sched: SchedulerOutput, seqs: list[StepSeq], result) -> None:
        """Log-probabilities of prompt tokens from this step's logits (prompt chunks only)."""
        logits = None  # fetched once, on the first chunk that needs it
        for i, ss in enumerate(sched.scheduled):
            if not seqs[i].all_logits:
                continue
            req, sample = self._by_seq[ss.seq.request_id]
            if sample.index != 0 or req.prompt_logprobs is None:
                continue
            prompt = req.prompt_ids
            # row j predicts token start_pos + j + 1; keep the rows whose target is a prompt token
            n = min(ss.end_pos, len(prompt) - 1) - ss.start_pos
            if n <= 0:
                continue
            if logits is None:
                logits = np.asarray(result.logits)
            off = int(result.token_offsets[i])
            rows = logits[off:off + n].astype(np.float64)
            rows = rows - rows.max(-1, keepdims=True)
            rows = rows - np.log(np.exp(rows).sum(-1, keepdims=True))  # log-softmax
            targets = np.asarray(prompt[ss.start_pos + 1:ss.start_pos + 1 + n])
            k = req.params.prompt_logprobs or 0
            lp = rows[np.arange(n), targets]
            if k:
                top_i = np.argsort(-rows, axis=-1)[:, :k]
                top_v = np.take_along_axis(rows, top_i, axis=-1)
            # positions a prefix hit skipped (only possible before score_from) stay None; a
            # chunk recomputed after preemption replaces what it wrote the first time
            del req.prompt_logprobs[ss.start_pos + 1:]
            while len(req.prompt_logprobs) < ss.start_pos + 1:
                req.prompt_logprobs.append(None)
            for j in range(n):
                entry = {int(targets[j]): float(lp[j])}
                if k:
                    entry.update({int(a): float(b) for a, b in zip(top_i[j], top_v[j])})
                req.prompt_logprobs.append(entry)

    def _append(self, req: _Request, sample: _Sample, toks: list[int], lps: list[float],
                top_ids: list[list[int]], top_lps: list[list[float]]) -> list[int]:
        """Append a row's sampled tokens (its token of each step, in order) to the sample's
        output, up to the one that finishes it; returns the tokens kept. A finished sample gets
        its finish_reason here; the caller releases its sequence (the scheduler has not seen
        these tokens yet: `seq` holds the tokens before them)."""
        p: SamplingParams = req.params
        out, seq = sample.out, sample.seq
        n_out = len(out.token_ids)
        # A length limit ends the row at a known token: the one that reaches max_tokens, or
        # the most tokens the sequence may hold.
        left = self.scheduler.max_total_tokens(seq) - seq.num_tokens
        if p.max_tokens is not None and p.max_tokens - n_out < left:
            left = p.max_tokens - n_out
        m = max(1, min(len(toks), left))  # tokens kept
        reason, stop = None, None
        first = max(0, p.min_tokens - n_out - 1)  # the first token that may stop the row
        eos = () if p.ignore_eos else self.eos_token_ids
        stop_ids = p.stop_token_ids
        if eos or stop_ids:
            for j in range(first, m):
                t = toks[j]
                if t in eos:
                    reason, m = "stop", j + 1
                    break
                if stop_ids and t in stop_ids:
                    reason, stop, m = "stop", t, j + 1
                    break
        if sample.detok is not None:
            for j in range(m):
                delta = sample.detok.add(toks[j])
                sample.text += delta
                # a stop token at the same position wins over a stop string
                if p.stop and delta and j >= first and (reason is None or j < m - 1):
                    found, s = self._check_stop_strings(sample, p, len(delta))
                    if found is not None:
                        reason, stop, m = found, s, j + 1
                        break
            out.text = sample.text
        kept = toks if m == len(toks) else toks[:m]
        out.token_ids.extend(kept)
        cumulative = out.cumulative_logprob
        for lp in lps[:m]:  # one addition per token, in order: the same sum as token by token
            cumulative += lp
        out.cumulative_logprob = cumulative
        if out.logprobs is not None:
            for j in range(m):
                entry = {toks[j]: float(lps[j])}
                entry.update({int(a): float(b) for a, b in zip(top_ids[j][:p.logprobs],
                                                               top_lps[j])})
                out.logprobs.append(entry)
        if reason is None and m >= left:
            reason = "length"
        if reason is not None:
            out.finish_reason, out.stop_reason = reason, stop
            if sample.detok is not None and not isinstance(stop, str):
                # emit a held-back partial character; a stop string already cut the text
                out.text = sample.text = sample.text + sample.detok.flush()
        return kept

    @staticmethod
    def _check_stop_strings(sample: _Sample, p: SamplingParams, delta_len: int):
        text = sample.text
        for stop in p.stop:
            # only the new text (and what a stop string could straddle) needs searching
            start = max(0, len(text) - delta_len - len(stop) + 1)
            idx = text.find(stop, start)
            if idx >= 0:
                end = idx + len(stop) if p.include_stop_str_in_output else idx
                sample.out.text = sample.text = text[:end]
                return "stop", stop
        return None, None


def _step_kind(sched: SchedulerOutput, n_steps: int) -> str:
    if n_steps > 1:
        return "decode_block"
    decodes = sum(ss.num_new_tokens == 1 and ss.start_pos >= ss.seq.num_prompt_tokens
                  for ss in sched.scheduled)
    if decodes == len(sched.scheduled):
        return "decode"
    return "mixed" if decodes else "prompt"
