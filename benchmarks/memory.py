"""Peak memory of opening, sampling and training, next to the planner's predictions.

    python benchmarks/memory.py [--out /tmp/tinymoe-memory] [--markdown]

Builds one MoE checkpoint (about 25M parameters, 101 MB float32, 99% of it experts), then runs
each scenario in a fresh subprocess and reports two measured figures:
  rss_mib     peak resident set size during the scenario (Linux VmHWM, reset after the imports
              through /proc/self/clear_refs) minus the resident size before it
  mlx_mib     MLX's own peak allocation (`mx.get_peak_memory`), what the planner models
and the planner's prediction for the same settings. Opening with plain loading reads every
tensor; opening mapped parses headers and maps the expert file.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MODEL = {"vocab_size": 256, "d_model": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "context": 128,
         "d_ff": 512, "moe_experts": 32, "moe_topk": 2, "expert_hidden": 1024}
BATCH, TRAIN_CONTEXT, STEPS, SAMPLE_TOKENS, RESIDENT = 2, 64, 3, 48, 4
PROMPT = b"Once upon a time"
# gather is the dispatch the planner models; grouped (the CPU default) is shown next to it.
TRAIN = {"train-adamw": ("adamw", "float32", "gather"), "train-sparse-adamw": ("sparse-adamw", "float32", "gather"),
         "train-sparse-adamw-bf16": ("sparse-adamw", "bfloat16", "gather"),
         "train-adafactor": ("adafactor", "float32", "gather"),
         "train-adamw-grouped": ("adamw", "float32", "grouped")}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS, so the
    import-time peak does not hide what the scenario itself adds."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _scenario(name: str, ckpt: str, work: str) -> dict:
    """Runs inside the subprocess."""
    import mlx.core as mx

    import tinymoe.io.loader  # noqa: F401  (the baseline imports the same modules)
    import tinymoe.train.trainer  # noqa: F401

    extra = {}
    reset = _reset_peak_rss()
    rss_before = _status_bytes("VmRSS")
    start = time.perf_counter()
    if name == "baseline":
        pass
    elif name == "open-plain":
        from tinymoe.io.loader import load_model

        load_model(ckpt, "grouped")
    elif name == "open-mapped":
        from tinymoe.io.mmap_experts import open_mapped

        open_mapped(ckpt, "grouped")
    elif name.startswith("sample"):
        from tinymoe.infer.sample import generate

        if name == "sample-all":
            from tinymoe.io.loader import load_model

            model = load_model(ckpt, "grouped")[0]
        else:
            from tinymoe.infer.offload import cache_stats, load_model_offloaded

            model, *_, caches = load_model_offloaded(ckpt, RESIDENT, "grouped")
        t0 = time.perf_counter()
        out = list(generate(model, list(PROMPT), SAMPLE_TOKENS, temperature=0.8, seed=0))
        extra["tokens_per_s"] = round(len(out) / (time.perf_counter() - t0), 1)
        if name != "sample-all":
            extra["hit_rate"] = cache_stats(caches)["hit_rate"]
    elif name.startswith("train"):
        from tinymoe.config import ModelConfig, TrainConfig
        from tinymoe.train.trainer import Trainer

        optimizer, state_dtype, dispatch = TRAIN[name]
        corpus = Path(work) / "corpus"
        corpus.mkdir(exist_ok=True)
        (corpus / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
        cfg = ModelConfig(**{**MODEL, "context": TRAIN_CONTEXT})
        tr = TrainConfig(steps=STEPS, batch_size=BATCH, data=[str(corpus)], eval_every=0, eval_batches=1,
                         warmup_steps=2, dispatch=dispatch, optimizer=optimizer, optimizer_state_dtype=state_dtype)
        trainer = Trainer(cfg, tr, Path(work) / name, progress=False)
        trainer.run()
        if optimizer in ("sparse-adamw", "adafactor"):
            opt = trainer.optimizer
            total = sum(len(p) for p in opt.experts.values())
            extra["expert_state_fraction"] = round(total / (3 * MODEL["n_layers"] * MODEL["moe_experts"]), 3)
    peak = _status_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rss_bytes": peak, "rss_delta_bytes": peak - rss_before, "mlx_bytes": mx.get_peak_memory(),
            "seconds": round(time.perf_counter() - start, 2), **extra}


def _predict(name: str, extra: dict) -> int:
    from tinymoe.config import ModelConfig
    from tinymoe.planner import plan

    cfg = ModelConfig(**MODEL)
    if name in ("open-plain", "sample-all"):
        return plan(cfg, mode="sample", context=len(PROMPT) + SAMPLE_TOKENS)["total_bytes"]
    if name in ("open-mapped",):
        return plan(cfg, mode="sample", resident_experts=0, context=1)["total_bytes"] - (
            plan(cfg)["params"]["expert"] * 4)
    if name == "sample-offload":
        return plan(cfg, mode="sample", resident_experts=RESIDENT, prompt_tokens=len(PROMPT),
                    context=len(PROMPT) + SAMPLE_TOKENS)["total_bytes"]
    if name.startswith("train"):
        opt, dtype, _ = TRAIN[name]
        return plan(ModelConfig(**{**MODEL, "context": TRAIN_CONTEXT}), batch=BATCH, optimizer=opt, state_dtype=dtype,
                    expert_state_fraction=extra.get("expert_state_fraction", 1.0))["total_bytes"]
    return 0


def _build_checkpoint(out: Path) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from tinymoe.io import checkpoint
    from tinymoe.config import ModelConfig, to_dict
    from tinymoe.nn.model import Model

    run = out / "ckpt-run"
    if (run / "latest").exists():
        return checkpoint.resolve(run)
    mx.random.seed(0)
    model = Model(ModelConfig(**MODEL), "grouped")
    mx.eval(model.parameters())
    manifest = {"model": to_dict(ModelConfig(**MODEL)), "tokenizer": {"kind": "bytes", "vocab_size": 256}}
    return checkpoint.save(run, 0, dict(tree_flatten(model.parameters())), {}, manifest)


SCENARIOS = ["baseline", "open-plain", "open-mapped", "sample-all", "sample-offload", *TRAIN]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/tinymoe-memory")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--scenario", help=argparse.SUPPRESS)  # internal: run one scenario
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.scenario:
        print(json.dumps(_scenario(args.scenario, args.ckpt, args.out)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _build_checkpoint(out)
    rows, base = [], None
    for name in SCENARIOS:
        proc = subprocess.run([sys.executable, __file__, "--scenario", name, "--ckpt", str(ckpt), "--out", str(out)],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"scenario {name} failed:\n{proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if name == "baseline":
            base = r["rss_bytes"]
            continue
        r.update(name=name, predicted_bytes=_predict(name, r))
        rows.append(r)
    mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    if args.markdown:
        print("| scenario | predicted MiB | MLX peak MiB | RSS above baseline MiB | notes |")
        print("|---|---:|---:|---:|---|")
    for r in rows:
        notes = ", ".join(f"{k} {r[k]}" for k in ("tokens_per_s", "hit_rate", "expert_state_fraction", "seconds")
                          if k in r)
        if args.markdown:
            print(f"| {r['name']} | {mib(r['predicted_bytes'])} | {mib(r['mlx_bytes'])} | "
                  f"{mib(r['rss_delta_bytes'])} | {notes} |")
        else:
            print(f"{r['name']:<26} predicted {mib(r['predicted_bytes']):>8}  mlx {mib(r['mlx_bytes']):>8}  "
                  f"rss+ {mib(r['rss_delta_bytes']):>8}  {notes}")
    print(f"baseline RSS (imports only): {mib(base)} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
