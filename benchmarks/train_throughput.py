"""Training throughput of a preset: dense vs MoE vs the dense twin of equal active parameters.

Times full optimizer steps (forward, backward, clip, AdamW; compiled when the dispatch backend
allows it) on random byte tokens, after warm-up steps, and reports tokens/s. The MoE's routing
at initialisation is near-uniform, as it is early in real training.

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


def configs(preset: str, experts: int, top_k: int):
    from tinymoe.config import apply_overrides, load_preset

    model, train = load_preset(preset)
    moe = apply_overrides(model, {"moe_experts": experts, "moe_topk": top_k})
    twin = apply_overrides(model, {"d_ff": top_k * moe.expert_d_ff})  # same active FFN params
    return train, {"dense": model, f"moe-{experts}x{top_k}": moe, f"dense-twin-{top_k}x": twin}


def measure(model_cfg, train, steps: int, warmup: int, dispatch: str) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    from tinymoe.model import Model, count_params
    from tinymoe.train import Stepper

    mx.random.seed(0)
    model = Model(model_cfg, dispatch)
    opt = optim.AdamW(learning_rate=train.lr)
    opt.init(model.trainable_parameters())
    stepper = Stepper(model, opt, model_cfg, train)
    rng = np.random.default_rng(0)
    B, L = train.batch_size, model_cfg.context

    def batch():
        t = rng.integers(0, 256, (B, L + 1), dtype=np.int32)
        return t[:, :-1], t[:, 1:]

    for _ in range(warmup):
        stepper.step([batch])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        stepper.step([batch])
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    return {"params": count_params(model), "dispatch": model.dispatch, "compiled": stepper.compiled,
            "step_ms": round(step_s * 1e3, 1), "tokens_per_s": round(B * L / step_s, 1)}


def run(args) -> list[dict]:
    from tinymoe import backend

    train, cfgs = configs(args.preset, args.experts, args.top_k)
    blas = backend.blas_in_use()
    rows = []
    for name, cfg in cfgs.items():
        r = measure(cfg, train, args.steps, args.warmup, args.dispatch)
        rows.append({"preset": args.preset, "model": name, "blas": blas, "batch": train.batch_size,
                     "context": cfg.context, **r})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dispatch", default="auto")
    p.add_argument("--compare-blas", action="store_true", help="also run without the OpenBLAS preload")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
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
    print(f"{'model':18s} {'blas':44s} {'dispatch':9s} {'params total/active':>22s} {'step ms':>9s} {'tokens/s':>10s}")
    for r in rows:
        pa = f"{r['params']['total']:,}/{r['params']['active']:,}"
        print(f"{r['model']:18s} {r['blas'][:44]:44s} {r['dispatch']:9s} {pa:>22s} {r['step_ms']:9.1f} "
              f"{r['tokens_per_s']:10.0f}")


if __name__ == "__main__":
    main()
