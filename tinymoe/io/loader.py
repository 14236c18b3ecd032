"""Open a checkpoint as a ready model: manifest -> config -> model -> weights -> tokenizer.

Everything is checked before the model is handed out: the manifest's structure, every file's
size and sha256, every safetensors header against the manifest (tinymoe.io.checkpoint), the tensor
names and shapes against the model config, and the tokenizer against the vocabulary. A failed
check raises one `CheckpointError`; nothing is half-loaded.
"""

from __future__ import annotations

from pathlib import Path

from tinymoe.io import checkpoint
from tinymoe.config import ModelConfig, from_dict, validate
from tinymoe.errors import CheckpointError


def load_model(path: str | Path, dispatch: str = "auto", verify_hashes: bool = True):
    """(model, manifest, tokenizer, checkpoint dir) from a checkpoint or run directory."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from tinymoe.tokenizers.load import load_tokenizer

    ckpt, manifest, cfg, model = open_checkpoint(path, dispatch)
    weights = checkpoint.load_tensors(ckpt, manifest, ("model.safetensors", "experts.safetensors"), verify_hashes)
    tokenizer = load_tokenizer(manifest["tokenizer"], ckpt)
    if tokenizer.vocab_size > cfg.vocab_size:  # fewer is fine: unused (padding) embedding rows
        raise CheckpointError(f"{ckpt}: tokenizer has {tokenizer.vocab_size} tokens, "
                              f"the model config says vocab_size {cfg.vocab_size}")
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())
    return model, manifest, tokenizer, ckpt


def open_checkpoint(path: str | Path, dispatch: str = "auto"):
    """(checkpoint dir, manifest, model config, model with unloaded weights), all checked
    against each other; the shared first half of every way of loading a checkpoint."""
    ckpt = checkpoint.resolve(path)
    manifest = checkpoint.read_manifest(ckpt)
    cfg = model_config_of(manifest, ckpt)
    model, problems = model_for_index(cfg, manifest, ckpt, dispatch)
    if problems:
        raise CheckpointError(problems[0])
    return ckpt, manifest, cfg, model


def model_for_index(cfg: ModelConfig, manifest: dict, ckpt: Path, dispatch: str = "dense"):
    """(model with lazy, unevaluated weights, problems) comparing the config's parameters with
    the manifest's model/expert tensors. The model is None when the config cannot be built.

    MLX builds parameters lazily, so a config with huge dimensions costs nothing here; the layer
    count is bounded by the index first because each layer is a Python object.
    """
    from mlx.utils import tree_flatten

    from tinymoe.nn.model import Model

    index = {e["name"]: e for _, e in checkpoint.entries_in(manifest, "model.safetensors")}
    index.update({e["name"]: e for _, e in checkpoint.entries_in(manifest, "experts.safetensors")})
    where = f"{ckpt}/manifest.json"
    if cfg.n_layers > len(index):
        return None, [f"{where}: model config has {cfg.n_layers} layers but the checkpoint holds "
                      f"only {len(index)} weight tensors"]
    try:
        model = Model(cfg, dispatch)
    except Exception as exc:  # a config that passed validate() but MLX still rejects
        return None, [f"{where}: cannot build the model this config describes ({exc})"]
    expected = {k: list(v.shape) for k, v in tree_flatten(model.parameters())}
    problems = []
    for name in sorted(set(expected) - set(index)):
        problems.append(f"{where}: weight '{name}' required by the model config is missing")
    for name in sorted(set(index) - set(expected)):
        problems.append(f"{where}: weight '{name}' is not part of the model the config describes")
    for name in sorted(set(index) & set(expected)):
        if index[name]["shape"] != expected[name]:
            problems.append(f"{where}: weight '{name}' has shape {index[name]['shape']}, "
                            f"the model config implies {expected[name]}")
    return model, problems


def model_config_of(manifest: dict, ckpt: Path) -> ModelConfig:
    if not isinstance(manifest.get("model"), dict):
        raise CheckpointError(f"{ckpt}/manifest.json: 'model' is not an object")
    try:
        cfg = from_dict(ModelConfig, manifest["model"], "model config")
        validate(cfg)
    except CheckpointError:
        raise
    except Exception as exc:  # TinyMoeError from config checks: re-label as a checkpoint problem
        raise CheckpointError(f"{ckpt}/manifest.json: {exc}") from None
    return cfg


def load_training_state(path: str | Path) -> dict:
    """{"manifest", "ckpt", "weights", "optimizer", "tokenizer"} for resuming, all checked:
    resumable manifest, weights against the model config, optimizer moments against the weights
    (frozen weights have no moments, so a missing one is not an error)."""
    from tinymoe.tokenizers.load import load_tokenizer

    ckpt = checkpoint.resolve(path)
    manifest = checkpoint.read_manifest(ckpt)
    where = f"{ckpt}/manifest.json"
    for key in ("train", "data"):
        if not isinstance(manifest.get(key), dict):
            raise CheckpointError(f"{where}: missing '{key}' (not resumable)")
    if not isinstance(manifest["data"].get("sampler"), dict):
        raise CheckpointError(f"{where}: missing the batch sampler state (not resumable)")
    tokens_seen = manifest.get("tokens_seen", 0)
    if not isinstance(tokens_seen, int) or isinstance(tokens_seen, bool) or tokens_seen < 0:
        raise CheckpointError(f"{where}: 'tokens_seen' must be a non-negative integer, got {tokens_seen!r}")
    _, problems = model_for_index(model_config_of(manifest, ckpt), manifest, ckpt)
    if problems:
        raise CheckpointError(problems[0])
    weights = checkpoint.load_tensors(ckpt, manifest, ("model.safetensors", "experts.safetensors"))
    # Hashes were verified just above for every file the manifest lists.
    optimizer = checkpoint.load_tensors(ckpt, manifest, ("optimizer.safetensors",), verify_hashes=False)
    for name, arr in optimizer.items():
        param, _, moment = name.rpartition(".")
        if moment in ("m", "v") and param in weights and arr.shape != weights[param].shape:
            raise CheckpointError(f"{ckpt / 'optimizer.safetensors'}: '{name}' has shape {list(arr.shape)}, "
                                  f"its weight has {list(weights[param].shape)}")
    return {"manifest": manifest, "ckpt": ckpt, "weights": weights, "optimizer": optimizer,
            "tokenizer": load_tokenizer(manifest["tokenizer"], ckpt)}
