"""Tokenizers for imp_jax: HF `tokenizers` everywhere, chat templates, streaming detokenization.

Two ways in:

* ``Tokenizer.from_dir(path)`` - a Hugging Face directory (``tokenizer.json`` plus optional
  ``tokenizer_config.json`` / ``chat_template.jinja`` / ``generation_config.json``).
* ``Tokenizer.from_gguf(reader)`` - builds a ``tokenizers.Tokenizer`` from GGUF metadata
  (``tokenizer.ggml.*``) the way llama.cpp interprets it. llama.cpp is the oracle here:
  ``tests/data/tokenizer/smollm2_llamacpp_ids.jsonl.gz`` holds llama.cpp's ids and the test
  demands zero mismatches.

Special-token semantics (same for both constructors):

* Special-token *text* inside the input is always parsed as the special token
  (``"<|im_start|>"`` -> id 1), like HF ``tokenizers`` by default and llama.cpp with
  ``parse_special=True``. This is what a rendered chat template needs.
* ``encode(text, add_special_tokens=True)`` adds BOS (and EOS) only when the model asks for it
  (GGUF ``tokenizer.ggml.add_bos_token`` / ``add_eos_token``; HF ``tokenizer_config.json``
  ``add_bos_token`` or, absent that, whatever ``tokenizer.json``'s post-processor adds). If the
  text already starts with BOS (templates that emit ``{{ bos_token }}``) no second BOS is added.
* ``decode(ids, skip_special_tokens=True)`` drops special (control) tokens; user-defined added
  tokens are kept.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Iterable, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

__all__ = ["Tokenizer", "IncrementalDetokenizer", "read_gguf_metadata", "SUPPORTED_GGUF_MODELS", "SUPPORTED_GGUF_PRE"]

# --------------------------------------------------------------------------------------------
# llama.cpp pre-tokenizer regexes (src/llama-vocab.cpp, llm_tokenizer_bpe). Each list is applied
# in order; every regex splits the fragments left by the previous one, keeping unmatched gaps as
# fragments of their own (== tokenizers' Split(..., behavior="isolated")).
# --------------------------------------------------------------------------------------------
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT_RES = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"]

# name -> (regex list, ignore_merges)
_PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {}
for _n in ("default",):
    _PRE_TOKENIZERS[_n] = (_DEFAULT_RES, False)
for _n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"):
    _PRE_TOKENIZERS[_n] = ([_LLAMA3_RE], _n not in ("dbrx", "smaug-bpe"))
for _n in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"):
    _PRE_TOKENIZERS[_n] = ([r"\p{N}", _GPT2_RE], False)
for _n in ("gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion"):
    _PRE_TOKENIZERS[_n] = ([_GPT2_RE], False)
for _n in ("qwen2", "deepseek-r1-qwen", "stablelm2"):
    _PRE_TOKENIZERS[_n] = ([_QWEN2_RE], False)
# chatglm-bpe/glm4 use the llama3 regex too (glm4 with ignore_merges), but also drop BOS; not listed.

SUPPORTED_GGUF_PRE = tuple(sorted(_PRE_TOKENIZERS))
SUPPORTED_GGUF_MODELS = ("gpt2", "llama")

# GGUF token types (gguf.TokenType)
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6

# Token texts llama.cpp treats as end-of-generation when they are present (llama-vocab.cpp).
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})


def _gguf_get(reader, key: str, default=None):
    if isinstance(reader, dict):
        return reader.get(key, default)
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _gguf_keys(reader) -> Iterable[str]:
    return reader.keys() if isinstance(reader, dict) else reader.fields.keys()


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_metadata(path, prefix: str = "tokenizer.") -> dict[str, Any]:
    """Fast metadata-only GGUF reader (keys starting with `prefix`); ~100x faster than
    `gguf.GGUFReader` for the big token/merge string arrays. Little-endian GGUF v2/v3 only."""
    import mmap
    import struct

    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version, = struct.unpack_from("<I", buf, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF v{version} is not supported (need v2+)")
        _, n_kv = struct.unpack_from("<QQ", buf, 8)
        off = 24
        out: dict[str, Any] = {}

        def read_str(o):
            n, = struct.unpack_from("<Q", buf, o)
            return buf[o + 8:o + 8 + n].decode("utf-8", errors="replace"), o + 8 + n

        def read_val(t, o, want):
            if t == 8:
                v, o = read_str(o)
                return v, o
            if t == 9:
                at, n = struct.unpack_from("<IQ", buf, o)
                o += 12
                if at == 8:
                    items = []
                    for _ in range(n):
                        ln, = struct.unpack_from("<Q", buf, o)
                        if want:
                            items.append(buf[o + 8:o + 8 + ln].decode("utf-8", errors="replace"))
                        o += 8 + ln
                    return items, o
                if at in _GGUF_SCALARS:
                    fmt = _GGUF_SCALARS[at]
                    size = struct.calcsize(fmt)
                    items = list(struct.unpack_from("<%d%s" % (n, fmt[1]), buf, o)) if want else []
                    return items, o + size * n
                items = []
                for _ in range(n):
                    v, o = read_val(at, o, want)
                    items.append(v)
                return items, o
            fmt = _GGUF_SCALARS[t]
            v, = struct.unpack_from(fmt, buf, o)
            return v, o + struct.calcsize(fmt)

        for _ in range(n_kv):
            key, off = read_str(off)
            t, = struct.unpack_from("<I", buf, off)
            off += 4
            want = key.startswith(prefix)
            v, off = read_val(t, off, want)
            if want:
                out[key] = v
        return out
    finally:
        buf.close()


def _token_content(tok) -> str | None:
    """tokenizer_config.json stores special tokens as str or {"content": ...}."""
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


# --------------------------------------------------------------------------------------------
# Chat templates (mirrors transformers.utils.chat_template_utils: sandboxed Jinja2, trim_blocks,
# lstrip_blocks, loopcontrols, raise_exception, strftime_now, tojson with ensure_ascii=False).
# --------------------------------------------------------------------------------------------
_JINJA_CACHE: dict[str, Any] = {}


def _compile_template(source: str):
    tmpl = _JINJA_CACHE.get(source)
    if tmpl is not None:
        return tmpl
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (HF assistant masks): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    tmpl = env.from_string(source)
    _JINJA_CACHE[source] = tmpl
    return tmpl


# --------------------------------------------------------------------------------------------
# GGUF -> tokenizers.Tokenizer
# --------------------------------------------------------------------------------------------
def _bpe_from_gguf(tokens: list[str], types: list[int], merges: list[str], pre: str,
                   unk_id: int | None) -> tokenizers.Tokenizer:
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"unsupported GGUF tokenizer.ggml.pre={pre!r}; supported: {', '.join(SUPPORTED_GGUF_PRE)}")
    regexes, ignore_merges = _PRE_TOKENIZERS[pre]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # duplicated texts: first id wins (llama.cpp: last; both rare)
    merge_pairs = []
    for m in merges:
        pos = m.find(" ", 1)  # llama.cpp: split at the first space after position 0
        if pos < 0:
            raise ValueError(f"malformed GGUF merge {m!r}")
        merge_pairs.append((m[:pos], m[pos + 1:]))
    model = models.BPE(vocab=vocab, merges=merge_pairs, ignore_merges=ignore_merges,
                       unk_token=None, fuse_unk=False, byte_fallback=False)
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_from_gguf(tokens: list[str], types: list[int], scores: list[float] | None,
                   add_space_prefix: bool, unk_id: int | None) -> tokenizers.Tokenizer:
    """SentencePiece-BPE (Llama 1/2, Mistral v0.1 GGUFs) as a tokenizers BPE with byte fallback.

    Merges are derived from the scores like transformers' LlamaConverter: a merge a+b -> ab
    exists when a, b and ab are all normal pieces; merges ranked by ab's score (higher first).
    """
    if scores is None:
        raise ValueError("GGUF tokenizer.ggml.model='llama' needs tokenizer.ggml.scores")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    normal = {t: i for i, t in enumerate(tokens)
              if types[i] in (_TT_NORMAL, _TT_USER_DEFINED, _TT_UNUSED)}
    merges = []
    for piece, pid in normal.items():
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in normal and b in normal:
                merges.append((-scores[pid], pid, normal[a], normal[b], a, b))
    merges.sort()
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    model = models.BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges], unk_token=unk,
                       fuse_unk=True, byte_fallback=True)
    tok = tokenizers.Tokenizer(model)
    norms = [normalizers.Prepend("\u2581")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(norms + [normalizers.Replace(" ", "\u2581")])
    decs = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decs.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decs)
    return tok


# --------------------------------------------------------------------------------------------
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model's special-token policy and chat template."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 unk_token: str | None = None, add_bos_token: bool | None = None,
                 add_eos_token: bool | None = None, extra_eos_token_ids: Iterable[int] = (),
                 chat_template: str | dict[str, str] | None = None):
        self._tok = tok
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.bos_token_id: int | None = self._id(bos_token)
        self.eos_token_id: int | None = self._id(eos_token)
        self.pad_token_id: int | None = self._id(pad_token)
        self.unk_token_id: int | None = self._id(unk_token)
        eos = set(int(i) for i in extra_eos_token_ids)
        if self.eos_token_id is not None:
            eos.add(self.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        if isinstance(chat_template, dict):
            self.chat_templates: dict[str, str] = dict(chat_template)
        elif chat_template:
            self.chat_templates = {"default": chat_template}
        else:
            self.chat_templates = {}

        # What add_special_tokens=True adds around a single sequence. Probe the post-processor,
        # then let explicit add_bos_token / add_eos_token flags override it.
        probe = "a"
        with_sp = tok.encode(probe, add_special_tokens=True).ids
        without = tok.encode(probe, add_special_tokens=False).ids
        prefix, suffix = [], []
        if with_sp != without and without:
            start = _find_sub(with_sp, without)
            if start >= 0:
                prefix, suffix = with_sp[:start], with_sp[start + len(without):]
        if add_bos_token is not None:
            prefix = [t for t in prefix if t != self.bos_token_id]
            if add_bos_token and self.bos_token_id is not None:
                prefix = [self.bos_token_id] + prefix
        if add_eos_token is not None:
            suffix = [t for t in suffix if t != self.eos_token_id]
            if add_eos_token and self.eos_token_id is not None:
                suffix = suffix + [self.eos_token_id]
        self._prefix, self._suffix = prefix, suffix
        self.add_bos_token = self.bos_token_id is not None and self.bos_token_id in prefix
        self.add_eos_token = self.eos_token_id is not None and self.eos_token_id in suffix

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    @property
    def hf_tokenizer(self) -> tokenizers.Tokenizer:
        return self._tok

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, "
                f"eos={sorted(self.eos_token_ids)}, add_bos={self.add_bos_token})")

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        """Build from a `gguf.GGUFReader`, a path to a .gguf file (read with the fast
        metadata-only reader) or a dict of metadata as `read_gguf_metadata` returns."""
        if isinstance(reader, (str, os.PathLike)):
            reader = read_gguf_metadata(reader)
        model = _gguf_get(reader, "tokenizer.ggml.model")
        if model is None:
            raise ValueError("GGUF has no tokenizer.ggml.model; cannot build a tokenizer")
        tokens = _gguf_get(reader, "tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError("GGUF has no tokenizer.ggml.tokens")
        tokens = [str(t) for t in tokens]
        types = _gguf_get(reader, "tokenizer.ggml.token_type")
        types = [int(t) for t in types] if types is not None else [_TT_NORMAL] * len(tokens)

        def opt_id(key):
            v = _gguf_get(reader, key)
            return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

        bos_id = opt_id("tokenizer.ggml.bos_token_id")
        eos_id = opt_id("tokenizer.ggml.eos_token_id")
        unk_id = opt_id("tokenizer.ggml.unknown_token_id")
        pad_id = opt_id("tokenizer.ggml.padding_token_id")
        eot_id = opt_id("tokenizer.ggml.eot_token_id")
        eom_id = opt_id("tokenizer.ggml.eom_token_id")

        if model == "gpt2":
            pre = _gguf_get(reader, "tokenizer.ggml.pre") or "default"
            merges = _gguf_get(reader, "tokenizer.ggml.merges")
            if merges is None:
                raise ValueError("GGUF tokenizer.ggml.model='gpt2' needs tokenizer.ggml.merges")
            tok = _bpe_from_gguf(tokens, types, [str(m) for m in merges], str(pre), unk_id)
            add_bos_default = pre in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")
        elif model == "llama":
            scores = _gguf_get(reader, "tokenizer.ggml.scores")
            add_prefix = _gguf_get(reader, "tokenizer.ggml.add_space_prefix")
            tok = _spm_from_gguf(tokens, types, [float(s) for s in scores] if scores is not None
                                 else None, True if add_prefix is None else bool(add_prefix), unk_id)
            add_bos_default = True
        else:
            raise ValueError(f"unsupported GGUF tokenizer.ggml.model={model!r}; supported: "
                             f"{', '.join(SUPPORTED_GGUF_MODELS)}")

        # control and unknown tokens -> special added tokens (parsed in text, skipped by
        # decode(skip_special_tokens=True)); user-defined -> normal added tokens (parsed, kept)
        added = []
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty in (_TT_CONTROL, _TT_USER_DEFINED, _TT_UNKNOWN):
                if t == "":
                    continue
                added.append(AddedToken(t, special=ty != _TT_USER_DEFINED, normalized=False,
                                        lstrip=False, rstrip=False, single_word=False))
        if added:
            tok.add_tokens(added)

        add_bos = _gguf_get(reader, "tokenizer.ggml.add_bos_token")
        add_eos = _gguf_get(reader, "tokenizer.ggml.add_eos_token")
        add_bos = add_bos_default if add_bos is None else bool(add_bos)
        add_eos = False if add_eos is None else bool(add_eos)
        name = lambda i: None if i is None else tokens[i]  # noqa: E731
        if add_bos or add_eos:
            single = []
            special = []
            if add_bos and bos_id is not None:
                single.append(tokens[bos_id]); special.append((tokens[bos_id], bos_id))
            single.append("$A")
            if add_eos and eos_id is not None:
                single.append(tokens[eos_id]); special.append((tokens[eos_id], eos_id))
            tok.post_processor = processors.TemplateProcessing(
                single=single, pair=single + ["$B:1"], special_tokens=list(dict.fromkeys(special)))

        # end-of-generation ids, as llama.cpp computes them
        extra_eos = {i for i in (eot_id, eom_id) if i is not None}
        extra_eos |= {i for i, t in enumerate(tokens)
                      if t in _EOG_TEXTS and types[i] in (_TT_CONTROL, _TT_USER_DEFINED)}

        templates: dict[str, str] = {}
        default_tmpl = _gguf_get(reader, "tokenizer.chat_template")
        if default_tmpl:
            templates["default"] = str(default_tmpl)
        for key in _gguf_keys(reader):
            if key.startswith("tokenizer.chat_template."):
                templates[key[len("tokenizer.chat_template."):]] = str(_gguf_get(reader, key))
        return cls(tok, bos_token=name(bos_id), eos_token=name(eos_id), pad_token=name(pad_id),
                   unk_token=name(unk_id), add_bos_token=add_bos, add_eos_token=add_eos,
                   extra_eos_token_ids=extra_eos, chat_template=templates or None)

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """Load a Hugging Face tokenizer directory (tokenizer.json required)."""
        path = os.fspath(path)
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"{tj} not found (imp_jax needs a fast tokenizer.json)")
        try:
            tok = tokenizers.Tokenizer.from_file(tj)
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise ValueError(f"{tj}: not a readable tokenizer.json ({e})") from e
        cfg = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
        gen = _read_json(os.path.join(path, "generation_config.json")) or {}
        sp_map = _read_json(os.path.join(path, "special_tokens_map.json")) or {}

        def tok_name(key):
            v = _token_content(cfg.get(key))
            return v if v is not None else _token_content(sp_map.get(key))

        templates: dict[str, str] = {}
        ct = cfg.get("chat_template")
        if isinstance(ct, str):
            templates["default"] = ct
        elif isinstance(ct, list):
            for item in ct:
                templates[item["name"]] = item["template"]
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                templates["default"] = f.read()
        ct_json = _read_json(os.path.join(path, "chat_template.json"))
        if ct_json and "default" not in templates and isinstance(ct_json.get("chat_template"), str):
            templates["default"] = ct_json["chat_template"]

        extra_eos = []
        g = gen.get("eos_token_id")
        if isinstance(g, int):
            extra_eos.append(g)
        elif isinstance(g, list):
            extra_eos.extend(int(x) for x in g)
        extra_eos.extend(int(x) for x in cfg.get("imp_jax_eos_token_ids", []))

        bos, eos = tok_name("bos_token"), tok_name("eos_token")
        if bos is None and isinstance(gen.get("bos_token_id"), int):
            bos = tok.id_to_token(gen["bos_token_id"])
        if eos is None and extra_eos:
            eos = tok.id_to_token(extra_eos[0])
        pad = tok_name("pad_token")
        if pad is None and isinstance(gen.get("pad_token_id"), int):
            pad = tok.id_to_token(gen["pad_token_id"])
        return cls(tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=tok_name("unk_token"),
                   add_bos_token=cfg.get("add_bos_token"), add_eos_token=cfg.get("add_eos_token"),
                   extra_eos_token_ids=extra_eos, chat_template=templates or None)

    def save(self, path) -> None:
        """Write tokenizer.json + tokenizer_config.json (+ chat_template.jinja,
        generation_config.json eos/bos/pad ids) so that `from_dir(path)` round-trips."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self._tok.save(os.path.join(path, "tokenizer.json"))
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "clean_up_tokenization_spaces": False,
            "imp_jax_eos_token_ids": sorted(self.eos_token_ids),
        }
        if self.chat_templates:
            if list(self.chat_templates) == ["default"]:
                cfg["chat_template"] = self.chat_templates["default"]
            else:
                cfg["chat_template"] = [{"name": k, "template": v}
                                        for k, v in self.chat_templates.items()]
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
        # a stale chat_template.jinja would override the config on load
        stale = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(stale):
            os.remove(stale)
        gpath = os.path.join(path, "generation_config.json")
        gen = _read_json(gpath) or {}
        eos = sorted(self.eos_token_ids)
        if self.eos_token_id is not None and self.eos_token_id in eos:  # primary eos first
            eos.remove(self.eos_token_id)
            eos.insert(0, self.eos_token_id)
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        if self.bos_token_id is not None:
            gen["bos_token_id"] = self.bos_token_id
        if self.pad_token_id is not None:
            gen["pad_token_id"] = self.pad_token_id
        with open(gpath, "w", encoding="utf-8") as f:
            json.dump(gen, f, indent=2)

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            prefix = self._prefix
            if prefix and ids[:len(prefix)] == prefix:
                prefix = []  # the text already starts with BOS: never double it
            ids = prefix + ids + self._suffix
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        if not add_special_tokens:
            return [e.ids for e in encs]
        out = []
        for e in encs:
            ids = e.ids
            prefix = [] if self._prefix and ids[:len(self._prefix)] == self._prefix else self._prefix
            out.append(prefix + ids + self._suffix)
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    # ---------------------------------------------------------------- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, tools: list | None = None,
                            documents: list | None = None, **kw) -> str:
        """Render `messages` with the model's Jinja2 chat template (HF semantics).

        `chat_template` may be a template string or the name of one of the model's templates
        (e.g. "tool_use"). Extra keyword arguments are passed to the template.
        """
        if chat_template is None:
            if tools and "tool_use" in self.chat_templates:
                source = self.chat_templates["tool_use"]
            else:
                source = self.chat_templates.get("default")
        elif chat_template in self.chat_templates:
            source = self.chat_templates[chat_template]
        else:
            source = chat_template
        if not source:
            raise ValueError("this tokenizer has no chat template (no tokenizer.chat_template in "
                             "the GGUF / chat_template in tokenizer_config.json); pass "
                             "chat_template=... or send a plain prompt")
        tmpl = _compile_template(source)
        ctx = dict(bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                   unk_token=self.unk_token or "", pad_token=self.pad_token or "")
        ctx.update(kw)
        return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           tools=tools, documents=documents, **ctx)


def _find_sub(seq: list[int], sub: list[int]) -> int:
    n = len(sub)
    for i in range(len(seq) - n + 1):
        if seq[i:i + n] == sub:
            return i
    return -1


def _read_json(p: str):
    from imp_jax.config import read_json

    return read_json(p) if os.path.isfile(p) else None


# --------------------------------------------------------------------------------------------
class IncrementalDetokenizer:
    """Streaming detokenization: `add(token_id)` returns the new text (possibly "").

    Never emits a partial UTF-8 character (a byte-level token that ends mid-character yields ""
    until the character completes). `flush()` returns whatever is still held back (e.g. an
    incomplete character at the end of generation, as U+FFFD). The concatenation of all deltas
    plus `flush()` equals `tokenizer.decode(all ids)` (decoded after `prefix_ids`, if given:
    pass the last few prompt ids so that SentencePiece-style leading spaces come out right).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True,
                 prefix_ids: Sequence[int] = ()):
        self._tok = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = [int(i) for i in prefix_ids]
        self._n_prefix = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._pieces: list[str] = []

    @property
    def token_ids(self) -> list[int]:
        return self._ids[self._n_prefix:]

    @property
    def text(self) -> str:
        """Text emitted so far."""
        return "".join(self._pieces)

    def _decode(self, ids) -> str:
        return self._tok.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd") \
                and new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._pieces.append(delta)
            return delta
        return ""

    def add_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """Emit the held-back tail (call once when the sequence finishes)."""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        delta = new_text[len(prefix_text):] if new_text.startswith(prefix_text) else ""
        self._prefix_offset = self._read_offset = len(self._ids)
        if delta:
            self._pieces.append(delta)
        return delta
