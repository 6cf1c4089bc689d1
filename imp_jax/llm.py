"""`LLM`: load a model once, then generate, chat, stream, score and inspect logits.

    >>> import imp_jax
    >>> llm = imp_jax.LLM("smollm2-135m")
    >>> out = llm.generate(["The capital of France is"], imp_jax.SamplingParams(temperature=0, max_tokens=8))
    >>> out[0].text  # doctest: +SKIP
    ' Paris...'
"""

from __future__ import annotations

import dataclasses
import os

from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imp_jax.cache import KVCache
from imp_jax.engine.llm_engine import LLMEngine, RequestOutput, token_ids as _token_ids
from imp_jax.engine.sequence import Sequence as EngineSequence
from imp_jax.loaders import LoadedModel, load_model
from imp_jax.runner import ModelRunner, StepSeq
from imp_jax.sampling import SamplingParams

Prompt = str | Sequence[int]

# Sampling defaults a model's generation_config.json may set (vLLM reads the same keys).
_GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


KV_CACHE_DTYPES = ("auto", "fp8", "int8", "bfloat16", "float16", "float32")


def resolve_kv_cache_dtype(name: str, model_dtype):
    """"auto" = the model's dtype; "fp8" = float8_e4m3fn pages, "int8" = int8 pages (symmetric,
    max 127), both with one float32 scale per token and KV head."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {name!r}")
    if name == "auto":
        return jnp.dtype(model_dtype)
    return jnp.dtype({"fp8": jnp.float8_e4m3fn, "int8": jnp.int8}.get(name, name))


def default_page_size(cache_dtype) -> int:
    """Tokens per KV page when the caller gives none: 64 for e4m3 pages, 16 otherwise.

    decode_mgpu copies a 64-key block of an e4m3 page as one TMA box (plus one for its scales)
    instead of four of 2 KB (plus four of 64 B) at page 16. H200, session 14
    (docs/benchmarks.md): the kernel at 256 x 2048 531.9 -> 478.9 us, one FP8 decode step at
    704 x 1536 71.2 -> 60.2 ms. A page of 64 wastes at most 63 tokens of KV per sequence."""
    return 64 if jnp.dtype(cache_dtype) == jnp.dtype(jnp.float8_e4m3fn) else 16


def enable_compilation_cache() -> None:
    """Keep compiled programs on disk (XLA's persistent cache): a second run skips compiling."""
    import os

    if jax.config.jax_compilation_cache_dir is None and os.environ.get("IMP_JAX_NO_CACHE") != "1":
        path = os.environ.get("IMP_JAX_CACHE_DIR",
                              os.path.join(os.path.expanduser("~"), ".cache", "imp_jax", "xla"))
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def compilation_cache_files() -> int | None:
    """Files in JAX's persistent compilation cache (programs, and on a GPU XLA's per-fusion
    autotune results), or None when no cache is set."""
    import os

    path = jax.config.jax_compilation_cache_dir
    if not path:
        return None
    return sum(len(files) for _, _, files in os.walk(os.path.expanduser(path)))


def _pool_pages(kv_bytes_per_token: int, page_size: int, utilization: float,
                max_model_len: int, max_num_seqs: int) -> int:
    """Size the page pool from free device memory, like vLLM's gpu_memory_utilization.

    kv_bytes_per_token: what one token's K/V costs on ONE device (sharded pools: less)."""
    page_bytes = kv_bytes_per_token * page_size
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:  # accelerators: a fraction of what is free after the weights
        free = stats["bytes_limit"] * utilization - stats.get("bytes_in_use", 0)
        return max(2, int(free // page_bytes))
    # CPU: enough for every sequence at full length, capped at 2 GiB of host memory.
    want = max_num_seqs * -(-max_model_len // page_size) + 1
    return max(2, min(want, int(2 * 2**30 // page_bytes)))


class LLM:
    """A loaded model with a continuous-batching engine.

    Args:
      model: preset name ("smollm2-135m"), a .gguf file, a Hugging Face directory, an orbax
        directory written by `imp-jax convert`, or "random:<shape>" (e.g. "random:llama3-8b").
      dtype: weights and activations; default bf16 on GPU, float32 on CPU.
      max_model_len: longest sequence (prompt + output); default the model's context length.
      page_size / num_pages: KV-cache pages; page_size defaults to 64 tokens for fp8 pages
        and 16 otherwise (`default_page_size`), num_pages to what `gpu_memory_utilization` of
        free device memory holds.
      max_num_seqs / max_num_batched_tokens: per-step batch limits of the scheduler.
      quantization: None, "fp8", "fp8-weight-only" or "int8" (weights quantized at load time).
        An FP8 checkpoint (compressed-tensors or transformers' fine-grained layout) is
        dequantized at load; with "fp8" / "fp8-weight-only", one whose scales are per tensor or
        per channel gets back its exact e4m3 codes and scales, on the weights it quantized.
      kv_cache_dtype: "auto" (the model's dtype), "fp8" (e4m3 pages) or "int8" (int8 pages,
        symmetric): both with a float32 scale per token and KV head, about half the KV memory
        of bf16; or a float dtype name.
      decode_steps: decode steps per compiled call when only decodes run (one host sync per
        block instead of per token; tokens past a stop inside a block are dropped).
      mesh: run tensor / data parallel: a jax.sharding.Mesh from imp_jax.sharding.make_mesh, or
        a string such as "tp=4" / "tp=2,dp=4" (made over the visible devices).
      sharding_rules: imp_jax.sharding.ShardingRules; default tensor_parallel() (Megatron).
      kv_admission: "optimistic" (admit while the first chunk's pages are free, preempt and
        recompute when the pool runs out, like vLLM) or "reserve" (admit only while every
        running request can grow to its max_tokens, never preempt, like TensorRT-LLM's
        guaranteed-no-evict; best for offline jobs with long outputs).
      quant_policy: which weights `quantization` turns to 8 bits: an
        `imp_jax.quant.QuantPolicy` or a string for `imp_jax.quant.parse_policy` ("all": every
        decoder block and the lm_head; "keep_first=2,keep_last=1"); default
        `quant.DEFAULT_POLICY` (the first and last blocks, the embedding and lm_head stay in
        `dtype`). Not for an FP8 checkpoint, which fixes its own; on a converted (8-bit)
        checkpoint only a policy that selects every weight it quantized.
    """

    def __init__(self, model: str = "smollm2-135m", *, dtype=None, max_model_len: int | None = None,
                 page_size: int | None = None, num_pages: int | None = None,
                 gpu_memory_utilization: float = 0.9, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 1024, enable_prefix_caching: bool = True,
                 long_prefill_token_threshold: int = 0, attn_impl: str = "auto",
                 quantization: str | None = None, kv_cache_dtype: str = "auto",
                 decode_steps: int = 1, loaded: LoadedModel | None = None, mesh=None,
                 sharding_rules=None, kv_admission: str = "optimistic",
                 quant_policy=None):
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if not isinstance(model, str) and loaded is None:
            raise TypeError(f"model must be a preset name, a path or 'random:<shape>', got "
                            f"{model!r}")
        for name, value, lo in (("page_size", page_size, 1), ("max_num_seqs", max_num_seqs, 1),
                                ("max_num_batched_tokens", max_num_batched_tokens, 1),
                                ("decode_steps", decode_steps, 1),
                                ("max_model_len", max_model_len, 1),
                                ("num_pages", num_pages, 2),  # page 0 is reserved (padding)
                                ("long_prefill_token_threshold", long_prefill_token_threshold, 0)):
            _check_int(name, value, lo)
        if decode_steps > MAX_DECODE_STEPS:
            raise ValueError(f"decode_steps must be in [1, {MAX_DECODE_STEPS}], got "
                             f"{decode_steps}")
        if page_size is not None and page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        if isinstance(gpu_memory_utilization, bool) or not isinstance(
                gpu_memory_utilization, (int, float, np.integer, np.floating)):
            raise TypeError(f"gpu_memory_utilization must be a number in (0, 1], got "
                            f"{gpu_memory_utilization!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got "
                             f"{gpu_memory_utilization}")
        enable_compilation_cache()
        if isinstance(mesh, str):
            from imp_jax.sharding import make_mesh, parse_mesh

            mesh = make_mesh(**parse_mesh(mesh))
        if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh or a string such as 'tp=4' or "
                            f"'tp=2,dp=4', got {mesh!r}")
        if sharding_rules is not None:
            from imp_jax.sharding import ShardingRules

            if not isinstance(sharding_rules, ShardingRules):
                raise TypeError(f"sharding_rules must be an imp_jax.sharding.ShardingRules "
                                f"(e.g. tensor_parallel()), got {sharding_rules!r}")
        if mesh is not None and sharding_rules is None:
            from imp_jax.sharding import tensor_parallel

            sharding_rules = tensor_parallel()
        shardings_fn = None
        if mesh is not None:  # orbax checkpoints restore straight into their shards
            from imp_jax.sharding import param_shardings

            shardings_fn = lambda cfg: param_shardings(cfg, mesh, sharding_rules)  # noqa: E731
        if quant_policy is not None:  # a typo fails before a long load
            from imp_jax.quant import policy_before_load

            quant_policy = policy_before_load(quant_policy, quantization,
                                              None if loaded is not None else model,
                                              f"quant_policy={quant_policy!r} needs quantization=")
        # random shapes are generated already quantized (never whole in full precision)
        self.model = loaded or load_model(model, dtype, shardings=shardings_fn,
                                          random_quantization=quantization,
                                          random_policy=quant_policy)
        cfg = self.model.cfg
        params = self.model.params
        if quantization is not None:
            from imp_jax.quant import quantize_loaded

            params = quantize_loaded(params, cfg, quantization, self.model.fp8_scales,
                                     policy=quant_policy)
            # Keep only the quantized tree: holding the loaded one too kept a full-precision
            # copy on the device (and shrank the KV pool sized from free memory after it), and
            # `bench` counts the bytes a step reads from `self.model.params`.
            self.model = dataclasses.replace(self.model, params=params)
        limit = cfg.max_position_embeddings
        if max_model_len is None:
            max_model_len = limit
        elif not 1 <= max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [1, {limit}] for this model, got "
                             f"{max_model_len}")
        from imp_jax.quant import QuantArray

        # the compute dtype: that of the first leaf that is not a quantized weight
        is_quant = lambda x: isinstance(x, QuantArray)  # noqa: E731
        dtype = next(leaf.dtype for leaf in jax.tree.leaves(self.model.params, is_leaf=is_quant)
                     if not is_quant(leaf))
        cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, dtype)
        if page_size is None:
            page_size = default_page_size(cache_dtype)
        if num_pages is None:
            per_token = KVCache.bytes_per_token(cfg, cache_dtype)
            if mesh is not None:
                from imp_jax.sharding import memory_plan

                per_token = memory_plan(cfg, mesh, sharding_rules, dtype, kv_pages=1,
                                        page_size=page_size,
                                        cache_dtype=cache_dtype).kv_bytes_per_token
            num_pages = _pool_pages(per_token, page_size, gpu_memory_utilization,
                                    max_model_len, max_num_seqs)
        self.runner = ModelRunner(cfg, params, num_pages=num_pages, page_size=page_size,
                                  max_model_len=max_model_len, dtype=dtype, attn_impl=attn_impl,
                                  max_num_seqs=max_num_seqs, mesh=mesh,
                                  sharding_rules=sharding_rules, cache_dtype=cache_dtype)
        self.tokenizer = self.model.tokenizer
        eos = set(self.tokenizer.eos_token_ids) if self.tokenizer is not None else set()
        gen_eos = self.model.generation_config.get("eos_token_id")
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None
                   else [])
        self.engine = LLMEngine(self.runner, self.tokenizer, eos_token_ids=eos,
                                max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max(max_num_batched_tokens, max_num_seqs),
                                enable_prefix_caching=enable_prefix_caching,
                                long_prefill_token_threshold=long_prefill_token_threshold,
                                decode_steps=decode_steps, kv_admission=kv_admission)

    def warmup(self, max_prompt_tokens: int | None = None) -> int:
        """Compile every decode and prompt-chunk program up front (servers and benchmarks call
        this so no request pays for a compile); returns the number of programs compiled.

        max_prompt_tokens: compile prompt chunks only up to this many tokens (a benchmark that
        knows its prompts); default the scheduler's per-step token budget."""
        sched = self.engine.scheduler
        tokens = sched.max_num_batched_tokens
        if max_prompt_tokens is not None:
            if max_prompt_tokens < 1:
                raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
            tokens = min(tokens, max_prompt_tokens)
        return self.runner.warmup(sched.max_num_seqs, tokens, self.engine.decode_steps)

    @property
    def config(self):
        return self.model.cfg

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        """SamplingParams with the model's generation_config defaults, then `overrides`."""
        gen = self.model.generation_config
        base = {k: gen[k] for k in _GENERATION_KEYS if gen.get(k) is not None}
        return SamplingParams(**{**base, **overrides})

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True, **kwargs: Any) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); results in input order.

        `sampling_params` is one SamplingParams for all prompts or one per prompt; keyword
        arguments (max_tokens=..., temperature=...) build one when it is None.
        """
        prompts = self._as_prompt_list(prompts)
        params = self._params_list(sampling_params, len(prompts), kwargs)
        return self._run(self._queue((p, sp, None) for p, sp in zip(prompts, params)), use_tqdm)

    def _queue(self, requests) -> list[str]:
        """Queue each (prompt, SamplingParams, score_from) of `requests`, all or none: when one
        is bad (or building the next raises), those already queued are aborted."""
        ids: list[str] = []
        try:
            for prompt, params, score_from in requests:
                ids.append(self.engine.add_request(prompt, params, score_from=score_from))
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return ids

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None, *, use_tqdm: bool = False,
             add_generation_prompt: bool = True, **kwargs: Any) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list) and generate."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TypeError(f"messages must be a non-empty list of {{'role', 'content'}} dicts "
                            f"(or a list of such lists), got {messages!r:.80}")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, **kwargs)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` ({'role', 'content'} dicts, content a string or OpenAI text
        parts) through the model's chat template."""
        from imp_jax.server.protocol import APIError, chat_messages

        self._need_tokenizer("chat")
        if not isinstance(messages, (list, tuple)):
            raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got "
                            f"{type(messages).__name__}")
        try:  # the server's validation: roles, content types, text parts joined
            messages = chat_messages({"messages": list(messages)})
        except APIError as e:
            raise ValueError(str(e)) from None
        text = self.tokenizer.apply_chat_template(messages,
                                                  add_generation_prompt=add_generation_prompt)
        # The template writes BOS itself where the model wants one.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               **kwargs: Any) -> Iterator[str]:
        """Yield text deltas of one request as they are generated (other requests keep going).
        The arguments are checked now; the request is queued when iteration starts."""
        params = self._params_list(sampling_params, 1, kwargs)[0]
        if params.n != 1:
            raise ValueError(f"stream yields one sample's text: n must be 1, got {params.n} "
                             "(generate returns every sample)")
        return self._stream(self._as_prompt_list([prompt])[0], params)

    def _stream(self, prompt: Prompt, params: SamplingParams) -> Iterator[str]:
        rid = self.engine.add_request(prompt, params)
        # text that a stop string could still claim is held back until it cannot
        hold = max((len(x) for x in params.stop or ()), default=1) - 1
        sent = 0
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    end = len(out.text) if out.finished else len(out.text) - hold
                    if end > sent:
                        yield out.text[sent:end]
                        sent = end
                    if out.finished:
                        return
                if not self.engine.has_unfinished_requests():
                    return
        finally:
            self.engine.abort_request(rid)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        pending = set(request_ids)
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(request_ids), desc="Generating", unit="req", dynamic_ncols=True)
        try:
            while pending:
                for out in self.engine.step(finished_only=True):
                    if out.finished and out.request_id in pending:
                        results[out.request_id] = out
                        pending.discard(out.request_id)
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in pending:  # leave the engine clean for the next call
                self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[r] for r in request_ids]

    # ------------------------------------------------------------------ research helpers
    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits float32 [len(token_ids), vocab]: row i predicts token i+1.
        token_ids: token ids, or a text (tokenized as a prompt)."""
        ids = self._encode(token_ids, name="token_ids")
        if not ids:
            raise ValueError("token_ids is empty")
        if len(ids) > self.runner.max_model_len:
            raise ValueError(f"{len(ids)} tokens exceed max_model_len {self.runner.max_model_len}")
        vocab = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        # Borrow pages from the engine's pool for the duration of the call.
        seq, bm = EngineSequence("logits", ids), self.engine.block_manager
        if not bm.can_allocate(seq, len(ids)):
            raise RuntimeError(f"not enough free KV pages for {len(ids)} tokens right now")
        bm.allocate(seq, len(ids))
        out = []
        chunk = self.engine.scheduler.max_num_batched_tokens
        try:
            for start in range(0, len(ids), chunk):
                part = ids[start:start + chunk]
                res = self.runner.step([StepSeq(part, start, seq.page_ids, all_logits=True)])
                out.append(np.asarray(res.logits)[:len(part)])
        finally:
            bm.free(seq)
        return np.concatenate(out)

    def score(self, contexts: Sequence[Prompt], continuations: Sequence[Prompt], *,
              use_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Summed log-probability of each continuation given its context, and whether it is the
        greedy continuation (lm-evaluation-harness's `loglikelihood`). Shared contexts reuse
        cached prefix pages."""
        for name, v in (("contexts", contexts), ("continuations", continuations)):
            if isinstance(v, (str, bytes, dict)) or not hasattr(v, "__len__"):
                raise TypeError(f"{name} must be a list of prompts (texts or token-id lists), "
                                f"got {type(v).__name__}")
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        pairs = []  # (context ids, continuation ids)

        def requests():
            for ctx, cont in zip(contexts, continuations):
                c_ids = self._encode(ctx)
                k_ids = self._encode(cont, add_special_tokens=False)
                if not c_ids or not k_ids:
                    raise ValueError(f"score pair {len(pairs)}: context {ctx!r} and "
                                     f"continuation {cont!r} must both be non-empty")
                pairs.append((c_ids, k_ids))
                yield (c_ids + k_ids,
                       SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1),
                       len(c_ids))

        outs = self._run(self._queue(requests()), use_tqdm)
        results = []
        for out, (c_ids, k_ids) in zip(outs, pairs):
            n_ctx = len(c_ids)
            entries = out.prompt_logprobs[n_ctx:n_ctx + len(k_ids)]
            total = sum(e[t] for e, t in zip(entries, k_ids))
            greedy = all(max(e.values()) <= e[t] + 1e-6 for e, t in zip(entries, k_ids))
            results.append((float(total), bool(greedy)))
        return results

    # ------------------------------------------------------------------ helpers
    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise ValueError(f"{self.model.source} has no tokenizer (random weights): {what} "
                             "needs one; pass prompts as token ids, e.g. generate([[1, 2, 3]])")

    def _encode(self, prompt: Prompt, add_special_tokens: bool = True,
                name: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            self._need_tokenizer(f"a text {name}")
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return _token_ids(prompt, name)

    def _as_prompt_list(self, prompts) -> list[Prompt]:
        if isinstance(prompts, str):
            self._need_tokenizer("a text prompt")
            return [prompts]
        if hasattr(prompts, "__array__") and not isinstance(prompts, (list, tuple)):
            arr = np.asarray(prompts)  # numpy / JAX: one prompt [n] or a batch [b, n]
            if arr.ndim == 1:
                return [_token_ids(arr, "prompt")]
            if arr.ndim != 2:
                raise TypeError(f"an array of prompts must be [n] or [batch, n] token ids, got "
                                f"shape {arr.shape}")
            prompts = list(arr)
        if isinstance(prompts, (dict, bytes)) or not hasattr(prompts, "__iter__"):
            raise TypeError(f"prompts must be a string, a list of token ids or a list of those, "
                            f"got {type(prompts).__name__}")
        prompts = list(prompts)
        if prompts and all(isinstance(p, (int, np.integer)) for p in prompts):
            return [_token_ids(prompts, "prompt")]  # one prompt given as token ids
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                self._need_tokenizer("a text prompt")
                out.append(p)
            else:
                out.append(_token_ids(p, f"prompt {i}"))
        return out

    def _params_list(self, sampling_params, n: int, kwargs) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.default_sampling_params(**kwargs)] * n
        if kwargs:
            raise TypeError(f"pass either sampling_params or keyword arguments, not both "
                            f"(got {sorted(kwargs)})")
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if isinstance(sampling_params, (dict, str)) or not hasattr(sampling_params, "__iter__"):
            raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got "
                            f"{type(sampling_params).__name__} (keyword arguments build one: "
                            f"generate(prompts, max_tokens=16))")
        sampling_params = list(sampling_params)
        if len(sampling_params) != n:
            raise ValueError(f"{len(sampling_params)} sampling params for {n} prompts")
        for i, sp in enumerate(sampling_params):
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"sampling_params[{i}] must be a SamplingParams, got "
                                f"{type(sp).__name__}")
        return sampling_params


MAX_DECODE_STEPS = 1024  # decode steps in one compiled call (10**6 ran for minutes)


def _check_int(name: str, value, lo: int) -> None:
    """None (the default) or an int >= lo, else an error naming the argument."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


_loaded: dict[str, LLM] = {}


def generate(prompts: Prompt | Sequence[Prompt], sampling_params=None, *,
             model: str = "smollm2-135m", use_tqdm: bool = False,
             **kwargs: Any) -> list[RequestOutput]:
    """One-call generation; the model (default SmolLM2-135M-Instruct) loads once per process.

    >>> imp_jax.generate(["The capital of France is"], max_tokens=32)[0].text  # doctest: +SKIP
    """
    if model not in _loaded:
        _loaded.clear()  # keep at most one model resident
        _loaded[model] = LLM(model)
    return _loaded[model].generate(prompts, sampling_params, use_tqdm=use_tqdm, **kwargs)
