"""Training throughput of a preset: dense vs MoE vs the dense twin of equal active parameters.

Times full optimizer steps (forward, backward, clip, AdamW; compiled as `tinymoe train` compiles
them) on random byte tokens, after warm-up steps, and reports tokens/s. The models' steps are
timed round-robin, so drifts in machine load hit them alike, and the median is kept. The MoE's
routing at initialisation is near-uniform, as it is early in real training.

    python benchmarks/train_throughput.py                     # tiny: dense, MoE 8x top-2, twin
    python benchmarks/train_throughput.py --compare-blas      # also without the OpenBLAS preload
    python benchmarks/train_throughput.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import tinymoe  # noqa: F401  (preloads OpenBLAS before MLX)
from tinymoe.quick import quick


def configs(preset: str, experts: int, top_k: int):
    from tinymoe.config import apply_overrides, load_preset

    model, train = load_preset(preset)
    moe = apply_overrides(model, {"moe_experts": experts, "moe_topk": top_k})
    twin = apply_overrides(model, {"d_ff": top_k * moe.expert_d_ff})  # same active FFN params
    return train, {"dense": model, f"moe-{experts}x{top_k}": moe, f"dense-twin-{top_k}x": twin}


def make_stepper(model_cfg, train, dispatch: str, compile: bool):
    import mlx.core as mx
    import mlx.optimizers as optim

    from tinymoe.nn.model import Model
    from tinymoe.train.step import Stepper

    mx.random.seed(0)
    model = Model(model_cfg, dispatch)
    opt = optim.AdamW(learning_rate=train.lr)
    opt.init(model.trainable_parameters())
    return Stepper(model, opt, model_cfg, train, compile=None if compile else False)


def run(args) -> list[dict]:
    """Warm every model up, then time their steps round-robin (step i of each model in turn), so
    slow drifts in machine load hit every model alike; the median step is kept."""
    import numpy as np

    from tinymoe import backend
    from tinymoe.nn.model import count_params

    train, cfgs = configs(args.preset, args.experts, args.top_k)
    steppers = {name: make_stepper(cfg, train, args.dispatch, not args.eager) for name, cfg in cfgs.items()}
    rng = np.random.default_rng(0)
    B, L = train.batch_size, next(iter(cfgs.values())).context

    def batch():
        t = rng.integers(0, 256, (B, L + 1), dtype=np.int32)
        return t[:, :-1], t[:, 1:]

    for stepper in steppers.values():
        for _ in range(args.warmup):
            stepper.step([batch])
    times = {name: [] for name in steppers}
    for _ in range(args.steps):
        for name, stepper in steppers.items():
            start = time.perf_counter()
            stepper.step([batch])
            times[name].append(time.perf_counter() - start)
    blas, rows = backend.blas_in_use(), []
    for name, stepper in steppers.items():
        step_s = float(np.median(times[name]))
        rows.append({"preset": args.preset, "model": name, "blas": blas, "batch": B, "context": L,
                     "params": count_params(stepper.model),
                     "dispatch": stepper.model.dispatch if stepper.model.moe_layers() else "-",
                     "compiled": stepper.compiled, "step_ms": round(step_s * 1e3, 1),
                     "tokens_per_s": round(B * L / step_s, 1)})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dispatch", default="auto")
    p.add_argument("--eager", action="store_true", help="never mx.compile the steps (by default "
                   "every model whose dispatch allows it is compiled, as `tinymoe train` does)")
    p.add_argument("--compare-blas", action="store_true", help="also run without the OpenBLAS preload")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if quick():  # TINYMOE_QUICK (tinymoe/quick.py): try the command quickly (the docs check): one timed step
        args.steps, args.warmup, args.preset = 1, 1, "debug"
    rows = run(args)
    if args.compare_blas and not os.environ.get("TINYMOE_NO_OPENBLAS"):
        argv = [sys.executable, __file__, *[a for a in sys.argv[1:] if a != "--compare-blas"], "--json"]
        if "--json" in sys.argv[1:]:
            argv = argv[:-1]
        out = subprocess.run(argv, env={**os.environ, "TINYMOE_NO_OPENBLAS": "1"}, capture_output=True,
                             text=True, check=True)
        rows += json.loads(out.stdout)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'model':18s} {'blas':10s} {'dispatch':9s} {'compiled':8s} {'params total/active':>22s} "
          f"{'step ms':>9s} {'tokens/s':>10s}")
    for r in rows:
        pa = f"{r['params']['total']:,}/{r['params']['active']:,}"
        blas = r["blas"].split(" ")[0]
        print(f"{r['model']:18s} {blas:10s} {r['dispatch']:9s} {str(r['compiled']):8s} {pa:>22s} "
              f"{r['step_ms']:9.1f} {r['tokens_per_s']:10.0f}")
    for blas in dict.fromkeys(r["blas"] for r in rows):
        tps = {r["model"].split("-")[0] + ("-twin" if "twin" in r["model"] else ""): r["tokens_per_s"]
               for r in rows if r["blas"] == blas}
        print(f"# {blas.split(' ')[0]}: MoE / dense twin tokens/s = {tps['moe'] / tps['dense-twin']:.2f}")


if __name__ == "__main__":
    main()
