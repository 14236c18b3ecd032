"""Peak memory and training throughput: float32, bfloat16, bfloat16 + activation checkpointing.

    python benchmarks/precision_memory.py [--presets small,medium] [--steps 3] [--batch-size N] [--json]

Each (preset, variant) runs in a fresh subprocess: it builds the preset's model (its batch size,
context and optimizer; one micro-batch per step), casts it, makes the step function the trainer
uses (tinymoe.train.step.Stepper) and runs `--steps` optimizer steps on random tokens. Reported:
  peak_mib       MLX's peak allocation over the whole run (`mx.get_peak_memory`: weights,
                 optimizer state, activations, the update), what the planner models
  planned_mib    tinymoe.planner.plan for the same settings, and planned / measured
  tokens_per_s   over the steps after the first (which also compiles); wall-clock, so on a
                 shared machine only the ratios between variants of one run mean much
TINYMOE_QUICK=1 measures the smallest case (small, float32) once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"),
            "bfloat16+ckpt": ("bfloat16", "every-layer")}


def scenario(preset: str, variant: str, steps: int, batch_size: int = 0) -> dict:
    """Runs inside the subprocess."""
    import mlx.core as mx
    import numpy as np

    from tinymoe import backend
    from tinymoe.config import load_preset, validate
    from tinymoe.nn.model import Model
    from tinymoe.nn.precision import cast_model
    from tinymoe.optim.factory import make_optimizer
    from tinymoe.planner import plan
    from tinymoe.precision_check import checkpoint_every
    from tinymoe.train.step import Stepper

    backend.setup()
    dtype, ckpt = VARIANTS[variant]
    model_cfg, train = load_preset(preset)
    train.dtype, train.checkpoint_activations, train.grad_accum = dtype, ckpt, 1
    train.batch_size = batch_size or train.batch_size
    validate(model_cfg, train)
    every = checkpoint_every(ckpt, model_cfg.n_layers)
    mx.reset_peak_memory()
    model = Model(model_cfg, train.dispatch)
    cast_model(model, dtype)
    model.set_checkpointing(every)
    optimizer = make_optimizer(train.optimizer, train.lr, [train.beta1, train.beta2], train.weight_decay,
                               train.optimizer_state_dtype, dtype)
    optimizer.init(model.trainable_parameters())
    mx.eval(model.parameters(), optimizer.state)
    stepper = Stepper(model, optimizer, model_cfg, train)
    rng = np.random.default_rng(0)
    shape = (train.batch_size, model_cfg.context)

    def batch():
        tokens = rng.integers(0, model_cfg.vocab_size, size=(shape[0], shape[1] + 1)).astype(np.int32)
        return tokens[:, :-1], tokens[:, 1:]

    times, losses = [], []
    for i in range(steps):
        start = time.perf_counter()
        out = stepper.step([batch], i)
        times.append(time.perf_counter() - start)
        losses.append(out["loss"])
    predicted = plan(model_cfg, batch=train.batch_size, optimizer=train.optimizer,
                     state_dtype=train.optimizer_state_dtype, param_dtype=dtype, checkpoint_every=every)
    peak = mx.get_peak_memory()
    later = times[1:] or times
    return {"preset": preset, "variant": variant, "dtype": dtype, "checkpoint_activations": ckpt,
            "batch": train.batch_size, "context": model_cfg.context, "steps": steps,
            "peak_mib": round(peak / 2**20, 1), "planned_mib": round(predicted["total_bytes"] / 2**20, 1),
            "planned_over_measured": round(predicted["total_bytes"] / peak, 3),
            "tokens_per_s": round(shape[0] * shape[1] * len(later) / sum(later), 1),
            "first_step_s": round(times[0], 2), "losses": [round(v, 4) for v in losses]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="small,medium")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=0, help="sequences per step (default: the preset's)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--scenario", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.scenario:
        print(json.dumps(scenario(*args.scenario, args.steps, args.batch_size)))
        return
    from tinymoe.quick import quick

    cases = [(p, v) for p in args.presets.split(",") for v in args.variants.split(",")]
    steps = args.steps
    if quick():
        cases, steps = cases[:1], 2
    rows = []
    for preset, variant in cases:
        out = subprocess.run([sys.executable, __file__, "--scenario", preset, variant, "--steps", str(steps),
                              "--batch-size", str(args.batch_size)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if not args.json:
            print(f"{preset} {variant}: done", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| preset | variant | batch x context | MLX peak MiB | planned MiB | planned/measured | tokens/s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['variant']} | {r['batch']} x {r['context']} | {r['peak_mib']:,.0f} | "
              f"{r['planned_mib']:,.0f} | {r['planned_over_measured']:.2f} | {r['tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
