"""Checkpoints with known contents for the reliability tests, built from numpy only.

`version` makes each saved state distinct and predictable: every weight is a fixed random base
plus `version`, so a test can tell exactly which save a loaded checkpoint came from. The fault
injection child process imports this module without MLX (shapes are passed to it as JSON).
"""

from __future__ import annotations

import numpy as np

# A model whose checkpoint is ~11 MB: a save takes tens of milliseconds, long enough to be
# interrupted at many different points.
FAULT_MODEL = {"vocab_size": 256, "d_model": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4,
               "context": 32, "d_ff": 256, "moe_experts": 4, "moe_topk": 2}


def param_shapes(model_cfg: dict) -> dict:
    """name -> shape of every weight of the model `model_cfg` describes (MLX builds it lazily)."""
    from mlx.utils import tree_flatten

    from tinymoe.config import ModelConfig, from_dict
    from tinymoe.nn.model import Model

    model = Model(from_dict(ModelConfig, model_cfg, "test"), "dense")
    return {k: list(v.shape) for k, v in tree_flatten(model.parameters())}


def bases(shapes: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


def state(base: dict, version: int) -> tuple[dict, dict]:
    """(weights, AdamW-shaped optimizer state) of save number `version`."""
    v = np.float32(version)
    weights = {k: b + v for k, b in base.items()}
    opt = {"step": np.array(version, dtype=np.uint64), "learning_rate": np.array(1e-3, dtype=np.float32)}
    for k, b in base.items():
        opt[f"{k}.m"] = b * np.float32(0.5) + v
        opt[f"{k}.v"] = np.abs(b) + v
    return weights, opt


def manifest_for(model_cfg: dict) -> dict:
    from tinymoe.config import ModelConfig, apply_overrides, to_dict

    full = to_dict(apply_overrides(ModelConfig(), model_cfg))
    return {"model": full, "tokenizer": {"kind": "bytes", "vocab_size": 256}}


def save_version(run_dir, base: dict, model_cfg: dict, step: int, keep: int = 0):
    from tinymoe.io import checkpoint

    weights, opt = state(base, step)
    return checkpoint.save(run_dir, step, weights, opt, manifest_for(model_cfg), keep=keep)


def assert_is_version(ckpt, base: dict, version: int) -> None:
    """The checkpoint's weights and optimizer state are bit for bit those of save `version`."""
    import mlx.core as mx

    from tinymoe.io import checkpoint

    manifest = checkpoint.read_manifest(ckpt)
    loaded = checkpoint.load_tensors(ckpt, manifest)
    weights, opt = state(base, version)
    expected = {**weights, **opt}
    assert set(loaded) == set(expected)
    for name, arr in expected.items():
        got = np.array(loaded[name].astype(mx.float32) if loaded[name].dtype == mx.bfloat16 else loaded[name])
        assert got.dtype == arr.dtype and np.array_equal(got, arr), name
