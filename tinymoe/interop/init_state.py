"""Starting a training run from a checkpoint's weights (`tinymoe train --init CKPT`).

A new run: step 0, a fresh AdamW state, the preset's training settings and a fresh batch sampler,
but the model (config and weights) and the tokenizer of CKPT. That is how an upcycled or imported
model is trained further; those checkpoints carry no optimizer or data state, so
`train --resume` on one of them starts this way too, writing into the checkpoint's own run
directory.

Model settings a flag may change here are those that leave every weight's shape and meaning
alone; the rest come from the checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tinymoe.errors import TinyMoeError

INIT_MAY_CHANGE = {"context", "aux_loss_weight", "z_loss_weight", "entropy_weight", "router_norm", "moe_topk",
                   "capacity_factor", "eval_capacity_factor", "jitter_eps", "bias_rate"}


def has_training_state(manifest: dict) -> bool:
    return isinstance(manifest.get("train"), dict) and isinstance(manifest.get("data"), dict)


def run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def weights_only_run_dir(path: str) -> Path | None:
    """The run directory of `path` when its checkpoint has no training state, else None."""
    from tinymoe.io import checkpoint

    ckpt = checkpoint.resolve(path)
    manifest = checkpoint.read_manifest(ckpt)
    return None if has_training_state(manifest) else run_dir_of(ckpt)


def load_init_state(path: str, model_over: dict):
    """(model config, {"weights", "tokenizer"}, checkpoint dir) for Trainer(init=...)."""
    from mlx.utils import tree_flatten

    from tinymoe.config import apply_overrides, validate
    from tinymoe.io.loader import load_model

    fixed = sorted(k for k in model_over if k not in INIT_MAY_CHANGE)
    from tinymoe.interop.quantize import refuse_quantized

    model, manifest, tokenizer, ckpt = load_model(path)
    refuse_quantized(manifest, ckpt, "trained (--init)")
    cfg = model.cfg
    changed = [k for k in fixed if model_over[k] != getattr(cfg, k)]
    if changed:
        key = changed[0]
        raise TinyMoeError(f"--init keeps the checkpoint's model: cannot change '{key}' "
                           f"(checkpoint has {getattr(cfg, key)!r}); settings that may change: "
                           f"{', '.join(sorted(INIT_MAY_CHANGE))}")
    cfg = apply_overrides(dataclasses.replace(cfg), {k: v for k, v in model_over.items() if k in INIT_MAY_CHANGE},
                          "flag")
    validate(cfg)
    return cfg, {"weights": dict(tree_flatten(model.parameters())), "tokenizer": tokenizer}, ckpt
