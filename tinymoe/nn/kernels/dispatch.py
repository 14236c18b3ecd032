"""Fused MoE dispatch ops: gather token rows into expert-sorted order, and combine them back.

Shapes: T tokens, K slots per token, N = T*K (token, slot) pairs, D model width. The caller's
dispatch plan sorts the pairs by expert id: `order` (N,) uint32 says sorted row p holds pair
order[p] (pair = t*K + k, so its token is order[p] // K) and `pos` (T, K) uint32 is the inverse
permutation (pair (t, k) sits at sorted row pos[t, k]). With both, every forward and backward
pass is a *gather* (each output element reads its own inputs; no scatter, no atomics):
  gather_rows  forward  xs[p] = x[order[p] // K]
               backward dx[t] = sum_k dxs[pos[t, k]]
  combine      forward  y[t] = sum_k gates[t, k] * ys[pos[t, k]]
               backward dys[p] = gates.flat[order[p]] * dy[order[p] // K]
                        dgates[t, k] = <dy[t], ys[pos[t, k]]>
Each op is an `mx.custom_function` whose forward and vjp launch the kernels of
tinymoe.nn.kernels.sources where they can run (tinymoe.nn.kernels.launch: a GPU default device,
a kernel dtype, a grid that fits) and are trusted (tinymoe.nn.kernels.trust: they passed their
first-use check there), and the references of tinymoe.nn.kernels.references everywhere else, so
the same gather-form vjp is exercised on every machine.
"""

from __future__ import annotations

import mlx.core as mx

from tinymoe.nn.kernels import launch, trust
from tinymoe.nn.kernels.references import (  # noqa: F401 (re-exported: the ops' public companions)
    combine_grad_gates_reference,
    combine_grad_ys_reference,
    combine_reference,
    gather_rows_grad_reference,
    gather_rows_reference,
)

# --------------------------------------------------------------------------- forward / backward


def _backend(dtypes, n_threads):
    """The kernel backend for one call, or None for the references."""
    backend = launch.backend_for(dtypes, n_threads)
    return backend if backend is not None and trust.kernels_trusted() else None


def _gather_rows_forward(x_TD, order_N, top_k):
    N, D = order_N.shape[0], x_TD.shape[1]
    backend = _backend([x_TD.dtype], launch.grid_threads("gather_rows", (N, D)))
    if backend is None:
        return gather_rows_reference(x_TD, order_N, top_k)
    ints = [("D", D), ("K", top_k)]
    return launch.launch("gather_rows", backend, [x_TD, order_N], ints, (N, D), x_TD.dtype)


def _gather_rows_backward(dxs_ND, pos_TK, dtype):
    (T, K), D = pos_TK.shape, dxs_ND.shape[1]
    backend = _backend([dtype], launch.grid_threads("gather_rows_grad", (T, D)))
    if backend is None:
        return gather_rows_grad_reference(dxs_ND, pos_TK).astype(dtype)
    inputs = [dxs_ND.astype(dtype), pos_TK]
    return launch.launch("gather_rows_grad", backend, inputs, [("D", D), ("K", K)], (T, D), dtype)


def _combine_forward(ys_ND, pos_TK, gates_TK):
    (T, K), D = pos_TK.shape, ys_ND.shape[1]
    dtypes = [ys_ND.dtype, gates_TK.dtype]
    backend = _backend(dtypes, launch.grid_threads("combine", (T, D)))
    if backend is None:
        return combine_reference(ys_ND, pos_TK, gates_TK)
    inputs = [ys_ND, pos_TK, gates_TK]
    return launch.launch("combine", backend, inputs, [("D", D), ("K", K)], (T, D), ys_ND.dtype)


def _combine_backward(dy_TD, ys_ND, pos_TK, gates_TK, order_N):
    """(dys (N, D) in ys's dtype, dgates (T, K) in gates's dtype)."""
    (T, K), (N, D) = pos_TK.shape, ys_ND.shape
    dy_TD = dy_TD.astype(ys_ND.dtype)
    n_threads = max(launch.grid_threads("combine_grad_ys", (N, D)),
                    launch.grid_threads("combine_grad_gates", (T, K)))
    backend = _backend([ys_ND.dtype, gates_TK.dtype], n_threads)
    if backend is None:
        dys_ND = combine_grad_ys_reference(dy_TD, gates_TK, order_N)
        dgates_TK = combine_grad_gates_reference(dy_TD, ys_ND, pos_TK).astype(gates_TK.dtype)
        return dys_ND, dgates_TK
    ints = [("D", D), ("K", K)]
    dys_ND = launch.launch("combine_grad_ys", backend, [dy_TD, gates_TK, order_N], ints, (N, D),
                           ys_ND.dtype)
    dgates_TK = launch.launch("combine_grad_gates", backend, [dy_TD, ys_ND, pos_TK], ints, (T, K),
                              gates_TK.dtype)
    return dys_ND, dgates_TK


# The custom functions take both index arrays so that every gradient stays a gather. Indices
# are not differentiable: their cotangents are zeros of their own shape and dtype.


@mx.custom_function
def _gather_rows_op(x_TD, order_N, pos_TK):
    return _gather_rows_forward(x_TD, order_N, pos_TK.shape[1])


@_gather_rows_op.vjp
def _gather_rows_vjp(primals, dxs_ND, xs_ND):
    x_TD, order_N, pos_TK = primals
    dx_TD = _gather_rows_backward(dxs_ND, pos_TK, x_TD.dtype)
    return dx_TD, mx.zeros_like(order_N), mx.zeros_like(pos_TK)


@mx.custom_function
def _combine_op(ys_ND, pos_TK, gates_TK, order_N):
    return _combine_forward(ys_ND, pos_TK, gates_TK)


@_combine_op.vjp
def _combine_vjp(primals, dy_TD, y_TD):
    ys_ND, pos_TK, gates_TK, order_N = primals
    dys_ND, dgates_TK = _combine_backward(dy_TD, ys_ND, pos_TK, gates_TK, order_N)
    return dys_ND, mx.zeros_like(pos_TK), dgates_TK, mx.zeros_like(order_N)


# --------------------------------------------------------------------------- public ops


def _as_index(a: mx.array) -> mx.array:
    return mx.stop_gradient(a.astype(mx.uint32))


def _inverse_permutation(perm_N: mx.array) -> mx.array:
    # argsort of a permutation is its inverse; O(N log N) but only paid when the caller has
    # not kept both halves of the plan.
    return mx.argsort(perm_N).astype(mx.uint32)


def gather_rows(x_TD, order_N, top_k, pos_TK=None) -> mx.array:
    """xs (N, D) with xs[p] = x[order[p] // top_k]; a kernel where one can run.

    `pos_TK` (T, K), the inverse of `order`, is what the backward gather needs; pass it when the
    dispatch plan has it, otherwise it is computed here with an argsort.
    """
    if x_TD.ndim != 2 or order_N.ndim != 1 or top_k < 1:
        raise ValueError("gather_rows expects x (T, D), order (N,) and top_k >= 1")
    T = x_TD.shape[0]
    if order_N.shape[0] != T * top_k:
        raise ValueError(f"order has {order_N.shape[0]} rows, expected T*K = {T}*{top_k}")
    order_N = _as_index(order_N)
    if pos_TK is None:
        pos_TK = _inverse_permutation(order_N).reshape(T, top_k)
    elif tuple(pos_TK.shape) != (T, top_k):
        raise ValueError(f"pos has shape {tuple(pos_TK.shape)}, expected ({T}, {top_k})")
    return _gather_rows_op(x_TD, order_N, _as_index(pos_TK))


def combine(ys_ND, pos_TK, gates_TK, order_N=None) -> mx.array:
    """y (T, D) with y[t] = sum_k gates[t, k] * ys[pos[t, k]], in ys's dtype; a kernel where
    one can run.

    `order_N` (N,), the inverse of `pos`, is what the backward gather for ys needs; pass it
    when the dispatch plan has it, otherwise it is computed here with an argsort.
    """
    if ys_ND.ndim != 2 or pos_TK.ndim != 2 or tuple(gates_TK.shape) != tuple(pos_TK.shape):
        raise ValueError("combine expects ys (N, D), pos (T, K) and gates (T, K)")
    T, K = pos_TK.shape
    if ys_ND.shape[0] != T * K:
        raise ValueError(f"ys has {ys_ND.shape[0]} rows, expected T*K = {T}*{K}")
    pos_TK = _as_index(pos_TK)
    if order_N is None:
        order_N = _inverse_permutation(pos_TK.reshape(-1))
    elif tuple(order_N.shape) != (T * K,):
        raise ValueError(f"order has shape {tuple(order_N.shape)}, expected ({T * K},)")
    return _combine_op(ys_ND, pos_TK, gates_TK, _as_index(order_N))
