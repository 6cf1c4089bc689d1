"""The runner's host-side step inputs (built with whole-array numpy ops) against a plain
per-sequence loop, on random ragged batches; and its input errors."""

from __future__ import annotations

import numpy as np
import pytest

from imp_jax.loaders import load_model
from imp_jax.runner import ModelRunner, StepSeq
from imp_jax.sampling import SamplingParams, SamplingTensors

PAGE, MAX_LEN = 8, 96


@pytest.fixture(scope="module")
def runner():
    m = load_model("random:tiny", "float32")
    return ModelRunner(m.cfg, m.params, num_pages=400, page_size=PAGE, max_model_len=MAX_LEN)


def loop_inputs(seqs, S, T, P):
    """The per-sequence loop the runner used before (the reference)."""
    tokens, positions = np.zeros(T, np.int32), np.zeros(T, np.int32)
    slots, table = np.full(T, -1, np.int32), np.zeros((S, P), np.int32)
    seq_lens, last = np.zeros(S, np.int32), np.zeros(S, np.int32)
    query_start = np.full(S + 1, sum(len(s.token_ids) for s in seqs), np.int32)
    off = 0
    for i, s in enumerate(seqs):
        q = len(s.token_ids)
        pos = np.arange(s.start_pos, s.start_pos + q)
        pages = np.asarray(s.pages)
        tokens[off:off + q], positions[off:off + q] = s.token_ids, pos
        slots[off:off + q] = pages[pos // PAGE] * PAGE + pos % PAGE
        table[i, :len(pages)] = pages
        seq_lens[i], query_start[i], last[i] = s.start_pos + q, off, off + q - 1
        off += q
    return tokens, positions, slots, table, seq_lens, query_start, last


def random_seqs(rng, n, decode):
    seqs = []
    for _ in range(n):
        q = 1 if decode else int(rng.integers(1, 20))
        start = int(rng.integers(0, MAX_LEN - q))
        need = -(-(start + q) // PAGE)
        extra = int(rng.integers(0, MAX_LEN // PAGE - need + 1))  # pages held ahead
        pages = rng.choice(np.arange(1, 400), need + extra, replace=False).tolist()
        seqs.append(StepSeq(rng.integers(0, 200, q).tolist(), start, pages))
    return seqs


@pytest.mark.parametrize("decode,n,seed", [(True, 37, 0), (False, 9, 1), (False, 1, 2)])
def test_step_inputs_equal_the_per_sequence_loop(runner, decode, n, seed):
    seqs = random_seqs(np.random.default_rng(seed), n, decode)
    t = SamplingTensors.from_params([SamplingParams(temperature=0)] * n, [0] * n, [0] * n)
    prog = runner._step(seqs, t, 0, compile_only=True)
    _, _, _, tokens, positions, meta, *_ = prog.args
    S, P = meta.page_table.shape
    want = loop_inputs(seqs, S, tokens.shape[0], P)
    got = (tokens, positions, meta.slot_mapping, meta.page_table, meta.seq_lens,
           meta.query_start, meta.logits_indices)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w)


def test_decode_block_inputs(runner):
    rng = np.random.default_rng(3)
    seqs = random_seqs(rng, 11, True)
    seqs = [StepSeq(s.token_ids, s.start_pos, s.pages,
                    steps=int(min(4, len(s.pages) * PAGE - s.start_pos, MAX_LEN - s.start_pos)))
            for s in seqs]
    t = SamplingTensors.from_params([SamplingParams(temperature=0)] * 11, [0] * 11, [0] * 11)
    prog = runner.decode_steps(seqs, t, 4, compile_only=True)
    _, _, _, tokens, positions, table, limit, _ = prog.args
    _, _, _, ref_table, *_ = loop_inputs(seqs, *table.shape[:1], 16, table.shape[1])
    np.testing.assert_array_equal(table, ref_table)
    np.testing.assert_array_equal(tokens[:11], [s.token_ids[0] for s in seqs])
    np.testing.assert_array_equal(positions[:11], [s.start_pos for s in seqs])
    np.testing.assert_array_equal(limit, [s.steps for s in seqs] + [0] * (len(limit) - 11))


def test_bad_inputs_name_the_sequence(runner):
    t = SamplingTensors.from_params([SamplingParams(temperature=0)] * 2, [0] * 2, [0] * 2)
    ok = StepSeq([1], 3, [5])
    with pytest.raises(ValueError, match=r"sequence 1 reaches 97 tokens, over max_model_len 96"):
        runner._step([ok, StepSeq([1, 2], 95, list(range(1, 13)))], t, 0, compile_only=True)
    with pytest.raises(ValueError, match=r"sequence 1 needs 3 pages for 17 tokens, got 2"):
        runner._step([ok, StepSeq([1], 16, [7, 8])], t, 0, compile_only=True)
    with pytest.raises(ValueError, match=r"sequence 0 has 13 pages, more than the 12"):
        runner._step([StepSeq([1], 0, list(range(1, 14))), ok], t, 0, compile_only=True)
    with pytest.raises(ValueError, match=r"sequence 1: start_pos=-1, allowed >= 0"):
        runner._step([ok, StepSeq([1], -1, [5])], t, 0, compile_only=True)
    with pytest.raises(ValueError, match=r"sequence 1: steps=9, allowed 0\.\.4"):
        runner.decode_steps([ok, StepSeq([1], 0, [9], steps=9)], t, 4, compile_only=True)
    with pytest.raises(ValueError, match=r"sequence 0: 4 steps from position 6 need pages for "
                                         r"10 tokens"):
        runner.decode_steps([StepSeq([1], 6, [9]), ok], t, 4, compile_only=True)


def test_host_step_benchmark_runs(capsys):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "host_step.py")
    spec = importlib.util.spec_from_file_location("host_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--rows", "8", "--pages", "3", "--reps", "2"]) == 0
    assert "8 decode rows x 3 pages" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mod.main(["--rows", "0"])


def test_dot_merger_only_for_programs_of_few_token_rows():
    # XLA's dot merger stays on for GEMV-sized programs (3% faster at batch 1 on an H200) and
    # is off above MERGE_MAX_TOKENS rows, where it concatenated q/k/v weights every step
    from imp_jax import runner as r

    few, many = np.zeros(r.MERGE_MAX_TOKENS), np.zeros(r.MERGE_MAX_TOKENS + 1)
    for jit in (r._forward, r._forward_kernel_by_kernel, r._decode_loop,
                r._decode_loop_kernel_by_kernel):
        assert jit.merged is not jit.split
        assert jit.pick((0, 0, 0, few)) is jit.merged
        assert jit.pick((0, 0, 0, many)) is jit.split
