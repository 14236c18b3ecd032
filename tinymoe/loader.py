"""Open a checkpoint as a ready model: manifest -> config -> model -> weights -> tokenizer."""

from __future__ import annotations

from pathlib import Path

from tinymoe import checkpoint
from tinymoe.config import ModelConfig, from_dict, validate
from tinymoe.errors import CheckpointError


def load_model(path: str | Path, dispatch: str = "auto", verify_hashes: bool = True):
    """(model, manifest, tokenizer, checkpoint dir) from a checkpoint or run directory."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from tinymoe.model import Model
    from tinymoe.tokenizer import load_tokenizer

    ckpt = checkpoint.resolve(path)
    manifest = checkpoint.read_manifest(ckpt)
    cfg = model_config_of(manifest, ckpt)
    model = Model(cfg, dispatch)
    weights = checkpoint.load_tensors(ckpt, manifest, ("model.safetensors", "experts.safetensors"), verify_hashes)
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"{ckpt}: weights do not match the model config ({what})")
    for name, arr in weights.items():
        if arr.shape != expected[name].shape:
            raise CheckpointError(f"{ckpt}: '{name}' has shape {arr.shape}, config implies {expected[name].shape}")
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(manifest["tokenizer"], ckpt)
    return model, manifest, tokenizer, ckpt


def model_config_of(manifest: dict, ckpt: Path) -> ModelConfig:
    if not isinstance(manifest.get("model"), dict):
        raise CheckpointError(f"{ckpt}/manifest.json: 'model' is not an object")
    try:
        cfg = from_dict(ModelConfig, manifest["model"], f"{ckpt}/manifest.json model")
        validate(cfg)
    except CheckpointError:
        raise
    except Exception as exc:  # TinyMoeError from config checks: re-label as a checkpoint problem
        raise CheckpointError(str(exc)) from None
    return cfg
