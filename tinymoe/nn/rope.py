"""Rotary position embedding whose angles are computed once per model, for MLX's CPU backend.

Why: on a GPU `mx.fast.rope` is one fused kernel, but MLX's CPU backend runs it as its
reference graph, about 30 small operations per call that recompute the positions, inverse
frequencies, cosines and sines every time. A decoded token calls it twice per layer: at the
sizes tinymoe runs on a CPU, where each operation's fixed cost outweighs its arithmetic, that was
about a quarter of a decoded token's operations (docs/performance.md).

On the CPU `RoPE` reads the cosines and sines from a table instead, and rotates with
x * [cos, cos] + [x2, x1] * [-sin, sin] (x1, x2 the two halves of x): 8 operations. The result is
the reference graph's to the bit:
- the table comes from `mx.fast.rope` itself, run once on a probe whose first half is ones and
  second half zeros (its output is exactly [cos, sin] of every position), so every angle is the
  float MLX computes, in the input's dtype;
- x1*cos + x2*(-sin) is x1*cos - x2*sin, and x2*cos + x1*sin is x1*sin + x2*cos, exactly (IEEE
  negation and addition are exact and commutative).
A backend whose vectorised cosine differs from its scalar one could still round a table row
differently from a one-position call, so each table is checked against fresh `mx.fast.rope`
calls when built, and a failed check keeps `mx.fast.rope` (tests/test_rope.py compares the two
at many offsets). GPU calls, traditional (interleaved) rotation and partial rotation always run
`mx.fast.rope`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

TABLE_STEP = 256  # positions a table grows by


class RoPE(nn.RoPE):
    """nn.RoPE (same arguments, no parameters), table-driven on the CPU; `pair` rotates queries
    and keys at the same positions from one slice of the table."""

    def __init__(self, dims: int, traditional: bool = False, base: float = 10000, scale: float = 1.0):
        super().__init__(dims, traditional=traditional, base=base, scale=scale)
        # Not module attributes: the tables are derived data, never parameters or checkpoint names.
        object.__setattr__(self, "_tables", {})  # dtype -> (cos_sin (N, dims), sign_sin (N, dims)) or None

    def __call__(self, x, offset: int = 0):
        table = self._slice(x, offset)
        return super().__call__(x, offset) if table is None else _rotate(x, *table)

    def pair(self, q, k, offset: int = 0):
        table = self._slice(q, offset) if q.dtype == k.dtype else None
        if table is None:
            return super().__call__(q, offset), super().__call__(k, offset)
        return _rotate(q, *table), _rotate(k, *table)

    def _slice(self, x, offset: int):
        """(cos, sin) rows offset..offset+L for x (..., L, dims), or None: use mx.fast.rope."""
        if self.traditional or x.shape[-1] != self.dims or mx.default_device() != mx.cpu:
            return None
        end = offset + x.shape[-2]
        table = self._tables.get(x.dtype, ())
        if table is not None and (not table or table[0].shape[0] < end):
            table = self._build(x.dtype, -(-end // TABLE_STEP) * TABLE_STEP)
        return None if table is None else (table[0][offset:end], table[1][offset:end])

    def _build(self, dtype, n: int):
        half = self.dims // 2
        cos, sin = self._reference(dtype, n, 0)
        table = (mx.concatenate([cos, cos], axis=-1), mx.concatenate([-sin, sin], axis=-1))  # (n, dims)
        mx.eval(table)
        # Rows as one- and few-position calls compute them (see the module docstring).
        for offset, length in ((n - 1, 1), (n // 2 + 1, 1), (n // 3, 3)):
            c, s = self._reference(dtype, length, offset)
            rows = slice(offset, offset + length)
            if not (mx.array_equal(table[0][rows, :half], c) and mx.array_equal(table[1][rows, half:], s)):
                table = None
                break
        self._tables[dtype] = table
        return table

    def _reference(self, dtype, n: int, offset: int):
        """mx.fast.rope's (cos, sin) at positions offset..offset+n, each (n, dims/2)."""
        half = self.dims // 2
        probe = mx.concatenate([mx.ones((n, half), dtype), mx.zeros((n, half), dtype)], axis=-1)
        out = mx.fast.rope(probe[None, None], self.dims, traditional=False, base=self.base, scale=self.scale,
                           offset=offset, stream=mx.cpu)[0, 0]
        return out[:, :half], out[:, half:]


def _rotate(x, cos_cos, sign_sin):
    half = x.shape[-1] // 2
    swapped = mx.concatenate([x[..., half:], x[..., :half]], axis=-1)
    return x * cos_cos + swapped * sign_sin
