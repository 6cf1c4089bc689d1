"""Continuous-batching scheduler: which sequences run this step, and how many tokens each.

Each `schedule()` builds one flat, ragged step under a token budget (max_num_batched_tokens):

  1. running sequences with exactly one uncomputed token (decodes), oldest first, 1 token each;
  2. running sequences still prefilling (chunked prefill), oldest first;
  3. waiting sequences (FCFS), after attaching their cached prefix pages.

Prefills are chunked: a prompt longer than the remaining budget (or than
long_prefill_token_threshold) is split across steps, so decodes keep flowing while a long prompt
is being prefilled. Decodes go first because each costs one token and stalls a user if skipped.

Memory pressure is resolved by preemption-by-recompute: when a running sequence needs a page and
none is free, the newest running sequence loses its pages and goes back to the FRONT of the
waiting queue (its generated tokens are kept, its next prefill recomputes prompt + output). The
oldest request therefore always makes progress, and since `add` rejects any request that could
not fit the pool on its own, scheduling never fails and never deadlocks.

The scheduler never decides that a sequence is finished (stop ids, stop strings, max_tokens are
the engine's call); it provides `finish(seq, reason)` to release it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from imp_jax.engine.block_manager import BlockManager
from imp_jax.engine.sequence import Sequence, SequenceStatus


KV_ADMISSION = ("optimistic", "reserve")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step: all_token_ids[start_pos:start_pos+n]
    start_pos: int  # == seq.num_computed_tokens when scheduled
    is_last_chunk: bool  # this step computes the seq's last token: sample from its logits

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_new_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # sent back to waiting this step

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def __len__(self) -> int:
        return len(self.scheduled)

    def __iter__(self):
        return iter(self.scheduled)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        long_prefill_token_threshold: int = 0,
        max_model_len: int | None = None,
        kv_admission: str = "optimistic",
    ) -> None:
        """long_prefill_token_threshold: cap on one sequence's prefill chunk per step
        (0 = only the step budget caps it). max_model_len: longest allowed sequence
        (prompt + generated); None = only the page pool limits it.

        kv_admission: "optimistic" (vLLM's policy) admits a request when its first chunk's
        pages are free, and preempts when running sequences outgrow the pool; "reserve"
        (TensorRT-LLM's guaranteed-no-evict) admits it only when the pages every running
        sequence and it can still grow into (each up to `max_total_tokens`) fit the pool, so
        nothing is ever preempted. "reserve" suits offline jobs with known max_tokens (long
        outputs under "optimistic" preempt and recompute, e.g. 1000 in / 1000 out)."""
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < max_num_seqs:
            # Otherwise a full batch of decodes could not fit one step, and some running
            # sequence would starve.
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({max_num_seqs})"
            )
        if kv_admission not in KV_ADMISSION:
            raise ValueError(f"kv_admission must be one of {KV_ADMISSION}, got {kv_admission!r}")
        if long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {long_prefill_token_threshold}")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.max_model_len = max_model_len
        self.kv_admission = kv_admission
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: index 0 oldest
        self._live: dict[str, Sequence] = {}  # request_id -> unfinished sequence
        self._max_total: dict[str, int] = {}  # request_id -> max_total_tokens, while live
        self.num_preemptions = 0

    # ------------------------------------------------------------------ requests
    @property
    def context_limit(self) -> int:
        """The most tokens one sequence may hold: the context (max_model_len), and the page
        pool if it holds fewer."""
        limit = self.bm.capacity_tokens
        return limit if self.max_model_len is None else min(limit, self.max_model_len)

    def max_total_tokens(self, seq: Sequence) -> int:
        """Most tokens (prompt + output) seq may reach: the engine must finish it by then.

        max_tokens=None means "until the context is full": the context is max_model_len,
        and never more than the page pool can hold for one sequence.
        """
        limit = self._max_total.get(seq.request_id)
        if limit is not None:  # asked per row per step: kept while the request is live
            return limit
        limit = self.context_limit
        if seq.max_tokens is not None:
            limit = min(limit, seq.num_prompt_tokens + seq.max_tokens)
        if seq.request_id in self._live:
            self._max_total[seq.request_id] = limit
        return limit

    def check_fits(self, seq: Sequence) -> None:
        n_prompt = seq.num_prompt_tokens
        need = n_prompt + (seq.max_tokens if seq.max_tokens is not None else 1)
        what = (
            f"prompt ({n_prompt} tokens) + max_tokens ({seq.max_tokens})"
            if seq.max_tokens is not None
            else f"prompt ({n_prompt} tokens) + 1 generated token"
        )
        if self.max_model_len is not None and need > self.max_model_len:
            raise ValueError(
                f"request {seq.request_id!r}: {what} = {need} exceeds max_model_len ({self.max_model_len})"
            )
        cap = self.bm.capacity_tokens
        if need > cap:
            raise ValueError(
                f"request {seq.request_id!r}: {what} = {need} exceeds the KV cache capacity "
                f"({cap} tokens = {self.bm.num_usable_pages} pages x {self.bm.page_size})"
            )

    def add(self, seq: Sequence) -> None:
        """Queue a new request. ValueError if it could never be served."""
        if seq.request_id in self._live:
            raise ValueError(f"request id {seq.request_id!r} is already in flight")
        if seq.status is not SequenceStatus.WAITING or seq.page_ids:
            raise ValueError(f"can only add a fresh WAITING sequence: {seq!r}")
        self.check_fits(seq)
        self._live[seq.request_id] = seq
        self.waiting.append(seq)

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Start child (from `parent.fork(id)`) sharing parent's KV pages; for n>1 samples.

        Returns the (src, dst) page copy the engine must do before the next step, or None.
        If the batch is full or no page is free for the copy, the child is queued at the front
        of waiting instead (it will be prefilled, mostly from the prefix cache) and None is
        returned.
        """
        if parent.status is not SequenceStatus.RUNNING:
            raise ValueError(f"fork parent must be running: {parent!r}")
        if child.request_id in self._live:
            raise ValueError(f"request id {child.request_id!r} is already in flight")
        if child.status is not SequenceStatus.WAITING or child.page_ids:
            raise ValueError(f"fork child must be a fresh sequence: {child!r}")
        self.check_fits(child)
        copy = None
        if len(self.running) < self.max_num_seqs and self.bm.can_fork(parent):
            copy = self.bm.fork(parent, child)  # validates child's tokens; raises before any change
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
        else:
            self.waiting.appendleft(child)
        self._live[child.request_id] = child
        return copy

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; False if unknown or already finished."""
        seq = self._live.get(request_id)
        if seq is None:
            return False
        self.finish(seq, "abort")
        return True

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark seq finished (reason: "stop", "length", "abort", ...) and free its pages."""
        if self._live.pop(seq.request_id, None) is not seq:
            raise ValueError(f"{seq.request_id!r} is not an unfinished request of this scheduler")
        self._max_total.pop(seq.request_id, None)
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def has_unfinished(self) -> bool:
        return bool(self._live)

    @property
    def num_unfinished(self) -> int:
        return len(self._live)

    def get(self, request_id: str) -> Sequence | None:
        return self._live.get(request_id)

    # ------------------------------------------------------------------ admission
    def _final_pages(self, seq: Sequence) -> int:
        """Pages seq holds once it reaches max_total_tokens (no prefix sharing assumed)."""
        return -(-self.max_total_tokens(seq) // self.bm.page_size)

    def _reserved_pages(self) -> int:
        """"reserve" admission: pages the running sequences may still grow into, plus those
        they hold (their final size)."""
        return sum(self._final_pages(s) for s in self.running)

    def _reserve_allows(self, seq: Sequence, reserved: int) -> bool:
        return (self.kv_admission != "reserve" or not self.running
                or reserved + self._final_pages(seq) <= self.bm.num_usable_pages)

    def _first_chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens an admitted request computes in its first step."""
        n = min(seq.num_uncomputed_tokens, budget)
        if self.long_prefill_token_threshold:
            n = min(n, self.long_prefill_token_threshold)
        return n

    def can_admit_next(self) -> bool:
        """Whether the next schedule() would admit the head of the waiting queue (a batch row,
        its first chunk's pages, and the reserve policy); the engine only holds decode blocks
        back for a request that can actually start."""
        if not self.waiting or len(self.running) >= self.max_num_seqs:
            return False
        seq = self.waiting[0]
        n = self._first_chunk(seq, self.max_num_batched_tokens)
        need = -(-(seq.num_computed_tokens + n) // self.bm.page_size) - len(seq.page_ids)
        if need > self.bm.num_free_pages:
            return False
        return self.kv_admission != "reserve" or self._reserve_allows(seq, self._reserved_pages())

    # ------------------------------------------------------------------ scheduling
    def requeue_all(self) -> int:
        """Preempt every running sequence (newest first to the front, so FCFS order holds):
        used after the device lost the KV cache. Returns how many were requeued."""
        victims = list(self.running)
        for victim in reversed(victims):
            self.running.remove(victim)
            self.bm.free(victim)
            victim.reset_for_recompute()
            self.waiting.appendleft(victim)
        self.num_preemptions += len(victims)
        return len(victims)

    def _preempt(self, victim: Sequence, out: SchedulerOutput, scheduled: dict[str, ScheduledSeq]) -> None:
        self.running.remove(victim)
        ss = scheduled.pop(victim.request_id, None)
        if ss is not None:  # it was scheduled earlier this step: take it back
            out.scheduled.remove(ss)
        self.bm.free(victim)
        victim.reset_for_recompute()
        self.waiting.appendleft(victim)
        out.preempted.append(victim)
        self.num_preemptions += 1

    def _schedule_running(self, budget: int, out: SchedulerOutput,
                          scheduled: dict[str, ScheduledSeq]) -> int:
        """Decodes (1 token each, oldest first), then prefill chunks of the running sequences;
        returns the budget left. One pass sorts the running list, since at ~1000 rows this is
        per-step host time the device waits for in mixed steps."""
        prefills = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            remaining = seq.num_uncomputed_tokens
            assert remaining >= 1, f"running sequence with nothing to compute: {seq!r}"
            if remaining > 1:
                prefills.append(seq)
            elif budget <= 0:
                break
            else:
                budget = self._take(seq, 1, budget, out, scheduled)
            i += 1  # a preempted seq was the newest (the last): the loop ends either way
        for seq in prefills:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted by an earlier sequence of this step
            n = min(seq.num_uncomputed_tokens, budget)
            if self.long_prefill_token_threshold:
                n = min(n, self.long_prefill_token_threshold)
            if n <= 0:
                break
            budget = self._take(seq, n, budget, out, scheduled)
        return budget

    def _take(self, seq: Sequence, n: int, budget: int, out: SchedulerOutput,
              scheduled: dict[str, ScheduledSeq]) -> int:
        """Schedule n tokens of running seq, first finding its pages: a prefill chunk shrinks
        to what fits in its pages plus the free ones; a decode (n = 1, fit 0) preempts the
        newest running sequences, seq itself last. Returns the budget left."""
        bm = self.bm
        if bm.num_new_pages_needed(seq, n):
            while not bm.can_allocate(seq, n):
                fit = (len(seq.page_ids) + bm.num_free_pages) * bm.page_size \
                    - seq.num_computed_tokens
                if fit > 0:
                    n = min(n, fit)
                    continue
                victim = self.running[-1]  # newest; seq itself when seq is the newest
                if ss := scheduled.get(victim.request_id):
                    budget += ss.num_new_tokens
                self._preempt(victim, out, scheduled)
                if victim is seq:
                    return budget
            bm.allocate(seq, n)
        start = seq.num_computed_tokens
        ss = ScheduledSeq(seq, n, start, start + n == seq.num_tokens)
        out.scheduled.append(ss)
        scheduled[seq.request_id] = ss
        return budget - n

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        scheduled: dict[str, ScheduledSeq] = {}
        budget = self.max_num_batched_tokens
        budget = self._schedule_running(budget, out, scheduled)

        # Admit waiting requests only if nothing was preempted this step: memory is tight, and
        # admitting would just preempt again next step (thrashing).
        reserved = self._reserved_pages() if self.kv_admission == "reserve" else 0
        while not out.preempted and self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if not self._reserve_allows(seq, reserved):
                break  # FCFS: nobody jumps the queue
            cached = self.bm.match_prefix(seq, record_stats=False)
            n = self._first_chunk(seq, budget)
            if not self.bm.can_allocate(seq, n):
                self.bm.free(seq)  # undo the prefix attach; FCFS: nobody jumps the queue
                seq.num_cached_tokens = 0
                break
            self.bm.record_prefix_query(seq.num_tokens, cached)
            self.bm.allocate(seq, n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            reserved += self._final_pages(seq)
            ss = ScheduledSeq(seq, n, seq.num_computed_tokens, seq.num_computed_tokens + n == seq.num_tokens)
            out.scheduled.append(ss)
            scheduled[seq.request_id] = ss
            budget -= n
        return out

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Sequence]:
        """Apply a computed step: advance computed tokens, append sampled tokens.

        `sampled` maps request_id -> token for every scheduled seq with is_last_chunk (extra
        entries are ignored). Returns the sequences that got a new token, in batch order; the
        caller checks each for stop conditions and calls `finish`.
        """
        rows = self.live_rows(output)
        new_tokens = [[int(sampled[output.scheduled[i].seq.request_id])]
                      if output.scheduled[i].is_last_chunk else [] for i in rows]
        self.update_block(output, rows, new_tokens)
        return [output.scheduled[i].seq for i, t in zip(rows, new_tokens) if t]

    def live_rows(self, output: SchedulerOutput) -> list[int]:
        """Indices of the rows of `output` whose work still counts: a sequence aborted (or
        otherwise released) after schedule() is skipped, its work is moot."""
        running = SequenceStatus.RUNNING
        return [i for i, ss in enumerate(output.scheduled)
                if ss.seq.status is running and ss.seq.num_computed_tokens == ss.start_pos]

    def update_block(self, output: SchedulerOutput, rows: list[int],
                     new_tokens: list[list[int]]) -> None:
        """Apply a computed step, or a block of decode steps, to `rows` (from `live_rows`):
        rows[j] computed its scheduled tokens and then len(new_tokens[j]) - 1 more decode
        steps, and got new_tokens[j] (its token of each step; none for a prompt chunk before
        the last). The engine decides how many of a block's tokens a row keeps (it stops at
        the one that finishes it), and finishes it afterwards.

        One pass per row, not per row per step (~1000 rows x 8 steps per block). Pages are
        still registered in the prefix cache in the order the steps filled them (a block's
        later steps after every row's first), as one `update` per step would: when two rows
        fill identical pages, the same one is cached."""
        bm = self.bm
        ps = bm.page_size
        caching = bm.enable_prefix_caching
        commit = bm.commit_computed
        later = []  # (step, row, seq, computed tokens then): pages a block's later steps filled
        scheduled = output.scheduled
        for i, toks in zip(rows, new_tokens):
            ss = scheduled[i]
            seq = ss.seq
            first = ss.start_pos + ss.num_new_tokens  # computed after the first step
            m = len(toks)
            seq.num_computed_tokens = first + m - 1 if m > 1 else first
            if m:
                seq.output_token_ids.extend(toks)
            if caching:
                if first // ps > len(seq.block_hashes):  # a page is full after the first step
                    commit(seq, first)
                # steps k = 1 .. m-1 each compute one token: a page fills where first + k is a
                # multiple of the page size
                for k in range(-first % ps or ps, m, ps):
                    later.append((k, i, seq, first + k))
        later.sort(key=lambda e: e[:2])
        for _, _, seq, n in later:
            commit(seq, n)
