"""Pure-MLX references of the fused dispatch ops: the meaning of every kernel, in plain indexing.

They are what runs wherever a kernel cannot (a CPU default device, a dtype or grid the kernels
do not take, kernels that failed their first-use check), what the first-use check and
`tinymoe selftest` compare the kernels against, and what the C++ emulation tests check the
kernel bodies against. Each accumulates in float32 and rounds once, as the kernels do, so a
correct kernel matches its reference to within one rounding of the output dtype.

Shapes: T tokens, K slots per token, N = T*K pairs, D model width; `order` (N,) and `pos` (T, K)
are the two halves of the dispatch plan's permutation (see tinymoe.nn.kernels.dispatch).
"""

from __future__ import annotations

import mlx.core as mx


def gather_rows_reference(x_TD: mx.array, order_N: mx.array, top_k: int) -> mx.array:
    """xs[p] = x[order[p] // K]: (N, D) token rows in expert-sorted order."""
    return x_TD[order_N // top_k]


def combine_reference(ys_ND: mx.array, pos_TK: mx.array, gates_TK: mx.array) -> mx.array:
    """y[t] = sum_k gates[t, k] * ys[pos[t, k]]: (T, D) in ys's dtype, accumulated in float32."""
    picked_TKD = ys_ND[pos_TK].astype(mx.float32)
    y_TD = mx.sum(picked_TKD * gates_TK.astype(mx.float32)[..., None], axis=1)
    return y_TD.astype(ys_ND.dtype)


def gather_rows_grad_reference(dxs_ND: mx.array, pos_TK: mx.array) -> mx.array:
    """dx[t] = sum_k dxs[pos[t, k]]: (T, D), the gather form of gather_rows' input gradient."""
    return mx.sum(dxs_ND[pos_TK].astype(mx.float32), axis=1).astype(dxs_ND.dtype)


def combine_grad_ys_reference(dy_TD: mx.array, gates_TK: mx.array, order_N: mx.array) -> mx.array:
    """dys[p] = gates.flat[order[p]] * dy[order[p] // K]: (N, D) in dy's dtype."""
    K = gates_TK.shape[1]
    g_N = gates_TK.reshape(-1)[order_N].astype(mx.float32)
    dys_ND = g_N[:, None] * dy_TD[order_N // K].astype(mx.float32)
    return dys_ND.astype(dy_TD.dtype)


def combine_grad_gates_reference(dy_TD: mx.array, ys_ND: mx.array, pos_TK: mx.array) -> mx.array:
    """dgates[t, k] = <dy[t], ys[pos[t, k]]>: (T, K) float32."""
    prod_TKD = dy_TD[:, None, :].astype(mx.float32) * ys_ND[pos_TK].astype(mx.float32)
    return mx.sum(prod_TKD, axis=-1)
