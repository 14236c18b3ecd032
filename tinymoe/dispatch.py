"""Dispatch backends: move each token to its top-k experts, run the experts, combine back.

Shapes: T tokens, K slots per token, N = T*K (token, slot) pairs, E experts, D model width,
H expert hidden width. Expert weights are stacked: w_gate, w_up (E, H, D) and w_down (E, D, H).

Every backend computes y[t] = sum_k gates[t,k] * SwiGLU_{idx[t,k]}(x[t]) and is tested against
`dense`, which runs every expert on every token (the reference: simple, and E/K times the work).
The sparse backends share one `DispatchPlan`: pairs sorted by expert, so each expert's tokens are
a contiguous segment of the sorted rows.
  gather   one `mx.gather_mm` per projection over the sorted rows (mlx-lm's way; fast on Metal,
           one GEMV per row on CPU).
  grouped  one ordinary matmul per non-empty expert segment (fast on CPU with a real BLAS). The
           segment lengths are read on the host, so a step using it cannot be `mx.compile`d.
  metal    the fused gather/combine kernels of tinymoe.kernels + sorted gather_mm; on a machine
           without Metal the kernels fall back to their pure-MLX references.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

BACKENDS = ("dense", "gather", "grouped", "metal")
# Backends whose graphs have no host synchronisation, so `mx.compile` can trace them.
COMPILABLE = ("dense", "gather", "metal")


def resolve_backend(name: str) -> str:
    """`auto`: Metal kernels on a Mac GPU, per-expert matmuls on CPU (see docs/performance.md)."""
    if name != "auto":
        return name
    if mx.default_device() == mx.gpu and mx.metal.is_available():
        return "metal"
    if mx.default_device() == mx.gpu:
        return "gather"  # CUDA backend: gather_mm runs batched on the GPU
    return "grouped"


@dataclass
class DispatchPlan:
    order: mx.array  # (N,) uint32: sorted row p holds pair order[p] (pair = t*K + k)
    pos: mx.array  # (T, K) uint32: inverse permutation, pair (t, k) is sorted row pos[t, k]
    expert_of_row: mx.array  # (N,) uint32: expert id of each sorted row (non-decreasing)
    token_of_row: mx.array  # (N,) uint32: token of each sorted row
    counts: mx.array  # (E,) int32: rows per expert


def make_plan(indices_TK: mx.array, num_experts: int) -> DispatchPlan:
    T, K = indices_TK.shape
    flat = mx.stop_gradient(indices_TK).reshape(-1).astype(mx.uint32)
    order = mx.argsort(flat).astype(mx.uint32)
    pos = mx.argsort(order).astype(mx.uint32).reshape(T, K)  # argsort of a permutation inverts it
    expert_of_row = flat[order]
    counts = mx.sum(flat[None, :] == mx.arange(num_experts, dtype=mx.uint32)[:, None], axis=1)
    return DispatchPlan(order, pos, expert_of_row, order // K, counts.astype(mx.int32))


def _combine_sorted(ys_ND: mx.array, plan: DispatchPlan, gates_TK: mx.array) -> mx.array:
    """y[t] = sum_k gates[t,k] * ys[pos[t,k]]: a gather, so its gradient is a gather too."""
    picked = ys_ND[plan.pos]  # (T, K, D)
    return mx.sum(picked * gates_TK[..., None].astype(ys_ND.dtype), axis=1)


def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


def dense(x_TD, indices_TK, gates_TK, w_gate, w_up, w_down):
    """Reference: every expert on every token, then a gate-weighted sum over the chosen ones."""
    E = w_gate.shape[0]
    h = _swiglu(x_TD @ w_gate.swapaxes(1, 2), x_TD @ w_up.swapaxes(1, 2))  # (E, T, H)
    y_ETD = h @ w_down.swapaxes(1, 2)  # (E, T, D)
    onehot = indices_TK[..., None] == mx.arange(E)  # (T, K, E)
    weight_TE = mx.sum(onehot * gates_TK[..., None], axis=1).astype(x_TD.dtype)  # (T, E)
    return mx.sum(weight_TE.T[..., None] * y_ETD, axis=0)


def gather(x_TD, indices_TK, gates_TK, w_gate, w_up, w_down):
    plan = make_plan(indices_TK, w_gate.shape[0])
    xs = x_TD[plan.token_of_row][:, None, :]  # (N, 1, D)
    return _combine_sorted(_gather_mm_experts(xs, plan, w_gate, w_up, w_down), plan, gates_TK)


def _gather_mm_experts(xs_N1D, plan, w_gate, w_up, w_down):
    eid = plan.expert_of_row
    mm = lambda a, w: mx.gather_mm(a, w.swapaxes(1, 2), rhs_indices=eid, sorted_indices=True)
    h = _swiglu(mm(xs_N1D, w_gate), mm(xs_N1D, w_up))  # (N, 1, H)
    return mm(h, w_down).squeeze(1)  # (N, D)


def grouped(x_TD, indices_TK, gates_TK, w_gate, w_up, w_down):
    E = w_gate.shape[0]
    plan = make_plan(indices_TK, E)
    counts = plan.counts.tolist()  # host sync: segment boundaries are data
    xs = x_TD[plan.token_of_row]  # (N, D)
    bounds, acc = [], 0
    for c in counts[:-1]:
        acc += c
        bounds.append(acc)
    x_segments = mx.split(xs, bounds, axis=0) if bounds else [xs]
    # split (not indexing) so each weight's gradient is one concatenate, not E scatters.
    wg, wu, wd = (mx.split(w, E, axis=0) if E > 1 else [w] for w in (w_gate, w_up, w_down))
    outs = []
    for e, xe in enumerate(x_segments):
        if counts[e] == 0:
            continue
        h = _swiglu(xe @ wg[e][0].T, xe @ wu[e][0].T)
        outs.append(h @ wd[e][0].T)
    ys = mx.concatenate(outs, axis=0)  # (N, D) in sorted order
    return _combine_sorted(ys, plan, gates_TK)


def metal(x_TD, indices_TK, gates_TK, w_gate, w_up, w_down):
    from tinymoe.kernels import dispatch as kernels

    K = indices_TK.shape[1]
    plan = make_plan(indices_TK, w_gate.shape[0])
    xs = kernels.gather_rows(x_TD, plan.order, K)[:, None, :]
    ys = _gather_mm_experts(xs, plan, w_gate, w_up, w_down)
    return kernels.combine(ys, plan.pos, gates_TK, plan.order)


_FUNCS = {"dense": dense, "gather": gather, "grouped": grouped, "metal": metal}


def run_experts(backend: str, x_TD, indices_TK, gates_TK, w_gate, w_up, w_down) -> mx.array:
    """y (T, D) for tokens x (T, D) routed to experts `indices` (T, K) with weights `gates`."""
    return _FUNCS[backend](x_TD, mx.stop_gradient(indices_TK), gates_TK, w_gate, w_up, w_down)
