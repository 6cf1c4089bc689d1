"""The engine under continuous batching gives what each request gets alone."""

import os
import random

import numpy as np
import pytest

import imp_jax
from imp_jax import SamplingParams
from imp_jax.loaders import load_model

TINY = os.path.join(os.path.dirname(__file__), "data", "tiny", "llama3")
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return load_model(TINY)


def make_llm(model, **kw):
    kw = {"max_model_len": 128, "page_size": 4, "num_pages": 128, "max_num_seqs": 8, **kw}
    return imp_jax.LLM(TINY, loaded=model, **kw)


def prompts(n, seed=0, shared_prefix=()):
    rng = random.Random(seed)
    return [list(shared_prefix) + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 40))]
            for _ in range(n)]


@pytest.fixture(scope="module")
def alone(model):
    """Each request on its own: a fresh engine with no prefix cache, one request at a time."""
    llm = make_llm(model, enable_prefix_caching=False)
    cache = {}

    def run(ids, params=GREEDY):
        key = (tuple(ids), params.max_tokens, params.seed, params.temperature)
        if key not in cache:
            cache[key] = llm.generate([ids], params, use_tqdm=False)[0].token_ids
        return cache[key]

    return run


def test_staggered_arrivals_mixed_lengths_and_chunked_prefill(model, alone):
    # A small token budget forces prompts to be split across steps while others decode.
    llm = make_llm(model, max_num_batched_tokens=16, long_prefill_token_threshold=8)
    ps = prompts(10, seed=1)
    engine = llm.engine
    done, chunked = {}, False
    pending = list(enumerate(ps))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:  # a new request arrives every other step
            i, ids = pending.pop(0)
            engine.add_request(ids, GREEDY, request_id=str(i))
        sched_before = len(engine.scheduler.running)
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.token_ids
        chunked |= any(0 < s.num_computed_tokens < s.num_prompt_tokens
                       for s in engine.scheduler.running)
        step += 1
        assert step < 2000
        del sched_before
    assert chunked, "the token budget should have split some prompt"
    assert sorted(done) == list(range(10))
    for i, ids in enumerate(ps):
        assert done[i] == alone(ids), f"request {i}"


def test_preemption_under_a_tiny_pool_changes_nothing(model, alone):
    # 13 usable pages of 4 tokens: the 6 requests cannot all hold their KV at once.
    llm = make_llm(model, num_pages=14, max_num_seqs=6)
    ps = prompts(6, seed=2)
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    assert llm.engine.stats["preemptions"] > 0
    for ids, out in zip(ps, outs):
        assert out.token_ids == alone(ids)
    bm = llm.engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages


def test_prefix_cache_hits_give_the_same_tokens(model, alone):
    llm = make_llm(model)
    system = list(range(100, 133))  # 33 shared tokens: 8 full pages
    ps = prompts(6, seed=3, shared_prefix=system)
    first = llm.generate(ps[:1], GREEDY, use_tqdm=False)
    outs = llm.generate(ps[1:], GREEDY, use_tqdm=False)
    bm = llm.engine.block_manager
    assert bm.prefix_cache_hits >= 5 * 32
    for ids, out in zip(ps, first + outs):
        assert out.token_ids == alone(ids)


def test_seeded_sampling_is_independent_of_batch_composition(model, alone):
    llm = make_llm(model)
    ps = prompts(5, seed=4)
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=10,
                             ignore_eos=True) for i in range(5)]
    together = llm.generate(ps, params, use_tqdm=False)
    for ids, p, out in zip(ps, params, together):
        assert out.token_ids == alone(ids, p)


def test_thousand_requests_none_lost_or_duplicated(model):
    llm = make_llm(model, num_pages=64, max_num_seqs=32, max_num_batched_tokens=256)
    rng = random.Random(5)
    ps = [[rng.randrange(3, 500) for _ in range(rng.randrange(1, 12))] for _ in range(1000)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randrange(1, 4), ignore_eos=True)
              for _ in ps]
    engine = llm.engine
    ids = [engine.add_request(p, sp) for p, sp in zip(ps, params)]
    finished = []
    while engine.has_unfinished_requests():
        # every other step unfiltered: finished_only must return the same finished requests
        outs = engine.step(finished_only=bool(engine.stats["steps"] % 2))
        finished += [o for o in outs if o.finished]
    assert sorted(o.request_id for o in finished) == sorted(ids)  # each exactly once
    for o in finished:
        assert len(o.token_ids) == params[int(o.request_id)].max_tokens
    bm = engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages
    bm.check_invariants()


def test_finished_only_steps_return_just_the_finished_requests(model):
    llm = make_llm(model, max_num_seqs=4)
    engine = llm.engine
    lengths = {engine.add_request(p, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)):
               m for p, m in zip(prompts(6, seed=8), (1, 5, 2, 7, 3, 4))}
    seen = []
    while engine.has_unfinished_requests():
        outs = engine.step(finished_only=True)
        assert all(o.finished for o in outs)
        seen += outs
    assert sorted(o.request_id for o in seen) == sorted(lengths)
    assert all(len(o.token_ids) == lengths[o.request_id] for o in seen)


def test_abort_frees_pages_at_once(model):
    llm = make_llm(model)
    engine = llm.engine
    rid = engine.add_request(list(range(3, 40)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    bm = engine.block_manager
    assert bm.num_free_pages < bm.num_usable_pages
    assert engine.abort_request(rid)
    assert bm.num_free_pages == bm.num_usable_pages
    assert not engine.has_unfinished_requests()
    assert not engine.abort_request(rid)


def test_request_that_can_never_fit_is_rejected(model):
    llm = make_llm(model, num_pages=8)  # 7 usable pages = 28 tokens
    with pytest.raises(ValueError, match="28|capacity|fit"):
        llm.generate([list(range(3, 23))], SamplingParams(max_tokens=20), use_tqdm=False)
    with pytest.raises(ValueError, match="128|max_model_len|context"):
        make_llm(model).generate([list(range(3, 130))], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_host_overhead_is_measured(model):
    llm = make_llm(model)
    llm.generate(prompts(4, seed=6), GREEDY, use_tqdm=False)
    stats = llm.engine.stats
    assert stats["steps"] > 0 and 0 < stats["host_time"]
    assert stats["generation_tokens"] == 4 * GREEDY.max_tokens
    assert np.isfinite(stats["host_time"] / stats["steps"])


def test_multi_step_decode_blocks_match_single_steps(model, alone):
    llm = make_llm(model, decode_steps=4)
    ps = prompts(5, seed=7)
    params = [SamplingParams(temperature=0, max_tokens=9 + 3 * i, ignore_eos=True)
              for i in range(5)]  # lengths that end inside and at the edge of blocks
    outs = llm.generate(ps, params, use_tqdm=False)
    for ids, p, out in zip(ps, params, outs):
        assert out.token_ids == alone(ids, p)
    assert llm.engine.stats["decode_blocks"] > 0
    sampled = SamplingParams(temperature=0.8, seed=11, max_tokens=9, ignore_eos=True)
    assert llm.generate([ps[0]], sampled, use_tqdm=False)[0].token_ids == alone(ps[0], sampled)
    # a stop token inside a block is honoured and the extra tokens are dropped
    stop = alone(ps[1], GREEDY)[5]
    out = llm.generate([ps[1]], GREEDY.clone(stop_token_ids=[stop]), use_tqdm=False)[0]
    first = alone(ps[1], GREEDY).index(stop)
    assert out.token_ids == alone(ps[1], GREEDY)[:first + 1]
    bm = llm.engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages


def test_blocks_dispatched_ahead_match_single_steps(model, alone):
    # Block N+1 runs on block N's last tokens before the host has read them; stops, seeds and
    # aborts inside either block must still give exactly the single-step results.
    llm = make_llm(model, decode_steps=4)
    engine = llm.engine
    ps = prompts(4, seed=12)
    params = [SamplingParams(temperature=0, max_tokens=30 + 5 * i, ignore_eos=True)
              for i in range(3)] + [SamplingParams(temperature=0.9, seed=5, max_tokens=33,
                                                   ignore_eos=True)]
    outs = llm.generate(ps, params, use_tqdm=False)
    for ids, p, out in zip(ps, params, outs):
        assert out.token_ids == alone(ids, p)
    assert engine.stats["blocks_ahead"] > 0
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = alone(ps[0], long)
    stop = ref[13]  # lands in a block dispatched ahead
    out = llm.generate([ps[0]], long.clone(stop_token_ids=[stop]), use_tqdm=False)[0]
    assert out.token_ids == ref[:ref.index(stop) + 1]
    # abort one request while a block is in flight; the other finishes unchanged
    a = engine.add_request(ps[1], long)
    b = engine.add_request(ps[2], long)
    while engine._ahead is None:
        engine.step()
    engine.abort_request(a)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert done[b] == alone(ps[2], long) and a not in done
    engine.step()  # consumes a block left in flight, if any
    bm = engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages


def test_mixed_steps_split_into_prompt_and_decode_programs(model, alone):
    # The GPU path (fixed_shapes) runs a step mixing prompt chunks and decodes as two programs.
    llm = make_llm(model, max_num_batched_tokens=16, long_prefill_token_threshold=8)
    llm.runner.fixed_shapes = True
    ps = prompts(4, seed=8)
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    for ids, out in zip(ps, outs):
        assert out.token_ids == alone(ids)


def test_more_prompts_than_a_prompt_program_holds(model, monkeypatch):
    # On the kernel path prompt chunks run in groups of $IMP_JAX_PROMPT_ROWS (8 here); 12
    # prompts (with prompt logprobs, so every group returns all its logits) must give what the
    # one-program path does.
    monkeypatch.setenv("IMP_JAX_PROMPT_ROWS", "8")
    ps = prompts(12, seed=9)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=1)
    kw = dict(max_num_seqs=32, max_num_batched_tokens=1024, num_pages=512)
    plain = make_llm(model, **kw).generate(ps, params, use_tqdm=False)
    grouped_llm = make_llm(model, **kw)
    grouped_llm.runner.fixed_shapes = True
    grouped = grouped_llm.generate(ps, params, use_tqdm=False)
    for a, b in zip(plain, grouped):
        assert a.token_ids == b.token_ids
        assert len(a.prompt_logprobs) == len(b.prompt_logprobs) == len(a.prompt_token_ids)
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-4 for k in x)


def _count_prompt_programs(runner):
    """Record (rows given, sequences) of each prompt program the runner's steps run."""
    calls, real = [], runner._step

    def spy(seqs, sampling, num_logprobs, rows=None, **kw):
        if rows is not None:  # a prompt group of _grouped_step (decode programs pass None)
            calls.append((rows, len(seqs)))
        return real(seqs, sampling, num_logprobs, rows, **kw)

    runner._step = spy
    return calls


def test_prompt_rows_knob_sets_the_prompt_groups(model, monkeypatch):
    # $IMP_JAX_PROMPT_ROWS=4: a step of 10 prompt chunks runs as ceil(10 / 4) = 3 prompt
    # programs of 4 rows on the kernel path (one at the default 64), with the same tokens.
    rng = random.Random(13)
    ps = [[rng.randrange(3, 500) for _ in range(rng.randrange(5, 40))] for _ in range(10)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    kw = dict(max_num_seqs=16, max_num_batched_tokens=1024, num_pages=512)
    runs = {}
    for value in (None, "4"):
        if value is None:
            monkeypatch.delenv("IMP_JAX_PROMPT_ROWS", raising=False)
        else:
            monkeypatch.setenv("IMP_JAX_PROMPT_ROWS", value)
        llm = make_llm(model, **kw)
        llm.runner.fixed_shapes = True
        calls = _count_prompt_programs(llm.runner)
        runs[value] = ([o.token_ids for o in llm.generate(ps, params, use_tqdm=False)], calls,
                       llm.runner.prompt_rows)
    assert runs[None][1:] == ([(64, 10)], 64)
    assert runs["4"][1:] == ([(4, 4), (4, 4), (4, 2)], 4)
    assert runs["4"][0] == runs[None][0]


@pytest.mark.parametrize("value", ["3", "0", "512", "abc", "-4", ""])
def test_a_bad_prompt_rows_value_is_refused(model, monkeypatch, value):
    import re

    from imp_jax.runner import ModelRunner

    monkeypatch.setenv("IMP_JAX_PROMPT_ROWS", value)
    with pytest.raises(ValueError, match=re.escape(f"IMP_JAX_PROMPT_ROWS={value!r}; allowed: "
                                                   "a power of two from 1 to 256")):
        ModelRunner(model.cfg, model.params, num_pages=4, page_size=4, max_model_len=16)


def test_a_step_that_loses_the_device_state_is_recovered(model, alone):
    # A failure after the cache was donated leaves deleted buffers: the engine rebuilds the
    # cache and requeues the running requests, which then finish exactly as if nothing happened.
    llm = make_llm(model)
    engine = llm.engine
    ps = prompts(3, seed=10)
    ids = [engine.add_request(p, GREEDY) for p in ps]
    engine.step()
    engine.step()
    real_step = llm.runner.step

    def failing_step(*args, **kwargs):
        for a in __import__("jax").tree.leaves(llm.runner.cache):
            a.delete()  # what a donated call that died on the device leaves behind
        raise RuntimeError("device fault")

    llm.runner.step = failing_step
    with pytest.raises(RuntimeError, match="device fault"):
        engine.step()
    llm.runner.step = real_step
    assert engine.recover()
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    assert [done[i] for i in ids] == [alone(p) for p in ps]
    assert not engine.recover()  # nothing lost any more


def test_decode_blocks_when_pages_are_tight_and_prompt_logprobs_after_preemption(model):
    # Two sequences that each need a new page for the block, one free page: no crash, and
    # the block waits; a preempted request recomputes its prompt without duplicating logprobs.
    llm = make_llm(model, num_pages=6, decode_steps=4, enable_prefix_caching=False)
    outs = llm.generate([list(range(1, 7)), list(range(7, 13))],
                        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [10, 10]
    llm = make_llm(model, num_pages=7)
    ps = [list(range(3, 11)), list(range(20, 28))]
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                           prompt_logprobs=1), use_tqdm=False)
    assert llm.engine.stats["preemptions"] > 0
    for p, o in zip(ps, outs):
        assert len(o.prompt_logprobs) == len(p)
        assert all(p[j] in o.prompt_logprobs[j] for j in range(1, len(p)))


def test_a_bad_prompt_queues_none_of_the_batch(model):
    llm = make_llm(model)
    with pytest.raises(ValueError):
        llm.generate([[1, 2, 3], [5] * 200], GREEDY, use_tqdm=False)
    assert llm.engine.num_requests == 0


def test_n_samples_share_the_prompt_through_the_prefix_cache(model, alone):
    llm = make_llm(model)
    prompt = list(range(40, 73))  # 33 tokens: 8 full pages of 4
    p = SamplingParams(temperature=0.9, seed=5, n=3, max_tokens=6, ignore_eos=True)
    out = llm.generate([prompt], p, use_tqdm=False)[0]
    assert llm.engine.block_manager.prefix_cache_hits >= 2 * 32  # samples 1, 2 reuse the prompt
    for i, c in enumerate(out.outputs):  # sample i is the n=1 request with seed 5 + i
        assert c.token_ids == alone(prompt, p.clone(n=1, seed=5 + i))


@pytest.mark.parametrize("threads,command_buffers", [(1, "all"), (3, "all"), (1, "decode"),
                                                     (1, "none")])
def test_warmup_compiles_every_program_the_engine_uses(model, alone, threads, command_buffers,
                                                       monkeypatch):
    # IMP_JAX_COMMAND_BUFFERS picks, per program kind, a jit compiled with or without XLA's
    # command buffers: warm-up must compile the same variants the steps then call
    # attn_impl="pallas" fixes the page-table width (the GPU's program set; off the GPU the
    # kernel dispatch falls back to the reference), so warm-up covers every program.
    import jax

    jax.clear_caches()  # runners of one model share programs: start from none compiled
    monkeypatch.setenv("IMP_JAX_COMMAND_BUFFERS", command_buffers)
    llm = make_llm(model, attn_impl="pallas", max_num_batched_tokens=32, decode_steps=4)
    before = llm.runner.num_compiles
    n = llm.runner.warmup(8, 32, 4, threads=threads)
    assert n == 6  # decode rows 4, 8 (single step + 4-step block), prompt tokens 16, 32
    ps = prompts(8, seed=5)
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    assert llm.runner.num_compiles == before + n  # nothing compiled after warm-up
    for ids, out in zip(ps, outs):
        assert out.token_ids == alone(ids)


def test_warmup_covers_prompt_programs_longer_than_one_sequence(model):
    # A prompt program holds up to $IMP_JAX_PROMPT_ROWS prompts, so its token bucket can pass
    # max_model_len (16 chunks of 128 tokens fill a 2048-token program under a 272-token
    # limit): warm-up must compile those buckets too, or they compile mid-run (session 7 found
    # one such compile, seconds long, inside a timed 256-row GPU run).
    import jax

    jax.clear_caches()
    llm = make_llm(model, attn_impl="pallas", max_model_len=24, max_num_batched_tokens=64,
                   decode_steps=4)
    before = llm.runner.num_compiles
    n = llm.runner.warmup(8, 64, 4)
    assert n == 7  # decode rows 4, 8 (single step + 4-step block), prompt tokens 16, 32, 64
    rng = random.Random(12)
    ps = [[rng.randrange(3, 500) for _ in range(rng.randrange(8, 13))] for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate(ps, params, use_tqdm=False)
    assert llm.engine.stats["step_kinds"]["prompt"][0] >= 1  # 8 prompts, >32 tokens, one step
    assert llm.runner.num_compiles == before + n  # nothing compiled after warm-up
    assert all(len(o.token_ids) == 8 for o in outs)


def test_warmup_covers_the_prompt_rows_knob(model, monkeypatch):
    # With $IMP_JAX_PROMPT_ROWS=4 prompt programs have 4 rows and hold up to 4 * 24 = 96
    # tokens (bucket 128): warm-up compiles those, capped there (not 256 as 64 rows would),
    # and a step of 8 prompts of 17-20 tokens (two 4-row programs of 128) compiles nothing.
    import jax

    jax.clear_caches()
    monkeypatch.setenv("IMP_JAX_PROMPT_ROWS", "4")
    llm = make_llm(model, attn_impl="pallas", max_model_len=24, max_num_batched_tokens=256,
                   decode_steps=4)
    before = llm.runner.num_compiles
    n = llm.runner.warmup(8, 256, 4)
    assert n == 8  # decode rows 4, 8 (single step + 4-step block), prompt tokens 16-128
    calls = _count_prompt_programs(llm.runner)
    rng = random.Random(14)
    ps = [[rng.randrange(3, 500) for _ in range(rng.randrange(17, 21))] for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs = llm.generate(ps, params, use_tqdm=False)
    assert calls == [(4, 4), (4, 4)]  # one step, two 4-row programs of 68-80 tokens
    assert llm.runner.num_compiles == before + n  # nothing compiled after warm-up
    assert all(len(o.token_ids) == 4 for o in outs)


def test_a_program_compiled_after_warmup_is_logged(model, caplog):
    import jax

    jax.clear_caches()
    llm = make_llm(model, attn_impl="pallas", max_num_batched_tokens=64, decode_steps=4)
    llm.runner.warmup(8, 16, 4)  # prompt programs up to 16 tokens only
    with caplog.at_level("WARNING", logger="imp_jax.runner"):
        llm.generate([[5] * 12], GREEDY, use_tqdm=False)
        assert not caplog.records  # a 12-token prompt fits the 16-token program
        llm.generate([[5] * 40], GREEDY, use_tqdm=False)
    assert [r.getMessage() for r in caplog.records] == [
        "compiled a program after warm-up (step of 64 rows, 32 tokens, 32 pages): warm-up "
        "missed it"]


def test_rows_that_reach_their_length_inside_a_block_stop_there(model, alone):
    # max_tokens 5..12 under 4-step blocks: most blocks hold a row that ends inside them. They
    # still run as blocks (no fall back to single steps), and every row's tokens, its pages
    # and the other rows' tokens come out as if each request ran alone.
    llm = make_llm(model, decode_steps=4, max_num_seqs=8)
    ps = prompts(8, seed=11)
    params = [SamplingParams(temperature=0, max_tokens=5 + i, ignore_eos=True)
              for i in range(8)]
    outs = llm.generate(ps, params, use_tqdm=False)
    kinds = llm.engine.stats["step_kinds"]
    assert kinds["decode_block"][0] >= 2 and kinds.get("decode", [0])[0] <= 1
    for ids, p, out in zip(ps, params, outs):
        assert out.token_ids == alone(ids)[:p.max_tokens]
    bm = llm.engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages


def test_reserve_admission_never_preempts_and_changes_nothing(model, alone):
    llm = make_llm(model, num_pages=14, max_num_seqs=6, kv_admission="reserve",
                   decode_steps=4)
    ps = prompts(6, seed=2)  # the tiny pool of test_preemption_under_a_tiny_pool...
    outs = llm.generate(ps, GREEDY, use_tqdm=False)
    assert llm.engine.stats["preemptions"] == 0
    for ids, out in zip(ps, outs):
        assert out.token_ids == alone(ids)


def test_a_bad_compile_thread_count_is_named(model, monkeypatch):
    llm = make_llm(model)
    monkeypatch.setenv("IMP_JAX_COMPILE_THREADS", "eight")
    with pytest.raises(ValueError, match="IMP_JAX_COMPILE_THREADS='eight'; allowed: a positive"):
        llm.warmup()



def test_command_buffer_setting_is_validated(model, monkeypatch):
    monkeypatch.setenv("IMP_JAX_COMMAND_BUFFERS", "some")
    with pytest.raises(ValueError, match="IMP_JAX_COMMAND_BUFFERS='some'; allowed: all, decode, "
                                         "none"):
        make_llm(model)


class ChainRunner:
    """The device replaced by a fixed rule: a row's next token is a function of its last token
    and that token's position, so single steps, decode blocks and blocks dispatched ahead all
    yield the same tokens (and logprobs). Tests the engine's bookkeeping exactly and fast."""

    def __init__(self, runner):
        self.cfg, self.cache = runner.cfg, runner.cache
        self.page_size, self.max_model_len = runner.page_size, runner.max_model_len
        self.cache_lost = False
        self._last = None  # the last decode block's final tokens (continue_previous)

    def _next(self, token, pos):
        return (token * 31 + pos * 17 + 3) % self.cfg.vocab_size

    def _sample(self, toks, num_logprobs):
        from imp_jax.sampling import SampleOutput

        toks = np.asarray(toks, np.int32)
        lp = -(toks % 13).astype(np.float32) / 7
        top = np.arange(num_logprobs)
        return SampleOutput(toks, lp, ((toks[..., None] + top) % self.cfg.vocab_size)
                            .astype(np.int32), (lp[..., None] - top).astype(np.float32))

    def step(self, seqs, sampling=None, num_logprobs=0):
        from imp_jax.runner import StepOutput

        toks = [self._next(s.token_ids[-1], s.start_pos + len(s.token_ids) - 1) for s in seqs]
        return StepOutput(self._sample(toks, num_logprobs), None, np.zeros(len(seqs)), 0.0)

    def decode_steps(self, seqs, sampling, num_steps, num_logprobs=0, *,
                     continue_previous=False):
        prev = self._last if continue_previous else [s.token_ids[0] for s in seqs]
        rows = []
        for s, t in zip(seqs, prev):
            row = []
            for k in range(num_steps):
                t = self._next(t, s.start_pos + k)
                row.append(t)
            rows.append(row)
        self._last = [r[-1] for r in rows]
        return self._sample(np.array(rows).T, num_logprobs)


def _chain_run(model, decode_steps, ps, params):
    llm = make_llm(model, decode_steps=decode_steps, max_num_seqs=16, num_pages=96)
    llm.engine.runner = ChainRunner(llm.runner)
    outs = llm.generate(ps, params, use_tqdm=False)
    return llm.engine, [[(c.token_ids, c.text, c.finish_reason, c.stop_reason,
                          c.cumulative_logprob, c.logprobs) for c in o.outputs] for o in outs]


def test_decode_blocks_apply_stops_logprobs_and_text_as_single_steps_do(model):
    # A block's tokens are applied one row at a time (not one step at a time): every stop
    # (EOS, stop ids, stop strings, min_tokens, max_tokens, the context) must land on the same
    # token, with the same text, logprobs and cumulative logprob, as with one step per token.
    rng = random.Random(21)
    ps = [[rng.randrange(3, 500) for _ in range(rng.randrange(1, 30))] for _ in range(40)]
    # this tokenizer decodes ids 30..59 to the characters "<".."Y": each is a stop token and
    # a stop string at once there (the token wins)
    ids, chars = list(range(30, 60)), [chr(c) for c in range(60, 90)]
    kinds = [dict(ignore_eos=True), dict(), dict(stop=["A", "7"]),
             dict(stop=["B"], include_stop_str_in_output=True), dict(stop_token_ids=[5, 9, 40]),
             dict(min_tokens=6, max_tokens=30, stop_token_ids=ids), dict(stop=chars,
             stop_token_ids=ids), dict(logprobs=3), dict(logprobs=0, stop=["C"]),
             dict(n=2, seed=3), dict(max_tokens=None)]
    params = [SamplingParams(**{"temperature": 0, "max_tokens": rng.randrange(1, 40),
                                **kinds[i % len(kinds)]}) for i in range(len(ps))]
    single_engine, single = _chain_run(model, 1, ps, params)
    engine, blocks = _chain_run(model, 4, ps, params)
    assert engine.stats["decode_blocks"] > 0 and engine.stats["blocks_ahead"] > 0
    assert blocks == single
    assert engine.stats["generation_tokens"] == single_engine.stats["generation_tokens"]
    reasons = {(c[2], type(c[3]).__name__) for o in single for c in o}
    assert reasons >= {("length", "NoneType"), ("stop", "NoneType"), ("stop", "int"),
                       ("stop", "str")}  # every kind of stop happened
    for p, o in zip(params, single):
        for toks, _, reason, stop, _, _ in o:
            assert reason == "length" or len(toks) >= p.min_tokens
            if reason == "stop" and p.stop_token_ids and toks[-1] in p.stop_token_ids:
                assert stop == toks[-1]
    bm = engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages
    bm.check_invariants([])


def test_host_engine_benchmark_runs(capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "host_engine.py")
    spec = importlib.util.spec_from_file_location("host_engine", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--rows", "8", "--prompt-len", "20", "--output-len", "12",
                     "--decode-steps", "4", "--reps", "2"]) == 0
    out = capsys.readouterr().out
    assert "8 rows x 20 in / 12 out" in out and "decode_block" in out
    with pytest.raises(SystemExit):
        mod.main(["--rows", "0"])


def test_sample_ids_of_n_requests_cannot_collide_with_request_ids(model):
    """An n > 1 request's samples are sequences "<id>#<i>": a request id equal to one of them
    is refused (either order), the engine keeps running, and automatic ids skip ids in use."""
    llm = make_llm(model)
    engine = llm.engine
    n2 = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=4, ignore_eos=True)
    engine.add_request([11, 12, 13], GREEDY, request_id="x#1")
    with pytest.raises(ValueError, match=r"request id 'x' is already in use: .* sample id"):
        engine.add_request([40, 41, 42], n2, request_id="x")
    engine.add_request([40, 41, 42], n2, request_id="y")
    with pytest.raises(ValueError, match="request id 'y#0' is already in use"):
        engine.add_request([5, 6], GREEDY, request_id="y#0")
    engine.add_request([7, 8], GREEDY, request_id="0")  # the next automatic id would be "0"
    auto = engine.add_request([9, 10], GREEDY)
    assert auto not in ("0", "x#1", "y")
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert sorted(done) == sorted(["x#1", "y", "0", auto])
    assert len(done["y"].outputs) == 2 and all(len(c.token_ids) == 4 for c in done["y"].outputs)
    bm = engine.block_manager
    assert bm.num_free_pages == bm.num_usable_pages
