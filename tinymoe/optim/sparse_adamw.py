"""`--optimizer sparse-adamw`: AdamW with lazily created per-expert state (see tinymoe.optim.lazy)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from tinymoe.errors import TinyMoeError
from tinymoe.optim.lazy import STATE_DTYPES, LazyExpertOptimizer, is_expert_param


class SparseAdamW(LazyExpertOptimizer):
    """AdamW whose expert state is created lazily and only for experts that receive gradient."""

    kind, state_parts = "sparse-adamw", ("m", "v")

    def __init__(self, learning_rate, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 bias_correction: bool = False, state_dtype: str = "float32"):
        if state_dtype not in STATE_DTYPES:
            raise TinyMoeError(f"unknown optimizer state dtype '{state_dtype}' (choose from {', '.join(STATE_DTYPES)})")
        self.schedule = learning_rate if callable(learning_rate) else None
        self.b1, self.b2 = betas
        self.eps, self.weight_decay, self.bias_correction = eps, weight_decay, bias_correction
        self.state_dtype = getattr(mx, state_dtype)
        self.step = 0
        # As in mlx's optimizers: holds the rate of the last update (schedule(0) before any).
        self._lr = mx.array(self.schedule(0) if self.schedule else learning_rate, dtype=mx.float32)
        self.dense: dict[str, dict] = {}  # name -> {"m", "v"}
        self.experts: dict[str, dict[int, dict]] = {}  # name -> expert -> {"m", "v", "t"}

    def init(self, parameters) -> None:
        """Moments for the non-expert weights; none for experts (they appear when used)."""
        for name, p in tree_flatten(parameters):
            if is_expert_param(name):
                self.experts.setdefault(name, {})
            elif name not in self.dense:
                self.dense[name] = {"m": mx.zeros(p.shape, self.state_dtype), "v": mx.zeros(p.shape, self.state_dtype)}

    # -- the update ---------------------------------------------------------------------
    def _adamw(self, g, p, m, v, t: int):
        """AdamW on one slice, the same operations in the same order as mlx.optimizers.AdamW."""
        lr = self._lr.astype(g.dtype)
        p = p * (1 - lr * self.weight_decay)
        m = self.b1 * m + (1 - self.b1) * g
        v = self.b2 * v + (1 - self.b2) * mx.square(g)
        if self.bias_correction:
            t = mx.array(t, dtype=mx.uint64)  # mlx computes the corrections from a uint64 step array
            c1 = (lr / (1 - self.b1**t)).astype(g.dtype)
            c2 = mx.rsqrt(1 - self.b2**t).astype(g.dtype)
            new = p - (c1 * m) / (mx.sqrt(v) * c2 + self.eps)
        else:
            new = p - lr * m / (mx.sqrt(v) + self.eps)
        return new, m.astype(self.state_dtype), v.astype(self.state_dtype)

    def _update_dense(self, name: str, g, p):
        st = self.dense.get(name)
        if st is None:
            st = self.dense[name] = {"m": mx.zeros(g.shape, self.state_dtype), "v": mx.zeros(g.shape, self.state_dtype)}
        new, st["m"], st["v"] = self._adamw(g, p, st["m"], st["v"], self.step)
        return new

    def _update_experts(self, name: str, g, p, active: np.ndarray):
        states = self.experts.setdefault(name, {})
        ids = [int(e) for e in np.flatnonzero(active)]
        if not ids:
            return p
        zeros = mx.zeros(g.shape[1:], self.state_dtype)
        for e in ids:
            if e not in states:
                states[e] = {"m": zeros, "v": zeros, "t": 0}
            states[e]["t"] += 1
        # The active experts are updated together; with bias correction each needs its own t.
        if self.bias_correction:
            rows = {}
            for e in ids:
                s = states[e]
                rows[e], s["m"], s["v"] = self._adamw(g[e], p[e], s["m"], s["v"], s["t"])
        else:
            idx = mx.array(ids)
            m = mx.stack([states[e]["m"] for e in ids])
            v = mx.stack([states[e]["v"] for e in ids])
            new, m, v = self._adamw(g[idx], p[idx], m, v, 0)
            rows = {}
            for i, e in enumerate(ids):
                rows[e], states[e]["m"], states[e]["v"] = new[i], m[i], v[i]
        return mx.stack([rows.get(e, p[e]) for e in range(p.shape[0])])
