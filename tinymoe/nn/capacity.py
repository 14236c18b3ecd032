"""Expert capacity: which routed slots an expert can take, and the expert-choice expert pass.

Shapes: T tokens, K slots per token, E experts, C slots per expert, D model width, H expert hidden.

With a capacity factor f > 0 each expert takes at most C = ceil(f * T * K / E) slots of a batch.
Slots queue for their expert in priority order: every token's first choice before any second
choice (so a second choice never pushes out someone's first), and by token order within a rank
(GShard / Switch). A slot past its expert's capacity is dropped: it keeps its index, its gate
becomes 0 and `kept` is False, so it adds nothing and the token passes through the residual
stream alone if all its slots drop. f = 0 means dropless (no limit). The counting is integer
arithmetic on stop-gradient'ed indices; the dispatch backends still compute dropped slots (with
gate 0) because they take the (T, K) layout as it is.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


def expert_capacity(factor: float, tokens: int, top_k: int, num_experts: int) -> int:
    """C = ceil(factor * T * K / E), at least 1; 0 = no limit."""
    if factor <= 0:
        return 0
    return max(1, math.ceil(factor * tokens * top_k / num_experts))


def apply_capacity(indices_TK: mx.array, selected_TK, num_experts: int, capacity: int) -> mx.array:
    """`kept` (T, K) bool: selected slots that fit in their expert's first `capacity` places."""
    T, K = indices_TK.shape
    idx = mx.stop_gradient(indices_TK)
    sel = mx.ones((T, K), mx.bool_) if selected_TK is None else mx.stop_gradient(selected_TK)
    # Rank-major queue: row r = k*T + t, so all first choices precede all second choices.
    onehot = ((idx.T[..., None] == mx.arange(num_experts)) & sel.T[..., None]).astype(mx.int32)  # (K, T, E)
    flat = onehot.reshape(K * T, num_experts)
    place = mx.cumsum(flat, axis=0) - flat  # (K*T, E): slots ahead in the same expert's queue
    place_TK = mx.sum(place * flat, axis=-1).reshape(K, T).T  # (T, K)
    return sel & (place_TK < capacity)


def expert_choice_experts(x_TD, tokens_EC, gates_EC, w_gate, w_up, w_down) -> mx.array:
    """y[t] = sum over experts e that took t of gate * SwiGLU_e(x[t]): gather each expert's C
    tokens, one batched matmul per projection (E, C, D) @ (E, D, H), scatter-add back. # (T, D)"""
    xs = x_TD[tokens_EC]  # (E, C, D)
    h = nn.silu(xs @ w_gate.swapaxes(1, 2)) * (xs @ w_up.swapaxes(1, 2))  # (E, C, H)
    ys = (h @ w_down.swapaxes(1, 2)) * gates_EC[..., None].astype(x_TD.dtype)  # (E, C, D)
    D = x_TD.shape[-1]
    return mx.zeros(x_TD.shape, x_TD.dtype).at[tokens_EC.reshape(-1)].add(ys.reshape(-1, D))
