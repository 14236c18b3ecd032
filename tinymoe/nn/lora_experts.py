"""Routed experts with stacked low-rank adapters, over the same routing as the base experts.

Shapes: T tokens, K slots, N = T*K (token, slot) rows, E experts, D model width, H expert width,
r adapter rank. Expert e's projection W_e (out, in) gains s B_e A_e with A (E, r, in), B (E, out, r).

Each backend keeps its base computation and adds the adapters to the pre-activations (gate, up)
and to the output (down) of exactly the rows routed to each expert: the adapters' two products
are `mx.gather_mm`s over the rows' expert ids, the same ids the base product uses, so a token pays
for its K experts' adapters only (2 r (in + out) multiply-adds per row and projection, against
out x in for the base). `gather_mm` differentiates with respect to the stacked A and B, whose
gradients are therefore (E, r, in) and (E, out, r) arrays written once, like the weights.

  dense    the reference: the merged weights W_e + s B_e A_e, every expert on every token
  gather   the base by `gathered_matmul` (gather_mm / gather_qmm), rows sorted by expert
  grouped  the base by one matmul per expert segment (the CPU default; quantized bases pick
           their kernel per segment as tinymoe.nn.dispatch does), segment sizes read on the host
  metal    as gather

With B = 0 every backend computes its base path's very operations plus exact zeros, so a fresh
adapter changes no output bit (tests/test_finetune.py).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from tinymoe.nn.dispatch import SORT_MIN_ROWS, _combine_sorted, _swiglu, _swiglu_forward, make_plan, run_experts
from tinymoe.nn.quantized import expert_matmul, gathered_matmul, num_experts


def _low_rank(a, adapter, ids, sorted_ids: bool):
    """(a A_e^T) B_e^T for each row's expert e = ids[row]; a (..., 1, in) -> (..., 1, out)."""
    lora_a, lora_b = adapter
    r = mx.gather_mm(a, lora_a.swapaxes(-1, -2).astype(a.dtype), rhs_indices=ids, sorted_indices=sorted_ids)
    return mx.gather_mm(r, lora_b.swapaxes(-1, -2).astype(a.dtype), rhs_indices=ids, sorted_indices=sorted_ids)


def run_adapted_experts(backend, x_TD, indices_TK, gates_TK, weights, adapters, scale: float, merged):
    """y (T, D) of the adapted experts. weights: base (w_gate, w_up, w_down), arrays or QWeights;
    adapters: ((A, B) per projection); merged: a callable giving the merged float weights."""
    indices_TK = mx.stop_gradient(indices_TK)
    if backend == "dense":
        return run_experts("dense", x_TD, indices_TK, gates_TK, *merged())
    if backend == "grouped":
        return _grouped(x_TD, indices_TK, gates_TK, weights, adapters, scale)
    return _gather(x_TD, indices_TK, gates_TK, weights, adapters, scale)


def _gather(x_TD, indices_TK, gates_TK, weights, adapters, scale):
    w_gate, w_up, w_down = weights
    (ag, au, ad) = adapters
    if indices_TK.size < SORT_MIN_ROWS:  # a few rows: each token's K experts in routing order
        xs = x_TD[:, None, None, :]  # (T, 1, 1, D), broadcast against indices (T, K)
        ids, sorted_ids = indices_TK, False
    else:
        plan = make_plan(indices_TK, num_experts(w_gate))
        xs = x_TD[plan.token_of_row][:, None, :]  # (N, 1, D)
        ids, sorted_ids = plan.expert_of_row, True

    def project(a, w, adapter):
        return gathered_matmul(a, w, ids, sorted_ids) + scale * _low_rank(a, adapter, ids, sorted_ids)

    h = _swiglu(project(xs, w_gate, ag), project(xs, w_up, au))
    ys = project(h, w_down, ad)
    if not sorted_ids:
        ys = ys.squeeze(2)  # (T, K, D)
        return mx.sum(ys * gates_TK[..., None].astype(ys.dtype), axis=1)
    return _combine_sorted(ys.squeeze(1), plan, gates_TK)


def _grouped(x_TD, indices_TK, gates_TK, weights, adapters, scale):
    from tinymoe.nn.kernels import dispatch as kernels

    w_gate, w_up, w_down = weights
    (ag, au, ad) = adapters
    K = indices_TK.shape[1]
    plan = make_plan(indices_TK, num_experts(w_gate))
    counts = plan.counts.tolist()  # host sync: segment boundaries are data
    used = [e for e, c in enumerate(counts) if c]
    inner = np.cumsum(counts)[:-1].tolist()
    ids = plan.expert_of_row

    def segments(a):  # the used experts' rows of a (N, ...), each a contiguous slice
        parts = mx.split(a, inner, axis=0) if inner else [a]
        return [parts[e] for e in used]

    def cat(parts):
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)

    xs = kernels.gather_rows(x_TD, plan.order, K, plan.pos)  # (N, D) expert-sorted
    low_g = segments(_low_rank(xs[:, None, :], ag, ids, True).squeeze(1))  # (n_e, H) each
    low_u = segments(_low_rank(xs[:, None, :], au, ids, True).squeeze(1))
    hs = []
    for i, (e, xe) in enumerate(zip(used, segments(xs))):
        gate = expert_matmul(xe, w_gate, e) + scale * low_g[i]
        up = expert_matmul(xe, w_up, e) + scale * low_u[i]
        hs.append(_swiglu_forward(gate, up)[1])
    low_d = segments(_low_rank(cat(hs)[:, None, :], ad, ids, True).squeeze(1))  # (n_e, D) each
    ys = cat([expert_matmul(h, w_down, e) + scale * low_d[i] for i, (e, h) in enumerate(zip(used, hs))])
    return kernels.combine(ys, plan.pos, gates_TK, plan.order)
