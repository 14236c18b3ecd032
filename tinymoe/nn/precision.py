"""Mixed precision: which weights take the training dtype, and rounding a float32 update back to it.

`--dtype bfloat16|float16` stores the model's weights (and so its gradients and activations) in
that dtype, except the routers, which stay float32: their logits, softmax, top-k and losses are
computed in float32 whatever the model dtype (tinymoe.nn.routers), and a float32 router weight
keeps small routing preferences from being rounded away. Norm weights take the model dtype; the
RMS statistic itself is accumulated in float32 by `mx.fast.rms_norm`. The loss is computed on
float32 logits (tinymoe.train.step).

There is no float32 master copy: the optimizer (tinymoe.optim.mixed) computes each update in
float32 from the low-precision weight and float32 moments and rounds the result back to the
weight's dtype with *stochastic rounding*: up or down to the two neighbouring representable
values with probabilities that make the rounding unbiased, so an update smaller than half a
bfloat16 step (2^-8 relative) still moves the weight on average instead of being lost. It costs
no memory (a master copy costs 4 bytes per parameter); docs/memory.md has the measurement that
chose it over round-to-nearest and compares it with float32 training.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def keeps_float32(name: str) -> bool:
    """Weights that stay float32 under every dtype: the routers (and their state, e.g. a bias)."""
    return ".moe.router." in name


def cast_model(model: nn.Module, dtype_name: str) -> None:
    """Store the model's float weights in `dtype_name`, the routers' in float32."""
    dtype = DTYPES[dtype_name]
    if dtype == mx.float32:
        return
    cast = [(name, a.astype(dtype)) for name, a in tree_flatten(model.parameters())
            if mx.issubdtype(a.dtype, mx.floating) and not keeps_float32(name)]
    model.update(tree_unflatten(cast))


def model_dtype(model: nn.Module) -> str:
    """The dtype of the model's embedding: the training dtype (routers are float32 in any case)."""
    dtype = model.embed.weight.dtype
    return next(name for name, d in DTYPES.items() if d == dtype) if dtype in DTYPES.values() else str(dtype)
