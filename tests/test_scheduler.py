"""Scheduler: token budget, chunked prefill, preemption, fork, abort, admission checks.

A fake model drives it: every scheduled token writes its id into a fake KV store at its slot,
every sequence then reads its whole context back through its page table (so page sharing,
prefix hits and preemption are checked end to end), and "sampling" is a deterministic function
of (request_id, output index), so the final outputs are known exactly even across preemptions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imp_jax.engine import (BlockManager, ScheduledSeq, Scheduler, SchedulerOutput, Sequence,
                             SequenceStatus)


@dataclass
class Params:  # stands in for SamplingParams: the scheduler only reads .max_tokens
    max_tokens: int | None = 8


def fake_token(request_id: str, index: int) -> int:
    return (sum(map(ord, request_id)) * 31 + index * 7) % 97


class Driver:
    def __init__(self, sched: Scheduler) -> None:
        self.s = sched
        self.bm = sched.bm
        self.ps = sched.bm.page_size
        self.kv: dict[int, list[int | None]] = {}
        self.finished: list[Sequence] = []
        self.steps = 0
        self.outputs: list[SchedulerOutput] = []

    def add(self, rid: str, prompt: list[int], max_tokens: int | None) -> Sequence:
        seq = Sequence(rid, prompt, Params(max_tokens))
        self.s.add(seq)
        return seq

    def step(self) -> SchedulerOutput:
        s, ps = self.s, self.ps
        out = s.schedule()
        self.steps += 1
        self.outputs.append(out)
        # ---- shape of the step
        assert out.num_batched_tokens <= s.max_num_batched_tokens
        assert len(out.scheduled) <= s.max_num_seqs
        ids = [ss.seq.request_id for ss in out.scheduled]
        assert len(ids) == len(set(ids)), "sequence scheduled twice in one step"
        for victim in out.preempted:
            assert victim.request_id not in ids and victim.status is SequenceStatus.WAITING
        for ss in out.scheduled:
            seq = ss.seq
            assert seq.status is SequenceStatus.RUNNING and seq in s.running
            assert ss.num_new_tokens >= 1 and ss.start_pos == seq.num_computed_tokens
            assert ss.is_last_chunk == (ss.end_pos == seq.num_tokens)
            assert len(seq.page_ids) * ps >= ss.end_pos
            if ss.num_new_tokens > 1 and s.long_prefill_token_threshold:
                assert ss.num_new_tokens <= s.long_prefill_token_threshold
        # ---- fake forward pass: write KV, then read the whole context back
        for ss in out.scheduled:
            seq, toks = ss.seq, ss.seq.all_token_ids
            for pos in range(ss.start_pos, ss.end_pos):
                self.kv.setdefault(seq.page_ids[pos // ps], [None] * ps)[pos % ps] = toks[pos]
        for ss in out.scheduled:
            seq, toks = ss.seq, ss.seq.all_token_ids
            for pos in range(ss.end_pos):
                assert self.kv[seq.page_ids[pos // ps]][pos % ps] == toks[pos], (seq, pos)
        sampled = {
            ss.seq.request_id: fake_token(ss.seq.request_id, ss.seq.num_output_tokens)
            for ss in out.scheduled
            if ss.is_last_chunk
        }
        grew = s.update(out, sampled)
        assert [q.request_id for q in grew] == list(sampled)
        for seq in grew:  # the engine's finish check
            if seq.num_tokens >= s.max_total_tokens(seq):
                s.finish(seq, "length")
                self.finished.append(seq)
        # ---- global invariants
        live = s.running + list(s.waiting)
        assert len(live) == s.num_unfinished
        assert all(not q.page_ids and q.num_computed_tokens == 0 for q in s.waiting)
        assert all(q.status is SequenceStatus.WAITING for q in s.waiting)
        self.bm.check_invariants(live)
        return out

    def run(self, max_steps: int = 100_000) -> None:
        while self.s.has_unfinished():
            assert self.steps < max_steps, "no progress"
            self.step()

    def check_done(self, seqs: list[Sequence]) -> None:
        """Every request finished exactly once with the exact expected output."""
        ids = [q.request_id for q in self.finished]
        assert len(ids) == len(set(ids))
        for q in seqs:
            assert q.status is SequenceStatus.FINISHED
            if q.finish_reason == "length":
                assert ids.count(q.request_id) == 1
                assert q.num_output_tokens == q.max_tokens
                assert q.output_token_ids == [fake_token(q.request_id, i) for i in range(q.max_tokens)]
        assert not self.s.running and not self.s.waiting and not self.s.has_unfinished()
        self.bm.check_invariants([])
        assert self.bm.num_used_pages == 0
        assert self.bm.num_free_pages == self.bm.num_usable_pages


def make(num_pages=64, page_size=4, max_num_seqs=8, budget=32, threshold=0, max_model_len=None, caching=True,
         kv_admission="optimistic"):
    bm = BlockManager(num_pages, page_size, enable_prefix_caching=caching)
    return Driver(Scheduler(bm, max_num_seqs, budget, threshold, max_model_len, kv_admission))


# ------------------------------------------------------------------ budget and chunking


def test_chunked_prefill_splits_long_prompt() -> None:
    d = make(budget=16)
    seq = d.add("long", list(range(50)), 2)
    chunks = []
    while seq.num_output_tokens == 0:
        out = d.step()
        (ss,) = out.scheduled
        chunks.append((ss.start_pos, ss.num_new_tokens, ss.is_last_chunk))
    assert chunks == [(0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True)]
    d.run()
    d.check_done([seq])


def test_long_prefill_threshold_caps_chunk() -> None:
    d = make(budget=64, threshold=8)
    seq = d.add("long", list(range(20)), 1)
    assert [ss.num_new_tokens for ss in d.step().scheduled] == [8]
    assert [ss.num_new_tokens for ss in d.step().scheduled] == [8]
    assert [ss.num_new_tokens for ss in d.step().scheduled] == [4]
    d.run()
    d.check_done([seq])


def test_budget_shared_by_several_prompts() -> None:
    d = make(budget=20)
    seqs = [d.add(f"r{i}", [i] * 12, 3) for i in range(3)]
    out = d.step()
    assert [(ss.seq.request_id, ss.num_new_tokens) for ss in out.scheduled] == [("r0", 12), ("r1", 8)]
    out = d.step()  # r0 decodes first, then r1 continues, then r2 is admitted with what is left
    assert [(ss.seq.request_id, ss.num_new_tokens) for ss in out.scheduled] == [
        ("r0", 1),
        ("r1", 4),
        ("r2", 12),
    ]
    d.run()
    d.check_done(seqs)


def test_decodes_keep_flowing_during_long_prefill() -> None:
    d = make(num_pages=128, budget=32)
    short = [d.add(f"s{i}", [i, i + 1, i + 2], 40) for i in range(2)]
    d.step()  # both short prompts prefilled
    long = d.add("long", list(range(300)), 1)
    prefill_steps = 0
    while long.num_output_tokens == 0:
        out = d.step()
        by_id = {ss.seq.request_id: ss for ss in out.scheduled}
        assert by_id["s0"].num_new_tokens == 1 and by_id["s1"].num_new_tokens == 1
        assert by_id["long"].num_new_tokens <= 30
        prefill_steps += 1
    assert prefill_steps == 10  # 300 tokens at 30 per step
    d.run()
    d.check_done(short + [long])


def test_max_num_seqs_respected() -> None:
    d = make(max_num_seqs=3, budget=64)
    seqs = [d.add(f"r{i}", [1, 2], 5) for i in range(7)]
    out = d.step()
    assert len(out.scheduled) == 3 and len(d.s.waiting) == 4
    d.run()
    assert max(len(o.scheduled) for o in d.outputs) == 3
    d.check_done(seqs)


# ------------------------------------------------------------------ memory pressure


def test_preemption_tiny_pool_all_finish_once() -> None:
    # 9 usable pages x 4 = 36 tokens; each request needs up to 10 + 20 = 30.
    d = make(num_pages=10, page_size=4, max_num_seqs=6, budget=64)
    seqs = [d.add(f"r{i}", [i] * 10, 20) for i in range(6)]
    d.run(max_steps=2000)
    assert d.s.num_preemptions > 0
    assert any(q.num_preemptions > 0 for q in seqs)
    d.check_done(seqs)


def test_reserve_admission_never_preempts() -> None:
    # The pool of the test above: "optimistic" preempts there; "reserve" admits a request only
    # while every running one can reach prompt + max_tokens (30 tokens = 8 pages of 4).
    d = make(num_pages=10, page_size=4, max_num_seqs=6, budget=64, kv_admission="reserve")
    seqs = [d.add(f"r{i}", [i] * 10, 20) for i in range(6)]
    peak = 0
    while d.s.has_unfinished():
        assert d.steps < 2000, "no progress"
        d.step()
        peak = max(peak, len(d.s.running))
        assert sum(d.s._final_pages(q) for q in d.s.running) <= d.bm.num_usable_pages
    assert d.s.num_preemptions == 0 and peak == 1  # 2 x 8 pages > 9: one at a time
    d.check_done(seqs)


def test_reserve_admission_runs_what_fits_together() -> None:
    d = make(num_pages=33, page_size=4, max_num_seqs=8, budget=64, kv_admission="reserve")
    seqs = [d.add(f"r{i}", [i] * 6, 10) for i in range(8)]  # 16 tokens = 4 pages each
    d.step()
    assert len(d.s.running) == 8 and d.s.can_admit_next() is False
    d.run()
    assert d.s.num_preemptions == 0
    d.check_done(seqs)
    with pytest.raises(ValueError, match="kv_admission must be one of"):
        make(kv_admission="greedy")


def test_can_admit_next_matches_schedule() -> None:
    d = make(num_pages=12, page_size=4, max_num_seqs=2, budget=16)
    assert not d.s.can_admit_next()  # nobody waiting
    d.add("a", [1] * 8, 4)
    assert d.s.can_admit_next()
    d.step()
    d.add("b", [2] * 8, 4)
    d.add("c", [3] * 8, 4)
    assert d.s.can_admit_next()  # a row and pages for b
    d.step()
    assert len(d.s.running) == 2 and not d.s.can_admit_next()  # the batch is full


def test_preempts_newest_and_requeues_at_front() -> None:
    d = make(num_pages=5, page_size=2, max_num_seqs=4, budget=16, caching=False)  # 8 tokens
    a = d.add("a", [1, 2, 3], 5)
    b = d.add("b", [4, 5, 6], 5)
    c = d.add("c", [7], 1)
    d.step()  # a: 2 pages, b: 2 pages, c waits (pool full)
    assert [q.request_id for q in d.s.running] == ["a", "b"] and list(d.s.waiting) == [c]
    d.step()  # a and b decode into their second pages' free slot
    out = d.step()  # a needs a third page: b (newest) is preempted
    assert out.preempted == [b] and [ss.seq for ss in out.scheduled] == [a]
    assert list(d.s.waiting) == [b, c]  # front of the queue, ahead of c
    assert b.num_output_tokens == 2 and b.num_computed_tokens == 0
    d.run()
    d.check_done([a, b, c])


def test_prefill_chunk_shrinks_to_free_pages_instead_of_preempting() -> None:
    d = make(num_pages=6, page_size=2, max_num_seqs=2, budget=8, threshold=4, caching=False)
    p = d.add("p", list(range(9)), 1)
    b = d.add("b", [1, 2, 3], 2)
    d.step()  # p: 4 tokens (2 pages), b: 3 tokens (2 pages); 1 page left
    out = d.step()
    assert {ss.seq.request_id: ss.num_new_tokens for ss in out.scheduled} == {"b": 1, "p": 2}
    assert not out.preempted
    d.run()
    d.check_done([p, b])


def test_preempted_request_recomputes_prompt_and_output() -> None:
    d = make(num_pages=5, page_size=2, max_num_seqs=4, budget=16, caching=False)
    a = d.add("a", [1, 2, 3], 5)
    b = d.add("b", [4, 5, 6], 5)
    for _ in range(3):
        d.step()
    assert b.status is SequenceStatus.WAITING and b.num_output_tokens == 2
    while b.status is not SequenceStatus.RUNNING:
        out = d.step()
    (ss,) = [ss for ss in out.scheduled if ss.seq is b]
    assert ss.start_pos == 0 and ss.num_new_tokens == 5 and ss.is_last_chunk  # 3 prompt + 2 out
    d.run()
    d.check_done([a, b])


def test_stress_1000_requests() -> None:
    rng = random.Random(1234)
    d = make(num_pages=48, page_size=8, max_num_seqs=16, budget=64, threshold=32, max_model_len=128)
    prefixes = [[rng.randrange(97) for _ in range(n)] for n in (0, 5, 16, 24)]
    pending = []
    for i in range(1000):
        prompt = rng.choice(prefixes) + [rng.randrange(97) for _ in range(rng.randint(1, 40))]
        pending.append((f"q{i}", prompt, rng.randint(1, 24)))
    seqs, aborted = [], set()
    while pending or d.s.has_unfinished():
        for _ in range(rng.randint(0, 4)):  # requests keep arriving between steps
            if pending:
                seqs.append(d.add(*pending.pop(0)))
        if rng.random() < 0.05 and d.s.has_unfinished():  # occasional client abort
            victim = rng.choice(d.s.running + list(d.s.waiting))
            assert d.s.abort(victim.request_id)
            assert not d.s.abort(victim.request_id)
            aborted.add(victim.request_id)
        d.step()
        assert d.steps < 20_000
    assert len(seqs) == 1000
    for q in seqs:
        assert (q.finish_reason == "abort") == (q.request_id in aborted)
    d.check_done(seqs)
    assert len(d.finished) + len(aborted) == 1000
    assert d.bm.prefix_cache_hits > 0 and d.s.num_preemptions > 0


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    num_pages=st.integers(6, 20),
    page_size=st.sampled_from([1, 2, 4]),
    max_num_seqs=st.integers(1, 6),
    extra_budget=st.integers(0, 20),
    threshold=st.sampled_from([0, 1, 3, 8]),
    caching=st.booleans(),
    reqs=st.lists(
        st.tuples(st.integers(0, 2), st.lists(st.integers(0, 3), min_size=1, max_size=12), st.integers(1, 10)),
        min_size=1,
        max_size=12,
    ),
)
def test_random_workloads_complete(num_pages, page_size, max_num_seqs, extra_budget, threshold, caching, reqs):
    d = make(num_pages, page_size, max_num_seqs, max_num_seqs + extra_budget, threshold, caching=caching)
    shared = [[], [9, 9, 9, 9, 9], [8, 7, 6, 5]]
    seqs = []
    for i, (pfx, suffix, max_tokens) in enumerate(reqs):
        try:
            seqs.append(d.add(f"r{i}", shared[pfx] + suffix, max_tokens))
        except ValueError:
            assert len(shared[pfx] + suffix) + max_tokens > d.bm.capacity_tokens
    d.run(max_steps=5000)
    d.check_done(seqs)


# ------------------------------------------------------------------ prefix cache, fork, abort


def test_prefix_hit_skips_cached_tokens() -> None:
    d = make(page_size=4)
    a = d.add("a", list(range(10)), 1)
    d.run()
    b = d.add("b", list(range(10)) + [5, 6], 1)
    (ss,) = d.step().scheduled
    assert ss.start_pos == 8 and ss.num_new_tokens == 4 and b.num_cached_tokens == 8
    assert d.bm.prefix_cache_hits == 8
    d.run()
    d.check_done([a, b])


def test_fork_shares_prompt_pages() -> None:
    d = make(page_size=4)
    parent = d.add("p", list(range(10)), 6)
    d.step()  # prefill; parent has its first token
    child = parent.fork("p-1")
    child.output_token_ids[-1] = fake_token("p-1", 0)  # the child's own first sample
    src, dst = d.s.fork(parent, child)
    d.kv[dst] = list(d.kv[src])  # the engine copies the partial page
    assert child.page_ids[:2] == parent.page_ids[:2] and d.bm.refcount(parent.page_ids[0]) == 2
    out = d.step()
    assert {ss.seq.request_id: ss.num_new_tokens for ss in out.scheduled} == {"p": 1, "p-1": 1}
    d.run()
    d.check_done([parent, child])


def test_fork_when_batch_full_queues_child() -> None:
    d = make(page_size=4, max_num_seqs=1, budget=8)
    parent = d.add("p", list(range(6)), 4)
    d.step()
    child = parent.fork("p-1")
    child.output_token_ids[-1] = fake_token("p-1", 0)
    assert d.s.fork(parent, child) is None
    assert list(d.s.waiting) == [child] and child.status is SequenceStatus.WAITING
    with pytest.raises(ValueError, match="already in flight"):
        d.s.fork(parent, parent.fork("p-1"))
    d.run()
    d.check_done([parent, child])


def test_abort_waiting_and_running() -> None:
    d = make(max_num_seqs=1)
    a = d.add("a", [1, 2, 3], 4)
    b = d.add("b", [4, 5], 4)
    d.step()
    assert d.s.abort("b") and b.finish_reason == "abort" and b.status is SequenceStatus.FINISHED
    assert d.s.abort("a") and not a.page_ids
    assert not d.s.abort("a") and not d.s.abort("nope")
    assert not d.s.has_unfinished() and d.bm.num_used_pages == 0
    assert d.s.schedule().is_empty


def test_abort_between_schedule_and_update() -> None:
    d = make()
    a = d.add("a", [1, 2, 3], 4)
    out = d.s.schedule()
    d.s.abort("a")
    assert d.s.update(out, {"a": 7}) == [] and a.num_output_tokens == 0
    d.bm.check_invariants([])


# ------------------------------------------------------------------ admission checks


def test_rejects_impossible_requests() -> None:
    d = make(num_pages=5, page_size=4, max_model_len=12)  # pool: 4 x 4 = 16 tokens
    with pytest.raises(ValueError, match=r"10 tokens\) \+ max_tokens \(3\) = 13 exceeds max_model_len \(12\)"):
        d.add("a", [1] * 10, 3)
    d2 = make(num_pages=5, page_size=4)
    with pytest.raises(ValueError, match=r"= 17 exceeds the KV cache capacity \(16 tokens"):
        d2.add("b", [1] * 10, 7)
    with pytest.raises(ValueError, match="16 tokens"):
        d2.add("c", [1] * 16, None)  # no room for even one generated token
    d2.add("ok", [1] * 10, 6)  # exactly fits
    with pytest.raises(ValueError, match="already in flight"):
        d2.add("ok", [1], 1)
    with pytest.raises(ValueError):
        Sequence("empty", [])
    assert d.s.num_unfinished == 0 and d2.s.num_unfinished == 1


def test_max_tokens_none_runs_to_context_limit() -> None:
    d = make(num_pages=5, page_size=4, max_model_len=10)
    seq = d.add("a", [1, 2, 3], None)
    assert d.s.max_total_tokens(seq) == 10
    d.run()
    assert seq.num_tokens == 10 and seq.finish_reason == "length"


def test_constructor_validation() -> None:
    bm = BlockManager(8, 4)
    with pytest.raises(ValueError):
        Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError):
        Scheduler(bm, max_num_seqs=0, max_num_batched_tokens=4)


# ------------------------------------------------------------------ decode blocks


def _block_setup(seed: int):
    """A scheduler with decoding rows, pages for a 6-step block, and each row's block tokens
    and how many of them it keeps (fewer: it finishes there). Rows "b" and "c" hold the same
    tokens as "a" but run 2 and 5 tokens ahead of it, so they fill pages identical to a's at
    earlier steps of the block."""
    rng = random.Random(seed)
    bm = BlockManager(64, 4)
    s = Scheduler(bm, 8, 64)
    stream = [rng.randrange(100) for _ in range(40)]  # a's tokens, then the rows' outputs
    prompts = {"a": stream[:5], "b": stream[:7], "c": stream[:10],
               "d": [rng.randrange(100) for _ in range(9)], "e": [1, 2, 3]}
    seqs = {rid: Sequence(rid, p, Params(20)) for rid, p in prompts.items()}
    for seq in seqs.values():
        s.add(seq)
    s.update(s.schedule(), {r: stream[len(prompts[r])] if r in "abc" else rng.randrange(100)
                            for r in prompts})  # prefill: every row's first token
    out = s.schedule()
    assert all(ss.num_new_tokens == 1 and ss.is_last_chunk for ss in out.scheduled)
    for ss in out.scheduled:
        bm.allocate(ss.seq, 6)
    tokens, keep = [], []
    for ss in out.scheduled:
        seq = ss.seq
        if seq.request_id in "abc":
            n = seq.num_tokens
            tokens.append(stream[n:n + 6])
        else:
            tokens.append([rng.randrange(100) for _ in range(6)])
        keep.append(rng.choice([1, 3, 6, 6]))
    return s, bm, out, tokens, keep


def _block_state(s: Scheduler, bm: BlockManager):
    return ([(q.request_id, q.output_token_ids, q.num_computed_tokens, q.block_hashes,
              q.status, q.page_ids) for q in sorted(s._live.values(), key=lambda q: q.arrival)],
            sorted(bm._hash_to_page.items()), list(bm._free), list(bm._evictable),
            list(bm._refcount))


@pytest.mark.parametrize("seed", range(8))
def test_a_block_update_equals_one_update_per_step(seed) -> None:
    # The engine applies a decode block's tokens with one `update_block` (one pass per row);
    # it must leave what one `update` per step would: tokens, computed counts, the
    # prefix cache (pages registered in step order: an identical page filled at an earlier
    # step wins) and, rows finished in (step, row) order, the free lists.
    ref_s, ref_bm, out, tokens, keep = _block_setup(seed)
    for k in range(6):
        if k:
            out = SchedulerOutput([ScheduledSeq(ss.seq, 1, ss.start_pos + 1, True)
                                   for ss in out.scheduled])
        grew = ref_s.update(out, {ss.seq.request_id: t[k]
                                  for ss, t in zip(out.scheduled, tokens)})
        for i, ss in enumerate(out.scheduled):
            if ss.seq in grew and keep[i] == k + 1:
                ref_s.finish(ss.seq, "stop")
    s, bm, out, tokens, keep = _block_setup(seed)
    rows = s.live_rows(out)
    s.update_block(out, rows, [tokens[i][:keep[i]] for i in rows])
    for _, i in sorted((keep[i], i) for i in rows):  # the engine's order: by step, then row
        s.finish(out.scheduled[i].seq, "stop")
    assert _block_state(s, bm) == _block_state(ref_s, ref_bm)
    bm.check_invariants(s.running)
