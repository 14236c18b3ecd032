"""The trainer's optimizer by name: mlx's AdamW, sparse-adamw or adafactor."""

from __future__ import annotations

from tinymoe.errors import TinyMoeError
from tinymoe.names import OPTIMIZERS
from tinymoe.optim.adafactor import Adafactor
from tinymoe.optim.sparse_adamw import SparseAdamW


def make_optimizer(kind: str, learning_rate, betas, weight_decay: float, state_dtype: str = "float32",
                   param_dtype: str = "float32"):
    """The trainer's optimizer: mlx's AdamW (the default, compiled), SparseAdamW or Adafactor.
    Adafactor ignores `betas`: it keeps no first moment and its decay follows its step count
    (tinymoe.optim.adafactor)."""
    if kind == "adamw":
        if state_dtype != "float32":
            raise TinyMoeError("--optimizer-state-dtype bfloat16 needs --optimizer sparse-adamw or adafactor "
                               "(adamw keeps float32 moments)")
        import mlx.optimizers as optim

        if param_dtype != "float32":  # float32 moments, stochastically rounded weights (tinymoe.optim.mixed)
            from tinymoe.optim.mixed import MixedAdamW

            return MixedAdamW(learning_rate=learning_rate, betas=list(betas), weight_decay=weight_decay)
        return optim.AdamW(learning_rate=learning_rate, betas=list(betas), weight_decay=weight_decay)
    if kind == "sparse-adamw":
        return SparseAdamW(learning_rate, betas=tuple(betas), weight_decay=weight_decay, state_dtype=state_dtype)
    if kind == "adafactor":
        return Adafactor(learning_rate, weight_decay=weight_decay, state_dtype=state_dtype)
    raise TinyMoeError(f"unknown optimizer '{kind}' (choose from {', '.join(OPTIMIZERS)})")
