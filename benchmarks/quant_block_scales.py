"""FP8 accuracy of the default policy per mode, and block-wise weight scales simulated (CPU).

    PYTHONPATH=$PWD python benchmarks/quant_block_scales.py

SmolLM2-135M (the default model), tests/data/text in chunks of 512, scored by quant.py's Scorer
(bf16 activations; perplexity, KL and top-1 vs bf16, paired standard error). Rows:
* fp8 (W8A8), fp8-weight-only and int8 under the default policy (first and last block in bf16);
* fp8 weight-only with one scale per (group of K, output channel), simulated: each selected
  weight is replaced by its dequantized bf16 value (the kernels take no block scales).

    PYTHONPATH=$PWD python benchmarks/quant_block_scales.py --act-groups

W8A8 fp8 (default policy) with the activations' e4m3 scales per token (what the kernels do)
and per (token, group of 128 / 64 / 32 channels), simulated: each activation is replaced by
its dequantized value before the dot with the e4m3 weight (exact for a dot that applied the
group scales per K-slice). Session 16: does finer activation scaling close W8A8's gap to
weight-only?

    PYTHONPATH=$PWD python benchmarks/quant_block_scales.py --act-split

W8A8 fp8 (default policy) with each token's activations in two e4m3 terms, x ~ s1 q1 + s2 q2
(q2 quantizes the residual x - s1 q1 with its own per-token scale), simulated as above, for
every W8A8 dot or for one group of them (by their input: the normed hidden state feeding
q/k/v and gate/up, the attention output feeding o, the SiLU-and-mul feeding down). On a GPU
the two terms are two e4m3 rows per token in one dot: free where the dot is bound by the weight
bytes (decode, M <= 64), twice the FLOPs where it is bound by compute (prompts). Session 18:
which inputs' rounding costs W8A8 its perplexity?
"""

from __future__ import annotations

import contextlib
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quant as qb  # noqa: E402  (benchmarks/quant.py: model, text, Scorer)

from imp_jax.quant import (FP8, FP8_MAX, DEFAULT_POLICY, QuantPolicy,  # noqa: E402
                           cast_unquantized, quantize_params)
from imp_jax.spec import get_path, map_specs, param_specs  # noqa: E402


def block_fp8(params, cfg, group: int, policy=DEFAULT_POLICY):
    """params with every weight `policy` selects replaced by its fp8 value under one scale per
    (group of `group` contracted elements, output channel), dequantized to bf16."""
    def one(path, spec):
        w = get_path(params, path)
        if not policy.selects(path, spec, cfg):
            return w
        contract = (1,) if path[-1] == "embedding" else spec.contract
        perm = tuple(contract) + tuple(d for d in range(w.ndim) if d not in contract)
        wt = jnp.transpose(jnp.asarray(w, jnp.float32), perm)
        K = math.prod(wt.shape[:len(contract)])
        g = group if K % group == 0 else K
        wg = wt.reshape(K // g, g, -1)
        s = jnp.maximum(jnp.max(jnp.abs(wg), axis=1, keepdims=True), 1e-12) / FP8_MAX
        deq = (jnp.clip(wg / s, -FP8_MAX, FP8_MAX).astype(FP8).astype(jnp.float32) * s)
        return jnp.transpose(deq.reshape(wt.shape), tuple(np.argsort(perm))).astype(jnp.bfloat16)
    return map_specs(one, param_specs(cfg))


@contextlib.contextmanager
def activations_as(make):
    """W8A8's activation quantizer replaced by make(shipped) while inside (make None: as
    shipped): (x, dims) -> (values the dot takes, per-token scales). Traces are cleared on
    entry and exit so the patched function is what the programs use."""
    import imp_jax.quant as Q

    shipped = Q._fp8_activations
    Q._fp8_activations = shipped if make is None else make(shipped)
    jax.clear_caches()
    try:
        yield
    finally:
        Q._fp8_activations = shipped
        jax.clear_caches()


def grouped_activations(group: int | None):
    """Activation scales per (token, `group` contracted channels) (None: per token, as
    shipped); groups that do not divide a dot's K fall back to 64, then to K. Each group goes
    through the shipped per-token quantizer, dequantized."""
    import imp_jax.quant as Q

    def make(_shipped):
        def per_group(x, dims):   # dims: the contracted trailing axes (2 for o: heads x head_dim)
            x = Q.materialize(x)
            lead = x.shape[:x.ndim - dims]
            K = math.prod(x.shape[x.ndim - dims:])
            g = group if K % group == 0 else (64 if K % 64 == 0 else K)
            xq, s = Q.quantize_activations(x.reshape(lead + (K // g, g)), 1)   # s: [..., K // g]
            deq = xq.astype(jnp.float32) * s[..., None]
            return deq.reshape(x.shape), jnp.ones(lead, jnp.float32)
        return per_group

    return activations_as(None if group is None else make)


def split_activations(which: str, hidden: int):
    """Per-token activations in two e4m3 terms (hi, then the residual), dequantized, for the
    dots whose input `which` names ("all"; "hidden": K = hidden size over one axis, q/k/v and
    gate/up; "attn": o's two contracted axes; "mlp": down's K); others as shipped."""
    import imp_jax.quant as Q

    def make(shipped):
        def two_terms(x, dims):
            v = Q.materialize(x)
            K = math.prod(v.shape[v.ndim - dims:])
            kind = "attn" if dims == 2 else ("hidden" if K == hidden else "mlp")
            if which != "all" and kind != which:
                return shipped(x, dims)
            lead = v.shape[:v.ndim - dims]
            x32 = v.astype(jnp.float32)
            q1, s1 = Q.quantize_activations(x32, dims)
            s1 = s1.reshape(lead + (1,) * dims)
            r = x32 - q1.astype(jnp.float32) * s1
            q2, s2 = Q.quantize_activations(r, dims)
            deq = q1.astype(jnp.float32) * s1 + q2.astype(jnp.float32) * s2.reshape(s1.shape)
            return deq, jnp.ones(lead, jnp.float32)
        return two_terms

    return activations_as(make)


def table_row(name: str, r: dict, ref: float) -> str:
    """One markdown row of a Scorer result r against the bf16 perplexity ref."""
    return (f"| {name} | {r['ppl']:.3f} | {100 * (r['ppl'] / ref - 1):+.2f}% | {r['kl']:.4f} | "
            f"{100 * r['top1']:.1f}% | {r['se_pct']:.2f} |")


def main() -> int:
    _, cfg, params, tok = qb.load_model()
    bf16 = cast_unquantized(params, jnp.bfloat16)
    ids = qb.eval_text(tok)
    chunks = [c for c in (ids[i:i + 512] for i in range(0, len(ids), 512)) if len(c) >= 2]
    score = qb.Scorer(cfg, bf16, chunks, 512)
    ref = score(bf16)["ppl"]
    if "--act-groups" in sys.argv[1:]:
        fp8 = quantize_params(bf16, cfg, "fp8")
        print(f"| W8A8 fp8, activation scales per | ppl | vs bf16 ({ref:.3f}) | KL vs bf16 | "
              "top-1 vs bf16 | SE % |")
        print("| --- | --- | --- | --- | --- | --- |")
        for group in (None, 128, 64, 32):
            with grouped_activations(group):
                r = score(fp8)
            name = "token" if group is None else f"token x {group} channels"
            print(table_row(name, r, ref), flush=True)
        return 0
    if "--act-split" in sys.argv[1:]:
        fp8 = quantize_params(bf16, cfg, "fp8")
        print(f"| W8A8 fp8, activations in two e4m3 terms for | ppl | vs bf16 ({ref:.3f}) | "
              "KL vs bf16 | top-1 vs bf16 | SE % |")
        print("| --- | --- | --- | --- | --- | --- |")
        print(table_row("none (one term, as shipped)", score(fp8), ref), flush=True)
        for which in ("all", "hidden", "attn", "mlp"):
            with split_activations(which, cfg.hidden_size):
                r = score(fp8)
            print(table_row(which, r, ref), flush=True)
        return 0
    rows = [(f"{mode} (default policy)", quantize_params(bf16, cfg, mode))
            for mode in ("fp8", "fp8-weight-only", "int8")]
    rows += [(f"fp8 weight-only, scales per {g} keys x output channel (simulated)",
              block_fp8(bf16, cfg, g)) for g in (64, 32)]
    rows.append(("fp8 weight-only, per 64 keys, every block quantized (simulated)",
                 block_fp8(bf16, cfg, 64, QuantPolicy())))
    print(f"| variant | ppl | vs bf16 ({ref:.3f}) | KL vs bf16 | top-1 vs bf16 | SE % |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, p in rows:
        print(table_row(name, score(p), ref), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
