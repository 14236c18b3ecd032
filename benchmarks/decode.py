"""Decode and prefill speed of tinymoe against mlx-lm on the same model, float and quantized.

One tinymoe checkpoint (by default a freshly initialised `tiny` MoE, 8 experts top-2: timing
does not depend on what the weights learned) is quantized with `tinymoe quantize`'s library
function, and both are exported to Hugging Face directories with `tinymoe export`'s (whose
logit check against mlx-lm runs as usual; its result is printed). tinymoe then samples from its
checkpoints and mlx-lm from the exports, greedily, from the same random prompt:

  prefill tokens/s   prompt tokens / time until the first new token is known
  decode tokens/s    (new tokens - 1) / time from the first new token to the last

tinymoe is timed through `tinymoe.infer.sample.generate` (what `tinymoe sample` runs), mlx-lm
through `mlx_lm.generate.generate_step` (what `mlx_lm.generate` runs). The candidates run
round-robin in one process, so drift from other work on the machine hits them alike; each
figure is the median over the repeats. `ratio` is tinymoe's decode tokens/s over mlx-lm's, and
`same_tokens` says whether both produced the same greedy tokens.

    python benchmarks/decode.py                       # table
    python benchmarks/decode.py --json                # one record per model variant
    python benchmarks/decode.py --checkpoint runs/x --prompt-tokens 256 --tokens 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Before mlx.core: on Linux this preloads OpenBLAS (tinymoe/backend.py).
import tinymoe  # noqa: F401
from tinymoe.quick import quick

import mlx.core as mx  # noqa: E402


def build_checkpoint(folder: Path, preset: str, experts: int, top_k: int, seed: int) -> Path:
    """A tinymoe checkpoint of a freshly initialised model (random weights, bytes tokenizer)."""
    from mlx.utils import tree_flatten

    from tinymoe.config import apply_overrides, load_preset, validate
    from tinymoe.interop.import_hf import write_checkpoint
    from tinymoe.nn.model import Model
    from tinymoe.tokenizers.builtin import ByteTokenizer

    cfg, _ = load_preset(preset)
    cfg = apply_overrides(cfg, {"moe_experts": experts, "moe_topk": top_k}, "flag")
    validate(cfg)
    mx.random.seed(seed)
    model = Model(cfg, "dense")
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(list(weights.values()))
    return write_checkpoint(folder, cfg, weights, ByteTokenizer(), {"kind": "benchmark", "seed": seed})


def time_tinymoe(model, prompt: list[int], tokens: int) -> tuple[float, float, list[int]]:
    from tinymoe.infer.sample import generate

    timing: dict = {}
    out = list(generate(model, prompt, tokens, temperature=0, timing=timing))
    return timing["prompt_tokens"] / timing["prefill_s"], timing["decode_tokens"] / timing["decode_s"], out


def time_mlx_lm(model, prompt: list[int], tokens: int) -> tuple[float, float, list[int]]:
    from mlx_lm.generate import generate_step

    out, first = [], None
    began = time.perf_counter()
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=tokens):
        out.append(int(token))
        if first is None:
            first = time.perf_counter()
    done = time.perf_counter()
    return len(prompt) / (first - began), (len(out) - 1) / (done - first), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="A float tinymoe checkpoint or run (default: a random tiny MoE).")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=128, help="New tokens per run.")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dispatch", default="auto", help="tinymoe's --moe-dispatch.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if quick():  # TINYMOE_QUICK (tinymoe/quick.py): try the command quickly
        args.prompt_tokens, args.tokens, args.repeats = 16, 8, 1

    import mlx_lm
    import numpy as np

    from tinymoe.interop.export import export_hf
    from tinymoe.interop.quantize import quantize_checkpoint
    from tinymoe.io.checkpoint import resolve
    from tinymoe.io.loader import load_model

    with tempfile.TemporaryDirectory(prefix="tinymoe-decode-") as tmp:
        tmp = Path(tmp)
        source = resolve(args.checkpoint) if args.checkpoint else \
            build_checkpoint(tmp / "float", args.preset, args.experts, args.top_k, args.seed)
        q = quantize_checkpoint(str(source), tmp / "quantized", args.bits, args.group_size)
        variants = {"float": source, f"{args.bits}-bit": Path(q["checkpoint"])}
        candidates, checks = {}, {}
        for name, ckpt in variants.items():
            report = export_hf(str(ckpt), tmp / f"hf-{name}", check=True)
            checks[name] = report["mlx_lm_max_abs_logit_diff"]
            ours, *_ = load_model(ckpt, args.dispatch)
            ours.train(False)
            theirs, _ = mlx_lm.load(str(tmp / f"hf-{name}"))
            candidates[name] = {"tinymoe": (time_tinymoe, ours), "mlx-lm": (time_mlx_lm, theirs)}
        vocab = ours.cfg.vocab_size
        prompt = np.random.default_rng(args.seed).integers(0, vocab, args.prompt_tokens).tolist()
        for name in candidates:  # warm-up: first calls build kernels and caches
            for fn, model in candidates[name].values():
                fn(model, prompt, 8)
        runs = {(n, impl): [] for n in candidates for impl in candidates[n]}
        outputs = {}
        for _ in range(args.repeats):
            for name, impls in candidates.items():
                for impl, (fn, model) in impls.items():
                    prefill, decode, out = fn(model, prompt, args.tokens)
                    runs[(name, impl)].append((prefill, decode))
                    outputs[(name, impl)] = out
    records = []
    for name in candidates:
        med = {impl: [statistics.median(r[i] for r in runs[(name, impl)]) for i in (0, 1)]
               for impl in ("tinymoe", "mlx-lm")}
        records.append({
            "model": name, "preset": None if args.checkpoint else args.preset, "checkpoint": args.checkpoint,
            "dispatch": args.dispatch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.tokens,
            "repeats": args.repeats, "tinymoe_prefill_tokens_per_s": round(med["tinymoe"][0], 1),
            "mlx_lm_prefill_tokens_per_s": round(med["mlx-lm"][0], 1),
            "tinymoe_decode_tokens_per_s": round(med["tinymoe"][1], 1),
            "mlx_lm_decode_tokens_per_s": round(med["mlx-lm"][1], 1),
            "ratio": round(med["tinymoe"][1] / med["mlx-lm"][1], 3),
            "prefill_ratio": round(med["tinymoe"][0] / med["mlx-lm"][0], 3),
            "same_tokens": outputs[(name, "tinymoe")] == outputs[(name, "mlx-lm")],
            "export_max_abs_logit_diff": checks[name]})
    if args.json:
        json.dump(records, sys.stdout, indent=1)
        print()
        return
    print(f"prompt {args.prompt_tokens} tokens, {args.tokens} new tokens, greedy, median of {args.repeats} "
          f"round-robin runs; tinymoe --moe-dispatch {args.dispatch}")
    print("| model | tinymoe decode tok/s | mlx-lm decode tok/s | ratio | tinymoe prefill tok/s "
          "| mlx-lm prefill tok/s | prefill ratio | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in records:
        print(f"| {r['model']} | {r['tinymoe_decode_tokens_per_s']:.1f} | {r['mlx_lm_decode_tokens_per_s']:.1f} "
              f"| **{r['ratio']:.2f}** | {r['tinymoe_prefill_tokens_per_s']:.0f} | {r['mlx_lm_prefill_tokens_per_s']:.0f} "
              f"| {r['prefill_ratio']:.2f} | {'yes' if r['same_tokens'] else 'no'} |")


if __name__ == "__main__":
    main()
