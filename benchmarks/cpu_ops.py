"""The primitive costs behind docs/performance.md's "where the time goes", on this machine.

Times, each the best of a few calls after a warm-up:
  sigmoid     mx.sigmoid over a (4096, 1024) float32 array (the tiny MoE layer's (N, H)), next to
              numpy's exp over the same array and to one MLX add (a pure memory pass)
  matmul      (rows x 512) @ (512 x 512) for 64 and 512 rows: an expert with few rows runs at a
              lower FLOP rate than the dense twin's one big product
  copy        the bandwidth of one large elementwise copy (what moe_layer.py's floor uses)

    python benchmarks/cpu_ops.py [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import tinymoe  # noqa: F401  (preloads OpenBLAS before MLX)
from tinymoe.quick import quick

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402


def best_ms(fn, repeats: int = 1 if quick() else 5) -> float:  # TINYMOE_QUICK: once
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def measure() -> list[dict]:
    a_np = np.random.default_rng(0).standard_normal((4096, 1024), dtype=np.float32)
    a = mx.array(a_np)
    rows = [
        {"op": "mx.sigmoid (4096, 1024)", "ms": best_ms(lambda: mx.eval(mx.sigmoid(a)))},
        {"op": "np.exp (4096, 1024)", "ms": best_ms(lambda: np.exp(a_np))},
        {"op": "mx add (4096, 1024)", "ms": best_ms(lambda: mx.eval(a + a))},
    ]
    w = mx.random.normal((512, 512))
    for n in (64, 512):
        x = mx.random.normal((n, 512))
        mx.eval(x, w)
        ms = best_ms(lambda: mx.eval(x @ w))
        rows.append({"op": f"matmul ({n} x 512) @ (512 x 512)", "ms": ms,
                     "gflops": round(2 * n * 512 * 512 / (ms / 1e3) / 1e9, 1)})
    big = mx.random.uniform(shape=(64 * 2**20,))  # 256 MiB
    mx.eval(big)
    ms = best_ms(lambda: mx.eval(big * 1.0), repeats=3)
    rows.append({"op": "copy 256 MiB (read + write)", "ms": ms, "gb_per_s": round(2 * big.nbytes / (ms / 1e3) / 1e9, 2)})
    for r in rows:
        r["ms"] = round(r["ms"], 2)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = measure()
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    for r in rows:
        extra = f"  {r['gflops']} GFLOP/s" if "gflops" in r else f"  {r['gb_per_s']} GB/s" if "gb_per_s" in r else ""
        print(f"{r['op']:36s} {r['ms']:9.2f} ms{extra}")


if __name__ == "__main__":
    main()
