"""Dispatch backends: move each token to its top-k experts, run the experts, combine back.

Shapes: T tokens, K slots per token, N = T*K (token, slot) pairs, E experts, D model width,
H expert hidden width. Expert weights are stacked: w_gate, w_up (E, H, D) and w_down (E, D, H).

Every backend computes y[t] = sum_k gates[t,k] * SwiGLU_{idx[t,k]}(x[t]) and is tested against
`dense`, which runs every expert on every token (the reference: simple, and E/K times the work).
The sparse backends share one `DispatchPlan`: pairs sorted by expert, so each expert's tokens are
a contiguous segment of the sorted rows.
  gather   one `mx.gather_mm` per projection over the sorted rows (mlx-lm's way; fast on Metal,
           one GEMV per row on CPU).
  grouped  one ordinary matmul per non-empty expert segment (fast on CPU with a real BLAS), with
           a hand-written backward whose weight gradients are `mx.segmented_mm`s. The segment
           lengths are read on the host, so a step using it cannot be `mx.compile`d.
  metal    the fused gather/combine kernels of tinymoe.nn.kernels + sorted gather_mm; on a machine
           without Metal the kernels fall back to their pure-MLX references.

Quantized experts (tinymoe.nn.quantized) come as `QWeight`s instead of arrays: `gather` and
`metal` then run `mx.gather_qmm`, `grouped` the faster of a quantized and a dequantized matmul per
expert segment (forward only: quantized models are for inference), and `dense` dequantizes.

`auto` picks a backend per call shape (tinymoe.nn.moe.DECODE_TOKENS): `grouped` reads its segment
lengths on the host, which costs a synchronisation every decoded token and keeps MLX from
computing one step while Python builds the next; at a few rows `gather` has nothing to sort and
no host sync, and decodes about twice as fast (docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from tinymoe.names import DISPATCH_BACKENDS as BACKENDS  # noqa: F401 (named there for config and the CLI)
from tinymoe.nn.quantized import QWeight, as_float, expert_matmul, gathered_matmul, num_experts

# Backends whose graphs have no host synchronisation, so `mx.compile` can trace them.
COMPILABLE = ("dense", "gather", "metal")
# Below this many (token, slot) rows `gather` multiplies in routing order: sorting costs more
# than the ordered weight reads it buys.
SORT_MIN_ROWS = 64


def resolve_backend(name: str) -> str:
    """`auto`: Metal kernels on a Mac GPU once they pass their first-use check on this machine
    (else gather_mm, with one warning), gather_mm on other GPUs, per-expert matmuls on the CPU
    (see docs/performance.md, docs/kernels.md). An explicit `metal` whose kernels failed that
    check raises TinyMoeError; on a CPU default device it runs the kernels' references."""
    from tinymoe.nn.kernels import launch, trust

    if name == "metal":
        trust.require("--moe-dispatch metal")
    if name != "auto":
        return name
    if not launch.default_device_is_gpu():
        return "grouped"
    if launch.device_backend() == "metal":
        v = trust.verdict()
        if v is None or v.ok:
            return "metal"
        trust.warn_once(v, "--moe-dispatch auto uses gather instead")
    return "gather"  # CUDA backend (or untrusted kernels): gather_mm runs batched on the GPU


def resolve_decode_backend(name: str, resolved: str) -> str:
    """The backend for decode-sized calls: `auto` trades `grouped` (a host sync per call) for
    `gather`; an explicit choice is kept."""
    return "gather" if name == "auto" and resolved == "grouped" else resolved


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
    w_gate, w_up, w_down = as_float(w_gate), as_float(w_up), as_float(w_down)
    E = w_gate.shape[0]
    h = _swiglu(x_TD @ w_gate.swapaxes(1, 2), x_TD @ w_up.swapaxes(1, 2))  # (E, T, H)
    y_ETD = h @ w_down.swapaxes(1, 2)  # (E, T, D)
    onehot = indices_TK[..., None] == mx.arange(E)  # (T, K, E)
    weight_TE = mx.sum(onehot * gates_TK[..., None], axis=1).astype(x_TD.dtype)  # (T, E)
    return mx.sum(weight_TE.T[..., None] * y_ETD, axis=0)


_PAIR_ROWS: dict = {}


def pair_rows(T: int, K: int) -> tuple[mx.array, mx.array]:
    """(token of each (token, slot) pair, the pair's own index), each (T, K) uint32: constants,
    kept per shape. Handed to gather_mm as its left indices, they spare each call the index
    arithmetic MLX would add to the graph (an arange, a reshape and a broadcast per matmul), which
    a decoded token pays for at every layer."""
    if (T, K) not in _PAIR_ROWS:
        rows = (mx.broadcast_to(mx.arange(T, dtype=mx.uint32)[:, None], (T, K)) + 0,
                mx.arange(T * K, dtype=mx.uint32).reshape(T, K))
        mx.eval(rows)
        _PAIR_ROWS[(T, K)] = rows
    return _PAIR_ROWS[(T, K)]


def gather(x_TD, indices_TK, gates_TK, w_gate, w_up, w_down):
    if indices_TK.size < SORT_MIN_ROWS:  # decoding: each token's K experts in routing order
        token_of, pair = pair_rows(*indices_TK.shape)
        xs = x_TD[:, None, :]  # (T, 1, D): row token_of[t, k] for pair (t, k)
        mm = lambda a, w, rows: gathered_matmul(a, w, indices_TK, sorted_ids=False, rows=rows)
        h = _swiglu(mm(xs, w_gate, token_of), mm(xs, w_up, token_of))  # (T, K, 1, H)
        ys = mm(h, w_down, pair).squeeze(2)  # (T, K, D)
        return mx.sum(ys * gates_TK[..., None].astype(ys.dtype), axis=1)
    plan = make_plan(indices_TK, num_experts(w_gate))
    xs = x_TD[plan.token_of_row][:, None, :]  # (N, 1, D)
    return _combine_sorted(_gather_mm_experts(xs, plan, w_gate, w_up, w_down), plan, gates_TK)


def _gather_mm_experts(xs_N1D, plan, w_gate, w_up, w_down):
    mm = lambda a, w: gathered_matmul(a, w, plan.expert_of_row, sorted_ids=True)
    h = _swiglu(mm(xs_N1D, w_gate), mm(xs_N1D, w_up))  # (N, 1, H)
    return mm(h, w_down).squeeze(1)  # (N, D)


def grouped(x_TD, indices_TK, gates_TK, w_gate, w_up, w_down):
    from tinymoe.nn.kernels import dispatch as kernels

    K = indices_TK.shape[1]
    plan = make_plan(indices_TK, num_experts(w_gate))
    counts = plan.counts.tolist()  # host sync: segment boundaries are data
    # gather_rows/combine have gather-form vjps: on CPU a scatter-add backward costs ~2x more.
    xs = kernels.gather_rows(x_TD, plan.order, K, plan.pos)  # (N, D) expert-sorted
    if isinstance(w_gate, QWeight):
        ys = _segment_swiglu_quantized(counts, xs, w_gate, w_up, w_down)
    else:
        ys = _segment_swiglu(counts)(xs, w_gate, w_up, w_down)[0]  # (N, D)
    return kernels.combine(ys, plan.pos, gates_TK, plan.order)


def _segment_swiglu_quantized(counts: list[int], xs_ND, w_gate, w_up, w_down):
    """Forward of `_segment_swiglu` for quantized experts, each matmul by the kernel that is
    fastest for its segment's rows (tinymoe.nn.quantized.expert_matmul)."""
    bounds = np.cumsum(counts)[:-1].tolist()
    parts = mx.split(xs_ND, bounds, axis=0) if bounds else [xs_ND]
    ys = []
    for e, xe in enumerate(parts):
        if counts[e]:
            h = _swiglu_forward(expert_matmul(xe, w_gate, e), expert_matmul(xe, w_up, e))[1]
            ys.append(expert_matmul(h, w_down, e))
    return ys[0] if len(ys) == 1 else mx.concatenate(ys, axis=0)


@partial(mx.compile, shapeless=True)
def _swiglu_forward(gate, up):
    """(sigmoid(gate), silu(gate) * up), fused: on CPU each separate elementwise pass is costly."""
    sig = mx.sigmoid(gate)
    return sig, gate * sig * up


@partial(mx.compile, shapeless=True)
def _swiglu_backward(dh, gate, up, sig):
    """(d_up, d_gate, h) of h = silu(gate) * up, from the forward's sigmoid (not recomputed)."""
    silu = gate * sig
    return dh * silu, dh * up * (sig * (1 + gate * (1 - sig))), silu * up  # silu' = s(1 + g(1 - s))


def _segment_swiglu(counts: list[int]):
    """SwiGLU of each expert on its segment of the sorted rows, as one custom-vjp function.

    Returns f(xs (N, D), w_gate, w_up, w_down) -> (ys (N, D), *gate_e, *up_e, *sig_e): after ys,
    each used expert's pre-activations (n_e, H) and sigmoid(gate); they are outputs only so the
    backward pass gets them without recomputing. Keeping the sigmoid matters on CPU, where one
    `mx.sigmoid` over (N, H) costs about as much as four of the layer's matmuls. They stay per
    expert: concatenating them would be a copy of (N, H) each.

    Why a hand-written vjp: autodiff of per-expert slices `w[e]` gives every slice a gradient as
    large as the whole stacked weight (E times the memory and time of the weight; out of memory
    at E=256). Here each weight gradient is written once into (E, ., .), in whichever of two
    ways moves fewer bytes: per-expert matmuls stacked (a copy of the E expert gradients; best
    when the weights are small next to the activations, N > E * D) or one `mx.segmented_mm` over
    the concatenated segments (a copy of the (N, H) activations; best for many experts).
    """
    used = [e for e, c in enumerate(counts) if c]  # experts with rows; the rest get 0 grads
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.uint32)
    segments = mx.array(np.stack([bounds[:-1], bounds[1:]], axis=1))  # (E, 2) row ranges
    inner = [int(b) for b in bounds[1:-1]]
    U = len(used)

    def per_expert(a):  # rows of the experts in `used`, each a contiguous view of `a`
        parts = mx.split(a, inner, axis=0) if inner else [a]
        return [parts[e] for e in used]

    def cat(parts):
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)

    @mx.custom_function
    def swiglu_experts(xs, w_gate, w_up, w_down):
        x_parts = per_expert(xs)
        gates = [xe @ w_gate[e].T for e, xe in zip(used, x_parts)]  # (n_e, H) each
        ups = [xe @ w_up[e].T for e, xe in zip(used, x_parts)]
        sigs, hs = zip(*[_swiglu_forward(g, u) for g, u in zip(gates, ups)])
        ys = cat([he @ w_down[e].T for e, he in zip(used, hs)])  # (N, D)
        return (ys, *gates, *ups, *sigs)

    @swiglu_experts.vjp
    def swiglu_experts_vjp(primals, cotangents, outputs):
        xs, w_gate, w_up, w_down = primals
        E, H, D = w_gate.shape
        gates, ups, sigs = outputs[1:1 + U], outputs[1 + U:1 + 2 * U], outputs[1 + 2 * U:]
        x_parts, dy_parts = per_expert(xs), per_expert(cotangents[0])  # callers use ys only
        d_ups, d_gates, hs, dx_parts = [], [], [], []
        for i, e in enumerate(used):
            dh = dy_parts[i] @ w_down[e]  # (n_e, H)
            d_up, d_gate, h = _swiglu_backward(dh, gates[i], ups[i], sigs[i])
            dx_parts.append(d_gate @ w_gate[e] + d_up @ w_up[e])  # (n_e, D)
            d_ups.append(d_up), d_gates.append(d_gate), hs.append(h)
        if xs.shape[0] > E * D:  # the (E, H, D) gradients are the smaller copy
            def stacked(lhs, rhs, shape):
                per = dict(zip(used, (a.T @ b for a, b in zip(lhs, rhs))))
                return mx.stack([per[e] if e in per else mx.zeros(shape, xs.dtype) for e in range(E)])
            dw_gate, dw_up = stacked(d_gates, x_parts, (H, D)), stacked(d_ups, x_parts, (H, D))
            dw_down = stacked(dy_parts, hs, (D, H))
        else:
            dw_gate = mx.segmented_mm(cat(d_gates).T, xs, segments)  # (E, H, D)
            dw_up = mx.segmented_mm(cat(d_ups).T, xs, segments)
            dw_down = mx.segmented_mm(cotangents[0].T, cat(hs), segments)  # (E, D, H)
        # Mixed dtypes promote in the matmuls; each gradient must match its primal's dtype.
        grads = (cat(dx_parts), dw_gate, dw_up, dw_down)
        return tuple(g.astype(p.dtype) for g, p in zip(grads, primals))

    return swiglu_experts


def metal(x_TD, indices_TK, gates_TK, w_gate, w_up, w_down):
    from tinymoe.nn.kernels import dispatch as kernels

    K = indices_TK.shape[1]
    plan = make_plan(indices_TK, num_experts(w_gate))
    xs = kernels.gather_rows(x_TD, plan.order, K)[:, None, :]
    ys = _gather_mm_experts(xs, plan, w_gate, w_up, w_down)
    return kernels.combine(ys, plan.pos, gates_TK, plan.order)


_FUNCS = {"dense": dense, "gather": gather, "grouped": grouped, "metal": metal}


def run_experts(backend: str, x_TD, indices_TK, gates_TK, w_gate, w_up, w_down) -> mx.array:
    """y (T, D) for tokens x (T, D) routed to experts `indices` (T, K) with weights `gates`."""
    if backend == "gather" and isinstance(w_gate, mx.array) and w_gate.dtype != mx.float32 and _on_cpu():
        backend = "grouped"  # MLX 0.32's gather_mm on the CPU is float32 only (a bfloat16 model decoding)
    return _FUNCS[backend](x_TD, mx.stop_gradient(indices_TK), gates_TK, w_gate, w_up, w_down)


def _on_cpu() -> bool:
    from tinymoe.nn.kernels import launch

    return not launch.default_device_is_gpu()
