"""Training tokens/s in one process and in 2 local ranks (data parallel, experts split).

Runs the real command, `tinymoe train` (under `mlx.launch -n 2 --backend ring` for the ranks),
with the same global batch in every layout, and reads the trainer's own tokens/s from
metrics.jsonl (rank 0's clock, every step logged; the median over the steps after the first
`--warmup`, which include compilation). Layouts run in turn, `--repeats` rounds, so a drift in
machine load hits them alike; the median of the rounds is kept.

Two ranks on one machine share its cores: on a 2-core machine this shows that the distributed
path runs and what its exchanges cost, not a speed-up (that needs a second machine).

    python benchmarks/distributed.py                      # tiny, MoE 8 x top-2, 30 steps
    python benchmarks/distributed.py --preset debug --steps 10 --json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tinymoe.quick import quick

BIN = Path(sys.executable).parent
LAYOUTS = {"1 process": [], "2 ranks, data parallel": ["--expert-parallel", "1"],
           "2 ranks, experts split": ["--expert-parallel", "2"]}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(layout: str, args, folder: Path) -> float:
    """Median tokens/s of one training run in `layout`."""
    out = folder / f"run-{abs(hash((layout, os.urandom(4))))}"
    train = [str(BIN / "tinymoe"), "train", "--preset", args.preset, "--steps", str(args.steps), "--quiet",
             "--set", "log_every=1", "--set", "eval_every=0", "--out", str(out)]
    if args.experts:
        train += ["--moe-experts", str(args.experts), "--moe-topk", str(args.top_k)]
    if layout != "1 process":
        train = [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "--starting-port", str(_port()), "--",
                 *train, *LAYOUTS[layout]]
    env = {k: v for k, v in os.environ.items() if k not in ("TINYMOE_MAX_STEPS", "TINYMOE_QUICK")}
    result = subprocess.run(train, env=env, capture_output=True, text=True, timeout=3600)
    if "error" in result.stderr or not (out / "metrics.jsonl").exists():
        raise SystemExit(f"{layout}: {result.stderr.strip()[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > args.warmup]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--experts", type=int, default=8, help="0 = the preset's own")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if quick():  # the smallest case, once
        args.preset, args.experts, args.steps, args.warmup, args.repeats = "debug", 0, 4, 1, 1
    with tempfile.TemporaryDirectory(prefix="tinymoe-bench-dist-") as tmp:
        rates = {layout: [] for layout in LAYOUTS}
        for _ in range(args.repeats):
            for layout in LAYOUTS:
                rates[layout].append(run_once(layout, args, Path(tmp)))
    base = statistics.median(rates["1 process"])
    rows = [{"layout": layout, "preset": args.preset, "experts": args.experts, "top_k": args.top_k,
             "steps": args.steps, "tokens_per_s": round(statistics.median(r), 1),
             "vs_1_process": round(statistics.median(r) / base, 3), "cpus": os.cpu_count()}
            for layout, r in rates.items()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'layout':<24} {'tokens/s':>10} {'vs 1 process':>13}   ({args.preset}, {os.cpu_count()} CPUs)")
    for r in rows:
        print(f"{r['layout']:<24} {r['tokens_per_s']:>10.0f} {r['vs_1_process']:>12.2f}x")


if __name__ == "__main__":
    main()
