"""The training dtype, loss scaling and activation checkpointing settings: parsed and checked.

No MLX import: the config validator and the planner read these. The refusals say what would go
wrong: float16 without loss scaling (small gradients underflow to zero) and checkpointing every
N blocks with N beyond the model's depth. (adamw with bfloat16 moments is refused by
tinymoe.config.validate whatever the dtype: its update keeps float32 moments, tinymoe.optim.mixed;
sparse-adamw and adafactor may store bfloat16 statistics, their update runs in float32.)
"""

from __future__ import annotations

import re

from tinymoe.errors import TinyMoeError
from tinymoe.names import LOSS_SCALES, TRAIN_DTYPES

_EVERY_N = re.compile(r"every-([0-9]+)")


def checkpoint_every(setting: str, n_layers: int | None = None) -> int:
    """Blocks per recomputed segment: 0 for `none`, 1 for `every-layer`, N for `every-N`."""
    if setting == "none":
        return 0
    if setting == "every-layer":
        return 1
    match = _EVERY_N.fullmatch(setting)
    if not match or int(match.group(1)) < 1:
        raise TinyMoeError(f"unknown checkpoint_activations '{setting}' (choose from none, every-layer, every-N "
                           f"with N >= 1)")
    n = int(match.group(1))
    if n_layers is not None and n > n_layers:
        raise TinyMoeError(f"checkpoint_activations every-{n}: the model has only {n_layers} layers "
                           f"(N must be at most {n_layers})")
    return n


def uses_loss_scale(train) -> bool:
    """Dynamic loss scaling is on: `dynamic`, or `auto` with float16."""
    return train.loss_scale == "dynamic" or (train.loss_scale == "auto" and train.dtype == "float16")


def check_precision_settings(model, train) -> None:
    if train.dtype not in TRAIN_DTYPES:
        raise TinyMoeError(f"unknown dtype '{train.dtype}' (choose from {', '.join(TRAIN_DTYPES)})")
    if train.loss_scale not in LOSS_SCALES:
        raise TinyMoeError(f"unknown loss_scale '{train.loss_scale}' (choose from {', '.join(LOSS_SCALES)})")
    checkpoint_every(train.checkpoint_activations, model.n_layers)
    if train.dtype == "float16" and train.loss_scale == "none":
        raise TinyMoeError("dtype float16 needs loss scaling (small gradients underflow to zero in float16): "
                           "use --loss-scale dynamic, or --dtype bfloat16")
