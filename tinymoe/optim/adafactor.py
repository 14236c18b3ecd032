"""`--optimizer adafactor`: factored second moments, no momentum, lazy per-expert state.

Adafactor (Shazeer & Stern, 2018) keeps, for a matrix W (R, C), a row statistic r (R,) and a
column statistic c (C,) instead of AdamW's two (R, C) moments. Per update, with G the gradient:

    b2  = 1 - t^-0.8                      t: the updates this slice has had, this one included
    r   = b2 r + (1 - b2) mean_cols(G^2 + eps1)
    c   = b2 c + (1 - b2) mean_rows(G^2 + eps1)
    V   = outer(r, c) / mean(r)           the rank-1 estimate of AdamW's v
    U   = G / sqrt(V),  then  U / max(1, RMS(U) / d)       update clipping, d = 1
    W   = W (1 - lr wd) - lr U            decoupled weight decay, as in AdamW

A vector (norm weights, biases) keeps a full v = b2 v + (1 - b2)(G^2 + eps1). At t = 1, b2 = 0,
so the first update uses G^2 itself and no bias correction is needed. With `beta1` set, a first
moment m = b1 m + (1 - b1) U is kept and used in place of U; it is off by default (the trainer
never sets it): no momentum is what makes the state lean.

The step size is the trainer's learning-rate schedule (warmup + cosine), not the paper's
relative step min(1e-2, 1/sqrt(t)) x RMS(W): `--lr` means a per-element step as it does for
AdamW (a clipped update has RMS <= 1), so the same presets work.

Expert tensors (names containing `.moe.experts.`, shape (E, R, C)) follow SparseAdamW's rule
(tinymoe.optim.lazy): each expert slice is its own matrix with its own r (R,), c (C,) and t,
created the first time its gradient slice is not all zero; an idle expert is left completely
alone (no statistics decay, no weight decay, no update, its t does not advance). Every other
weight is also Adafactor (factored when it has 2 or more dims) with t = the optimizer's step.

`state_dtype="bfloat16"` stores the statistics in bfloat16; the update is computed in float32.
The active set is read on the host, so the update is not `mx.compile`d. State is a flat
name -> array dict, saved in optimizer.safetensors as `<param>.vr`/`.vc` (factored) or `.v`,
and, per expert, `<param>.expert<E>.vr`/`.vc`/`.t` (plus `.m` with beta1).
"""

from __future__ import annotations


import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from tinymoe.errors import TinyMoeError
from tinymoe.optim.lazy import STATE_DTYPES, LazyExpertOptimizer, is_expert_param

EPS1 = 1e-30  # added to G^2: keeps the statistics of an all-zero row or column positive
CLIP_THRESHOLD = 1.0  # d: the largest RMS an update may have
DECAY_EXPONENT = 0.8  # b2_t = 1 - t^-0.8
_PARTS = ("vr", "vc", "v", "m")


def _stat_shapes(slice_shape: tuple) -> dict:
    """The statistics of one weight (or one expert slice): factored over the last two dims."""
    if len(slice_shape) >= 2:
        return {"vr": slice_shape[:-1], "vc": slice_shape[:-2] + slice_shape[-1:]}
    return {"v": slice_shape}


def _per_slice(b, x: mx.array) -> mx.array:
    """A per-slice value b (N,) shaped to broadcast against a batch x (N, ...)."""
    return b.reshape(b.shape + (1,) * (x.ndim - 1))


class Adafactor(LazyExpertOptimizer):
    """Adafactor with lazily created per-expert state; the trainer's schedule is the step size."""

    kind, state_parts = "adafactor", _PARTS

    def __init__(self, learning_rate, beta1: float | None = None, weight_decay: float = 0.0,
                 state_dtype: str = "float32"):
        if state_dtype not in STATE_DTYPES:
            raise TinyMoeError(f"unknown optimizer state dtype '{state_dtype}' (choose from {', '.join(STATE_DTYPES)})")
        self.schedule = learning_rate if callable(learning_rate) else None
        self.beta1, self.weight_decay = beta1, weight_decay
        self.state_dtype = getattr(mx, state_dtype)
        self.step = 0
        # As in mlx's optimizers: holds the rate of the last update (schedule(0) before any).
        self._lr = mx.array(self.schedule(0) if self.schedule else learning_rate, dtype=mx.float32)
        self.dense: dict[str, dict] = {}  # name -> {"vr", "vc"} or {"v"} (+ "m")
        self.experts: dict[str, dict[int, dict]] = {}  # name -> expert -> {"vr", "vc" or "v", "t" (, "m")}

    def _zeros(self, slice_shape: tuple) -> dict:
        st = {k: mx.zeros(s, self.state_dtype) for k, s in _stat_shapes(slice_shape).items()}
        if self.beta1 is not None:
            st["m"] = mx.zeros(slice_shape, self.state_dtype)
        return st

    def init(self, parameters) -> None:
        """Statistics for the non-expert weights; none for experts (they appear when used)."""
        for name, p in tree_flatten(parameters):
            if is_expert_param(name):
                self.experts.setdefault(name, {})
            elif name not in self.dense:
                self.dense[name] = self._zeros(p.shape)

    # -- the update ---------------------------------------------------------------------
    def _adafactor(self, g, p, st: dict, t: np.ndarray):
        """One update of a batch of N slices: g, p (N, ...), st the stacked statistics, t (N,)
        the slices' step counts (this update included). Returns new p and statistics."""
        g = g.astype(mx.float32)
        lr = self._lr
        b2 = mx.array(1.0 - t.astype(np.float64) ** -DECAY_EXPONENT, dtype=mx.float32)  # (N,)
        g2 = mx.square(g) + EPS1
        new = {}
        if "vr" in st:
            rb, cb = _per_slice(b2, st["vr"]), _per_slice(b2, st["vc"])
            r = rb * st["vr"].astype(mx.float32) + (1 - rb) * mx.mean(g2, axis=-1)  # (N, ..., R)
            c = cb * st["vc"].astype(mx.float32) + (1 - cb) * mx.mean(g2, axis=-2)  # (N, ..., C)
            new["vr"], new["vc"] = r, c
            # G / sqrt(outer(r, c) / mean(r)) as a product of two rsqrt factors: the plain form can
            # underflow to 0 (and give 0 * inf) for a row and a column that both had no gradient.
            row_scale = mx.rsqrt(r / mx.mean(r, axis=-1, keepdims=True))
            u = g * row_scale[..., :, None] * mx.rsqrt(c)[..., None, :]
        else:
            vb = _per_slice(b2, st["v"])
            v = vb * st["v"].astype(mx.float32) + (1 - vb) * g2
            new["v"] = v
            u = g * mx.rsqrt(v)
        slice_axes = tuple(range(1, u.ndim))
        rms = mx.sqrt(mx.mean(mx.square(u), axis=slice_axes, keepdims=True)) if slice_axes else mx.abs(u)
        u = u / mx.maximum(1.0, rms / CLIP_THRESHOLD)
        if self.beta1 is not None:
            u = new["m"] = self.beta1 * st["m"].astype(mx.float32) + (1 - self.beta1) * u
        p_new = p.astype(mx.float32) * (1 - lr * self.weight_decay) - lr * u
        return p_new.astype(p.dtype), {k: a.astype(self.state_dtype) for k, a in new.items()}

    def _update_dense(self, name: str, g, p):
        st = self.dense.get(name)
        if st is None:
            st = self.dense[name] = self._zeros(g.shape)
        batch = {k: a[None] for k, a in st.items()}
        new_p, new_st = self._adafactor(g[None], p[None], batch, np.array([self.step]))
        self.dense[name] = {k: a[0] for k, a in new_st.items()}
        return new_p[0]

    def _update_experts(self, name: str, g, p, active: np.ndarray):
        """The active experts of one (E, ...) tensor updated together; idle slices are p's own."""
        states = self.experts.setdefault(name, {})
        ids = [int(e) for e in np.flatnonzero(active)]
        if not ids:
            return p
        for e in ids:
            if e not in states:
                states[e] = {**self._zeros(g.shape[1:]), "t": 0}
            states[e]["t"] += 1
        idx = mx.array(ids)
        batch = {k: mx.stack([states[e][k] for e in ids]) for k in states[ids[0]] if k != "t"}
        new_p, new_st = self._adafactor(g[idx], p[idx], batch, np.array([states[e]["t"] for e in ids]))
        rows = {}
        for i, e in enumerate(ids):
            rows[e] = new_p[i]
            states[e].update({k: a[i] for k, a in new_st.items()})
        return mx.stack([rows.get(e, p[e]) for e in range(p.shape[0])])

    def _check_state(self) -> None:
        for name, slot in self.dense.items():
            self._check_slot(name, slot, expert=False)
        for name, per in self.experts.items():
            for e, slot in per.items():
                self._check_slot(f"{name}.expert{e}", slot, expert=True)

    def _check_slot(self, name: str, slot: dict, expert: bool) -> None:
        want = {"vr", "vc"} if "vr" in slot or "vc" in slot else {"v"}
        want |= {"m"} if self.beta1 is not None else set()
        want |= {"t"} if expert else set()
        if set(slot) != want:
            raise TinyMoeError(f"optimizer state for '{name}' has {sorted(slot)}, adafactor expects {sorted(want)}")
