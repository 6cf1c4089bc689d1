"""`imp-jax` command line: generate, chat, convert, info, bench, batch, serve."""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_MODEL = "smollm2-135m"


def add_quantization_args(p: argparse.ArgumentParser) -> None:
    """--quantization and --quant-policy, the same on every command that loads a model."""
    p.add_argument("--quantization", default=None, choices=["fp8", "fp8-weight-only", "int8"],
                   help="8-bit weights, quantized at load time")
    p.add_argument("--quant-policy", default=None,
                   help="which weights --quantization turns to 8 bits: 'default' (all but the "
                        "first and last blocks, embedding and lm_head), 'all' (every block and "
                        "an untied lm_head), and/or key=value overrides such as "
                        "'keep_first=2,keep_last=1,lm_head=1,keep=layers_*/attn/k/kernel;...' "
                        "(keys: keep_first, keep_last, keep, embedding, lm_head, scales)")


def _llm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="preset name, .gguf file, HF dir, orbax dir or random:<shape>")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on GPU)")
    p.add_argument("--max-model-len", type=int, default=None)
    add_quantization_args(p)
    p.add_argument("--mesh", default=None, help="tensor/data parallel, e.g. tp=4 or tp=2,dp=4")
    p.add_argument("--decode-steps", type=int, default=4,
                   help="decode steps per compiled call (1 = a host sync per token)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    # Greedy by default on the command line: a first run should answer the same way every time.
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)


def _make_llm(args):
    from imp_jax import LLM

    return LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len,
               mesh=getattr(args, "mesh", None), quantization=args.quantization,
               quant_policy=args.quant_policy, decode_steps=args.decode_steps)


def _params(args):
    from imp_jax import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def _timed_stream(llm, prompt_ids, params, echo: bool):
    """Stream one request, printing deltas if `echo`; return (text, n_tokens, ttft, total)."""
    engine = llm.engine
    rid = engine.add_request(prompt_ids, params)
    start = time.perf_counter()
    first = None
    text, n = "", 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id != rid:
                continue
            if first is None and out.token_ids:
                first = time.perf_counter()
            if echo and len(out.text) > len(text):
                sys.stdout.write(out.text[len(text):])
                sys.stdout.flush()
            text, n = out.text, len(out.token_ids)
    end = time.perf_counter()
    return text, n, (first or end) - start, end - start


def _report(n: int, ttft: float, total: float) -> None:
    rate = (f"{(n - 1) / (total - ttft):.1f} tokens/s" if n > 1 and total > ttft
            else "n/a (one token)")
    print(f"\n[{n} tokens | time to first token {ttft * 1e3:.0f} ms | decode {rate} | "
          f"total {total:.2f} s]", file=sys.stderr)


def cmd_generate(args) -> int:
    llm = _make_llm(args)
    params = _params(args)
    if args.chat:  # an instruct model answers a request better through its chat template
        ids = llm.chat_prompt([{"role": "user", "content": args.prompt}])
    else:
        ids = llm._encode(args.prompt)
    prefix = "" if args.chat else args.prompt  # a completion continues the prompt's text
    if args.stream:
        sys.stdout.write(prefix)
    text, n, ttft, total = _timed_stream(llm, ids, params, echo=args.stream)
    if not args.stream:
        print(prefix + text)
    _report(n, ttft, total)
    return 0


def cmd_chat(args) -> int:
    llm = _make_llm(args)
    params = _params(args)
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    first = len(messages)  # where the turns start
    limit = llm.engine.scheduler.context_limit  # what the scheduler admits (check_fits)
    if (params.max_tokens or 0) >= limit:
        raise ValueError(f"--max-tokens {params.max_tokens} leaves no room for a message within "
                         f"--max-model-len {limit}")
    llm.chat_prompt(messages + [{"role": "user", "content": "hi"}])  # a tokenizer and template

    def fits(ids) -> bool:
        return len(ids) + (params.max_tokens or 1) <= limit

    print("imp-jax chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = llm.chat_prompt(messages)
        if not fits(ids) and len(messages) > first + 1:  # the conversation outgrew the context
            del messages[first:-1]  # a new one: the system prompt and this turn
            print("[the conversation no longer fits --max-model-len: starting a new one]",
                  file=sys.stderr)
            ids = llm.chat_prompt(messages)
        if not fits(ids):
            print(f"[this message ({len(ids)} tokens with the template) and --max-tokens "
                  f"{params.max_tokens} do not fit --max-model-len {limit}]", file=sys.stderr)
            messages.pop()
            continue
        text, n, ttft, total = _timed_stream(llm, ids, params, echo=True)
        messages.append({"role": "assistant", "content": text})
        _report(n, ttft, total)
    return 0


def cmd_convert(args) -> int:
    from imp_jax.loaders import load_model, orbax_ckpt
    from imp_jax.quant import policy_before_load, quantize_loaded

    policy = policy_before_load(args.quant_policy, args.quantization, args.src,
                                "--quant-policy needs --quantization")
    start = time.perf_counter()
    model = load_model(args.src, args.dtype)
    params = model.params
    if args.quantization:
        params = quantize_loaded(params, model.cfg, args.quantization, model.fp8_scales,
                                 policy=policy)
    orbax_ckpt.save(args.dst, model.cfg, params,
                    {"generation_config": model.generation_config, "source": args.src,
                     "quantization": args.quantization, "quant_policy": args.quant_policy})
    if model.tokenizer is not None:
        model.tokenizer.save(args.dst)
    print(f"wrote {args.dst} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_info(args) -> int:
    import numpy as np

    from imp_jax.cache import KVCache
    from imp_jax.loaders import parse_dtype, read_config
    from imp_jax.spec import param_bytes

    cfg = read_config(args.model)
    dtype = np.dtype(parse_dtype(args.dtype))
    print(f"model       {args.model}")
    print(f"family      {cfg.family}")
    print(f"params      {cfg.num_params / 1e6:.1f} M")
    print(f"layers      {cfg.num_layers}, hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}, "
          f"heads {cfg.num_heads}/{cfg.num_kv_heads} x {cfg.head_dim}")
    print(f"vocab       {cfg.vocab_size}, context {cfg.max_position_embeddings}")
    print(f"dtype       {dtype.name}")
    print(f"weights     {param_bytes(cfg, dtype.itemsize) / 2**20:.1f} MiB")
    print(f"kv/token    {KVCache.bytes_per_token(cfg, dtype) / 1024:.1f} KiB")
    if args.mesh:
        from imp_jax.sharding import memory_plan

        # planned from the mesh shape alone: no need for the devices to be attached
        print(memory_plan(cfg, args.mesh, dtype=dtype))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imp-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text for one prompt")
    p.add_argument("prompt")
    _llm_args(p)
    _sampling_args(p)
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the chat template")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's template")
    _llm_args(p)
    _sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(fn=cmd_chat, max_tokens=256)

    p = sub.add_parser("convert", help="write an orbax checkpoint that reloads fast")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default=None)
    add_quantization_args(p)
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("info", help="family, size, dtype and memory of a model")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default=None)
    p.add_argument("--mesh", default=None, help="e.g. tp=4 or tp=2,dp=4: per-device memory plan")
    p.set_defaults(fn=cmd_info)

    for name, module, help_ in (("bench", "imp_jax.bench",
                                 "latency / throughput / serve (HTTP server) benchmarks"),
                                ("batch", "imp_jax.batch", "OpenAI batch-file jobs"),
                                ("serve", "imp_jax.server", "OpenAI-compatible HTTP server")):
        p = sub.add_parser(name, help=help_, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(fn=None, module=module)

    args, rest = parser.parse_known_args(argv)
    if args.fn is None:  # delegate to the subcommand's own parser
        import importlib

        run = lambda: importlib.import_module(args.module).main(args.rest + rest)  # noqa: E731
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    else:
        run = lambda: args.fn(args)  # noqa: E731
    try:
        return run()
    except BAD_INPUT as e:  # bad input (a model, a flag's value): a message, no traceback
        print(f"imp-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


# What a command reports as a one-line error: input the user can fix (JSONDecodeError is a
# ValueError: a malformed config or tokenizer file).
BAD_INPUT = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, TypeError)


if __name__ == "__main__":
    sys.exit(main())
