"""Validation loss after equal steps: float32 against bfloat16 (stochastic or nearest rounding) and float16.

    python benchmarks/precision.py [--steps 150] [--batch-size 8] [--context 128] [--variants ...] [--json]

Trains the `tiny` preset as an MoE (8 experts, top-2) on the bundled corpus from the same seed
(same initial weights, same batches) once per precision, and reports the validation loss at the
end (the same validation batches for all) and its difference from float32. "bfloat16-nearest"
rounds each update to the nearest bfloat16 instead of stochastically: the choice docs/memory.md
makes is between these two (a float32 master copy would cost 4 more bytes per parameter).
`--drift` instead measures the case the training run is too short to show: 1000 AdamW updates
of a weight of 1.0 (4096 copies) by lr 1e-4 with a constant gradient, each update below half a
bfloat16 step at 1.0 (2^-8): the mean and spread of the final weights per rounding.
TINYMOE_QUICK=1 runs 10 steps of the first two precisions only (and 100 updates for --drift).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinymoe.quick import quick  # noqa: E402

VARIANTS = {  # name: (dtype, rounding)
    "float32": ("float32", "stochastic"),
    "bfloat16": ("bfloat16", "stochastic"),
    "bfloat16-nearest": ("bfloat16", "nearest"),
    "float16": ("float16", "stochastic"),
}


def run(name: str, steps: int, eval_batches: int, work: Path, batch: int, context: int) -> dict:
    import dataclasses

    from tinymoe.config import apply_overrides, load_preset, validate
    from tinymoe.optim.rounding import ROUNDING
    from tinymoe.train.trainer import Trainer

    dtype, rounding = VARIANTS[name]
    model_cfg, train_cfg = load_preset("tiny")
    model_cfg = apply_overrides(model_cfg, {"moe_experts": 8, "moe_topk": 2, "context": context}, "benchmark")
    train_cfg = dataclasses.replace(train_cfg, steps=steps, batch_size=batch, eval_every=0, eval_batches=eval_batches,
                                    warmup_steps=min(train_cfg.warmup_steps, steps // 5), dtype=dtype)
    validate(model_cfg, train_cfg)
    ROUNDING["mode"] = rounding
    start = time.perf_counter()
    result = Trainer(model_cfg, train_cfg, work / name, progress=False).run()
    ROUNDING["mode"] = "stochastic"
    return {"variant": name, "dtype": dtype, "rounding": rounding if dtype != "float32" else None, "steps": steps,
            "val_loss": result["val_loss"], "train_loss": result["train_loss"],
            "skipped_steps": result["skipped_steps"], "seconds": round(time.perf_counter() - start, 1)}


def drift(updates: int) -> list[dict]:
    import mlx.core as mx
    import mlx.optimizers as optim

    from tinymoe.optim.mixed import MixedAdamW
    from tinymoe.optim.rounding import ROUNDING

    rows = []
    for name, dtype, mode in (("float32", mx.float32, None), ("bfloat16", mx.bfloat16, "stochastic"),
                              ("bfloat16-nearest", mx.bfloat16, "nearest")):
        ROUNDING["mode"] = mode or "stochastic"
        opt = (optim.AdamW if dtype == mx.float32 else MixedAdamW)(learning_rate=1e-4, weight_decay=0.0)
        params, grads = {"w": mx.ones((4096,), dtype)}, {"w": mx.ones((4096,), dtype)}
        opt.init(params)
        for _ in range(updates):
            params = opt.apply_gradients(grads, params)
            mx.eval(params, opt.state)
        w = params["w"].astype(mx.float32)
        rows.append({"variant": name, "updates": updates, "mean": round(mx.mean(w).item(), 5),
                     "spread": round(mx.sqrt(mx.var(w)).item(), 5)})
    ROUNDING["mode"] = "stochastic"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--drift", action="store_true", help="the small-update test instead of training runs")
    args = ap.parse_args()
    if args.drift:
        rows = drift(100 if quick() else 1000)
        if args.json:
            print(json.dumps(rows, indent=1))
            return
        print(f"a weight of 1.0, {rows[0]['updates']} AdamW updates at lr 1e-4, constant gradient")
        print(f"{'variant':<18} {'mean':>8} {'spread':>8}")
        for r in rows:
            print(f"{r['variant']:<18} {r['mean']:>8.4f} {r['spread']:>8.4f}")
        return
    names = [v for v in args.variants.split(",") if v]
    steps = args.steps
    if quick():
        names, steps = names[:2], 10
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append(run(name, steps, args.eval_batches, Path(tmp), args.batch_size, args.context))
            if not args.json:
                print(f"{name}: val loss {rows[-1]['val_loss']:.4f} ({rows[-1]['seconds']} s)", file=sys.stderr)
    base = next((r["val_loss"] for r in rows if r["variant"] == "float32"), None)
    for r in rows:
        r["vs_float32"] = None if base is None else round(r["val_loss"] - base, 4)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"tiny preset, MoE 8 experts top-2, batch {args.batch_size} x context {args.context}, {steps} steps, "
          f"bundled corpus, seed 0")
    print(f"{'variant':<18} {'val loss':>9} {'vs float32':>11} {'skipped':>8} {'seconds':>8}")
    for r in rows:
        diff = "" if r["vs_float32"] is None else f"{r['vs_float32']:+.4f}"
        print(f"{r['variant']:<18} {r['val_loss']:>9.4f} {diff:>11} {r['skipped_steps']:>8} {r['seconds']:>8}")


if __name__ == "__main__":
    main()
