"""Rounding a float32 update back to a bfloat16 or float16 weight: stochastically, unbiased.

Rounding to nearest loses every update smaller than half a grid step (2^-8 relative for
bfloat16): late in training, with a small learning rate, most updates. Stochastic rounding goes
up or down to the two neighbouring representable values with probabilities that make the
rounding unbiased, so small updates still move a weight on average, without the 4 bytes per
parameter of a float32 master copy (docs/memory.md has the measurement).
"""

from __future__ import annotations

import mlx.core as mx

# Explicit mantissa bits of each low-precision dtype: the grid spacing in [2^e, 2^(e+1)) is 2^(e-m).
_MANTISSA_BITS = {mx.bfloat16: 7, mx.float16: 10}
_FLOAT16_MIN_SPACING = 2.0**-24  # float16's subnormal step: no finer grid below 2^-14
# How an update is rounded back to a low-precision weight; "nearest" exists for the measurement
# in docs/memory.md (benchmarks/precision.py), not as a user setting.
ROUNDING = {"mode": "stochastic"}


def stochastic_round(x32: mx.array, dtype, key: mx.array) -> mx.array:
    """float32 `x32` rounded to `dtype` (bfloat16 or float16) up or down at random, with the
    probability of rounding up equal to the distance from the lower neighbour in grid steps:
    E[result] = x32. Uses only exponent bits and one floor (no transcendental: they cost
    ~25 ns per element on the CPU)."""
    m = _MANTISSA_BITS[dtype]
    exponent = mx.view(mx.bitwise_and(mx.view(x32, mx.uint32), mx.array(0x7F800000, mx.uint32)), mx.float32)
    spacing = exponent * (2.0**-m)  # the grid step of x32's binade in `dtype`
    if dtype == mx.float16:
        spacing = mx.maximum(spacing, _FLOAT16_MIN_SPACING)
    u = mx.random.uniform(shape=x32.shape, key=key)  # [0, 1)
    # x / spacing and the product back are exact: spacing is a power of two.
    rounded = mx.floor(x32 * (1.0 / spacing) + u) * spacing
    return mx.where(spacing > 0, rounded, x32).astype(dtype)


def round_to(x32: mx.array, dtype, key: mx.array) -> mx.array:
    """The update's float32 result in the weight's dtype, by the rounding in force."""
    if dtype == mx.float32:
        return x32
    if ROUNDING["mode"] == "nearest":
        return x32.astype(dtype)
    return stochastic_round(x32, dtype, key)
