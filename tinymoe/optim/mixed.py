"""AdamW for low-precision weights: float32 moments and arithmetic, stochastic rounding back.

mlx's AdamW keeps its moments in the parameter's dtype and computes the update in it: for a
bfloat16 weight a learning-rate-sized step is often below half a bfloat16 grid step and rounds
away entirely. This subclass keeps m and v in float32, computes the whole update in float32 from
the (exactly upcast) weight and gradient, and rounds the new weight back to its dtype with
tinymoe.optim.rounding.round_to. float32 weights (the routers; every weight of a float32 run) take
exactly mlx's AdamW arithmetic.

The rounding's random numbers come from a key made of the optimizer's step count and the
weight's position in the parameter tree, both part of the saved state: a resumed run draws the
same numbers as an uninterrupted one, and the update can still be compiled (the key is computed
from the state, not drawn from a Python-side generator).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim

from tinymoe.optim.rounding import round_to


class MixedAdamW(optim.AdamW):
    def init_single(self, parameter: mx.array, state: dict):
        state["m"] = mx.zeros(parameter.shape, mx.float32)
        state["v"] = mx.zeros(parameter.shape, mx.float32)

    def apply_gradients(self, gradients: dict, parameters: dict):
        self._salt = 0  # each weight's index in tree order: its own stream of rounding noise
        return super().apply_gradients(gradients, parameters)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict):
        dtype = parameter.dtype
        if dtype == mx.float32:
            return super().apply_single(gradient.astype(mx.float32), parameter, state)
        salt = self._salt
        self._salt += 1
        new32 = super().apply_single(gradient.astype(mx.float32), parameter.astype(mx.float32), state)
        key = mx.stack([self.step.astype(mx.uint32), mx.array(salt, mx.uint32)])
        return round_to(new32, dtype, key)
