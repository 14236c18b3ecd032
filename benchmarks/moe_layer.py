"""Time one MoE SwiGLU layer per dispatch backend against a dense SwiGLU FFN of equal active size.

For every point (E experts, top-k, T tokens) the script builds one problem: tokens x (T, D),
uniformly random top-k routing, softmax gates and stacked expert weights (E, H, D) / (E, D, H).
The dense twin is an ordinary SwiGLU FFN with hidden width k * H, so both do the same matmul
FLOPs per token. What is timed is a training step's share of the layer: forward plus backward
(`mx.value_and_grad` wrt x, the gates and all weights), evaluated. Each function is warmed up,
then the twin and the backends are timed round-robin (so drift from other processes on the
machine hits them alike) and the median is kept; `ratio` is backend ms / dense twin ms.

Each row also gives `floor`, a lower bound on the ratio from memory traffic alone: a training
step must read the weights of every expert that got a token twice (forward, and backward for the
input gradient) and write the gradient of all E experts once, while the twin touches only its k*H
hidden units' weights. Those bytes at the copy bandwidth measured at the start of the run, over
the twin's time, are what no dispatch can beat on that machine; where `floor` is above 1.2 the
point is bound by memory, not by dispatch.

Points that would take minutes on a CPU (the `dense` backend runs every expert on every token,
`gather` runs one GEMV per row on CPU) are skipped from an estimate, and the table says so.

    python benchmarks/moe_layer.py                  # full sweep (several minutes on 2 cores)
    python benchmarks/moe_layer.py --quick          # a small subset
    python benchmarks/moe_layer.py --backends grouped --experts 256 --tokens 4096 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

# Before mlx.core: on Linux this preloads OpenBLAS, without which every number here is ~10x off.
import tinymoe  # noqa: F401
from tinymoe import backend as tm_backend
from tinymoe.quick import quick

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from tinymoe.nn import dispatch  # noqa: E402

FULL = {"experts": (8, 64, 256), "top_k": (1, 2, 8), "tokens": (512, 4096)}
QUICK = {"experts": (8, 64), "top_k": (1, 2), "tokens": (512,)}

# Expected time of one call relative to the dense twin, used only to skip hopeless points. The
# `dense` backend does E/k times the twin's FLOPs by construction. On CPU, gather_mm runs one
# matrix-vector product per row and reads a whole expert matrix for each: measured at 2.8-3.3x
# the twin for E=8, 3.3-3.8x for E=64 and 5-9x for E=256 on the reference machine (2-core
# x86-64, OpenBLAS), hence 3 + E/32. Other backends (grouped) are always run.
GATHER_MM_BACKENDS = ("gather", "metal")


def estimated_slowdown(backend: str, experts: int, top_k: int) -> float:
    if backend == "dense":
        return experts / top_k
    if backend in GATHER_MM_BACKENDS and mx.default_device() == mx.cpu:
        return 3.0 + experts / 32
    return 0.0


def make_problem(experts, top_k, tokens, d_model, d_expert, seed=0):
    """Arrays for one point: the MoE's inputs and weights, and the dense twin's weights."""
    mx.random.seed(seed)
    T, D, H, K, E = tokens, d_model, d_expert, top_k, experts
    scale = D**-0.5
    x = mx.random.normal((T, D))
    indices = mx.argsort(mx.random.uniform(shape=(T, E)), axis=-1)[:, :K].astype(mx.uint32)
    gates = mx.softmax(mx.random.normal((T, K)), axis=-1)  # (T, K)
    w_moe = [mx.random.normal(s) * scale for s in ((E, H, D), (E, H, D), (E, D, H))]
    w_twin = [mx.random.normal(s) * scale for s in ((K * H, D), (K * H, D), (D, K * H))]
    probe = mx.random.normal((T, D))  # a fixed cotangent, so the loss is not a plain sum
    mx.eval(x, indices, gates, w_moe, w_twin, probe)
    return x, indices, gates, w_moe, w_twin, probe


def twin_step(x, w_twin, probe):
    def loss(x, wg, wu, wd):
        h = nn.silu(x @ wg.T) * (x @ wu.T)  # (T, kH)
        return mx.sum((h @ wd.T) * probe)

    grad_fn = mx.value_and_grad(loss, argnums=(0, 1, 2, 3))
    return lambda: grad_fn(x, *w_twin)


def moe_step(backend, x, indices, gates, w_moe, probe):
    def loss(x, gates, wg, wu, wd):
        return mx.sum(dispatch.run_experts(backend, x, indices, gates, wg, wu, wd) * probe)

    grad_fn = mx.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))
    return lambda: grad_fn(x, gates, *w_moe)


def copy_bandwidth_gbs(mbytes: int = 256) -> float:
    """Bytes moved per second (read + write) by one large elementwise copy, best of 3."""
    a = mx.random.uniform(shape=(mbytes * 2**20 // 4,))
    mx.eval(a)
    best = min(timed_ms(lambda: a * 1.0) for _ in range(3))
    return 2 * a.nbytes / (best / 1e3) / 1e9


def traffic_floor_ms(indices, experts, d_model, d_expert, gbs: float) -> float:
    """Expert-weight bytes a training step must move (see the module docstring), in ms."""
    used = len(set(mx.flatten(indices).tolist()))
    per_expert = 3 * d_model * d_expert * 4  # float32 w_gate, w_up, w_down
    return (2 * used + experts) * per_expert / (gbs * 1e9) * 1e3


def timed_ms(step) -> float:
    start = time.perf_counter()
    mx.eval(step())
    return (time.perf_counter() - start) * 1e3


def run_point(experts, top_k, tokens, args) -> list[dict]:
    x, indices, gates, w_moe, w_twin, probe = make_problem(
        experts, top_k, tokens, args.d_model, args.d_expert, args.seed)
    twin = twin_step(x, w_twin, probe)
    twin_warm = [timed_ms(twin) for _ in range(max(1, args.warmup))]
    base = {"experts": experts, "top_k": top_k, "tokens": tokens,
            "d_model": args.d_model, "d_expert": args.d_expert}
    steps, records = {}, {}
    for name in args.backends:
        est_s = min(twin_warm) / 1e3 * estimated_slowdown(name, experts, top_k)
        if est_s > args.max_seconds:
            records[name] = dict(base, backend=name, ms=None, dense_ms=None, ratio=None, floor=None,
                                 skipped=f"est. {est_s:.0f} s/call > {args.max_seconds:g} s")
            continue
        steps[name] = moe_step(name, x, indices, gates, w_moe, probe)
        for _ in range(max(1, args.warmup)):
            timed_ms(steps[name])
    times = {name: [] for name in ["<twin>", *steps]}
    for _ in range(args.repeats):  # round-robin: slow drifts in machine load hit all alike
        times["<twin>"].append(timed_ms(twin))
        for name, step in steps.items():
            times[name].append(timed_ms(step))
    dense_ms = statistics.median(times["<twin>"])
    floor = traffic_floor_ms(indices, experts, args.d_model, args.d_expert, args.bandwidth) / dense_ms
    for name in steps:
        ms = statistics.median(times[name])
        records[name] = dict(base, backend=name, ms=round(ms, 2), dense_ms=round(dense_ms, 2),
                             ratio=round(ms / dense_ms, 3), floor=round(floor, 3))
    del x, indices, gates, w_moe, w_twin, probe, steps, twin
    mx.clear_cache()
    return [records[name] for name in args.backends]


def machine_line() -> str:
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
            f"MLX {mx.__version__} ({device}), BLAS: {tm_backend.blas_in_use()}")


def format_table(records) -> str:
    head = f"{'E':>4} {'k':>2} {'T':>5}  {'backend':8} {'ms':>9} {'dense ms':>9} {'ratio':>6} {'floor':>6}"
    lines = [head, "-" * len(head)]
    for r in records:
        lead = f"{r['experts']:>4} {r['top_k']:>2} {r['tokens']:>5}  {r['backend']:8}"
        if r["ms"] is None:
            lines.append(f"{lead} skipped: {r['skipped']}")
        else:
            lines.append(f"{lead} {r['ms']:9.1f} {r['dense_ms']:9.1f} {r['ratio']:6.2f} {r['floor']:6.2f}")
    return "\n".join(lines)


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default=",".join(dispatch.BACKENDS),
                   help="comma-separated dispatch backends (default: all)")
    p.add_argument("--experts", type=int_list, help="comma-separated E values (default 8,64,256)")
    p.add_argument("--top-k", type=int_list, help="comma-separated k values (default 1,2,8; "
                   "only k <= E/4 is run)")
    p.add_argument("--tokens", type=int_list, help="comma-separated T values (default 512,4096)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-expert", type=int, default=512, help="expert hidden width H")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per function")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per function (median)")
    p.add_argument("--max-seconds", type=float, default=10.0,
                   help="skip a backend at a point when one call is estimated to take longer")
    p.add_argument("--quick", action="store_true",
                   help="E 8,64, k 1,2, T 512, 3 repeats (unless given explicitly)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    args = p.parse_args(argv)
    grid = QUICK if args.quick else FULL
    args.experts = args.experts or grid["experts"]
    args.top_k = args.top_k or grid["top_k"]
    args.tokens = args.tokens or grid["tokens"]
    if args.quick and "--repeats" not in (argv if argv is not None else sys.argv):
        args.repeats = 3
    if quick():  # TINYMOE_QUICK (tinymoe/quick.py): try the command quickly (the docs check): one small case
        args.experts, args.top_k, args.tokens, args.warmup, args.repeats = [8], [2], [512], 1, 1
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in args.backends if b not in dispatch.BACKENDS]
    if unknown:
        p.error(f"unknown backend(s) {', '.join(unknown)}; choose from {dispatch.BACKENDS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    points = [(E, k, T) for E in args.experts for k in args.top_k for T in args.tokens
              if k <= E // 4]
    log = sys.stderr if args.json else sys.stdout
    args.bandwidth = copy_bandwidth_gbs()
    print(f"# {machine_line()}, copy bandwidth {args.bandwidth:.1f} GB/s", file=log)
    print(f"# d_model {args.d_model}, d_expert {args.d_expert}, warmup {args.warmup}, "
          f"repeats {args.repeats} (median), forward+backward wrt x, gates and weights", file=log)
    records = []
    for E, k, T in points:
        start = time.perf_counter()
        point = run_point(E, k, T, args)
        records.extend(point)
        print(f"# E={E} k={k} T={T} done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print(format_table(records))
        skipped = [r for r in records if r["ms"] is None]
        if skipped:
            print(f"# {len(skipped)} point(s) skipped as too slow for this machine "
                  f"(raise --max-seconds to run them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
