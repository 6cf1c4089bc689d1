"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against HF transformers on the same file.

Fixtures: tests/reference/make_reference.py (transformers dequantizes the same GGUF to float32).
"""

import os

import numpy as np
import pytest

import imp_jax
from imp_jax import SamplingParams

REF = os.path.join(os.path.dirname(__file__), "data", "reference", "smollm2_gguf.npz")


@pytest.fixture(scope="module")
def llm():
    try:
        return imp_jax.LLM("smollm2-135m", dtype="float32", max_model_len=256, num_pages=64)
    except FileNotFoundError as e:  # the model package is part of `make setup`
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def ref():
    return np.load(REF)


@pytest.mark.parametrize("k", range(4))
def test_logits_match_transformers(llm, ref, k):
    ids = ref[f"ids_{k}"].tolist()
    logits = llm.logits(ids)[-4:]
    assert np.abs(logits - ref[f"last_logits_{k}"]).max() < 1e-3


def test_greedy_tokens_match_transformers(llm, ref):
    prompts = [ref[f"ids_{k}"].tolist() for k in range(4)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                        use_tqdm=False)
    for k, out in enumerate(outs):
        assert out.token_ids == ref[f"greedy_{k}"].tolist(), f"prompt {k}"


def test_default_generate_answers_in_english(llm):
    out = llm.generate(["The capital of France is"], temperature=0, max_tokens=8,
                       use_tqdm=False)[0]
    assert "Paris" in out.text
