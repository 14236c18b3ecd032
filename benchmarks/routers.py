"""Routers compared: the `tiny` MoE (8 experts, top-2) trained once per router for a fixed budget.

Every variant trains from the same seed on the bundled corpus with the same batches, then reports:
final validation loss and bits per byte; load CV and dead experts from routing the validation split
in eval mode (tinymoe inspect's definitions, averaged / summed over the MoE layers); drop rate and
mean k from training (metrics.jsonl, mean over the last half of the steps and over the layers);
training tokens/s (median over logging windows after the first, which includes compilation).

    python benchmarks/routers.py                          # all variants, 60 steps, batch 8
    python benchmarks/routers.py --steps 300 --batch-size 16 --only topk,sigmoid-bias
    python benchmarks/routers.py --json

The default budget is small so the whole table runs in minutes on a 2-core CPU: the differences in
loss it shows are those of early training, not of converged models.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import tinymoe  # noqa: F401  (preloads OpenBLAS before MLX)
from tinymoe.quick import quick

# name -> ModelConfig overrides on top of the tiny preset with 8 experts, top-2.
VARIANTS = {
    "topk": {},
    "topk cap 1.25": {"capacity_factor": 1.25},
    "topk + shared": {"shared_experts": 1},
    "switch": {"router": "switch", "moe_topk": 1, "capacity_factor": 1.25, "eval_capacity_factor": 2.0},
    "noisy": {"router": "noisy"},
    "jitter": {"router": "jitter"},
    "sigmoid-bias": {"router": "sigmoid-bias", "aux_loss_weight": 0.0},
    "sigmoid-bias rate 0.01": {"router": "sigmoid-bias", "aux_loss_weight": 0.0, "bias_rate": 0.01},
    "expert-choice": {"router": "expert-choice"},
    "smart": {"router": "smart"},
    "dynamic": {"router": "dynamic", "k_min": 1, "k_max": 4, "dynamic_threshold": 0.5},
}


def run_variant(name: str, overrides: dict, args, root: Path) -> dict:
    import numpy as np

    from tinymoe.analysis.stats import routing_stats
    from tinymoe.config import apply_overrides, load_preset, validate
    from tinymoe.nn.model import count_params
    from tinymoe.io import metrics_log
    from tinymoe.train.trainer import Trainer

    model_cfg, train_cfg = load_preset("tiny")
    model_cfg = apply_overrides(model_cfg, {"moe_experts": 8, "moe_topk": 2, **overrides}, name)
    train_cfg = apply_overrides(train_cfg, {"steps": args.steps, "batch_size": args.batch_size,
                                            "warmup_steps": max(2, args.steps // 10), "eval_every": 0,
                                            "eval_batches": args.eval_batches, "log_every": args.log_every,
                                            "seed": args.seed}, name)
    validate(model_cfg, train_cfg)
    run_dir = root / name.replace(" ", "_").replace("+", "plus")
    trainer = Trainer(model_cfg, train_cfg, run_dir, progress=False)
    start = time.perf_counter()
    summary = trainer.run()
    seconds = time.perf_counter() - start
    records = [rec for _, rec in metrics_log.read_records(run_dir / metrics_log.FILE_NAME)]
    steps = [r for r in records if "loss" in r]
    late = [r for r in steps if r["step"] > args.steps // 2] or steps[-1:]
    windows = [r["tokens_per_s"] for r in steps[1:]] or [r["tokens_per_s"] for r in steps]
    data = trainer.data
    stats = routing_stats(trainer.model, data.val_tokens, args.batch_size, model_cfg.context, args.eval_batches)
    layers = stats["layers"]
    return {
        "router": name, "val_loss": round(summary["val_loss"], 4),
        "val_bits_per_byte": round(summary["val_bits_per_byte"], 4),
        "load_cv": round(float(np.mean([layer["load_cv"] for layer in layers])), 3),
        "dead_experts": int(sum(layer["dead_experts"] for layer in layers)),
        "drop_rate": round(float(np.mean([np.mean(r["drop_rate"]) for r in late])), 4),
        "mean_k": round(float(np.mean([np.mean(r["mean_k"]) for r in late])), 3),
        "tokens_per_s": round(float(np.median(windows))),
        "active_params": count_params(trainer.model)["active"], "train_seconds": round(seconds, 1),
        "overrides": overrides,
    }


def table(rows: list[dict]) -> str:
    head = ("| router | val loss | bits/byte | load CV | dead experts | drop rate | mean k | tokens/s |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['router']} | {r['val_loss']:.4f} | {r['val_bits_per_byte']:.4f} | {r['load_cv']:.3f} | "
             f"{r['dead_experts']} | {r['drop_rate']:.3f} | {r['mean_k']:.2f} | {r['tokens_per_s']:,} |" for r in rows]
    return "\n".join([head, *lines])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per router (default 60)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences of 256 tokens per step (default 8)")
    p.add_argument("--eval-batches", type=int, default=10, help="validation batches (default 10)")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--json-out", help="also write the rows as JSON to this file")
    args = p.parse_args()
    if quick():  # TINYMOE_QUICK (tinymoe/quick.py): try the command quickly (the docs check): two variants
        args.only, args.eval_batches = args.only or ",".join(list(VARIANTS)[:2]), 1
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tinymoe-routers-") as tmp:
        for name in names:
            rows.append(run_variant(name, VARIANTS[name], args, Path(tmp)))
            if not args.json:
                print(f"{name}: {rows[-1]['train_seconds']} s", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    from tinymoe import backend

    print(f"\ntiny MoE, 8 experts top-2, {args.steps} steps x batch {args.batch_size} x 256 tokens, "
          f"seed {args.seed}, BLAS {backend.blas_in_use()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
