"""Check a checkpoint completely, without loading a model: `tinymoe validate`.

`validate_checkpoint` finds every problem it can rather than stopping at the first: the
manifest (JSON, format version, structure), each listed file (present, size, sha256), each
safetensors header (parses, entries sane, agrees with the manifest's dtype, shape and offsets),
each tensor's own sha256, the weights against the model config (names and shapes, computed from
MLX's lazily built model without allocating it), the optimizer moments against the weights, and
the tokenizer against the vocabulary. Every problem is one line that starts with the file it is
about. A path that is not a checkpoint at all is a problem like any other (the command then exits
1, not 2): the question asked was "is this a valid checkpoint?" and the answer is no.
"""

from __future__ import annotations

from pathlib import Path

from tinymoe.io import checkpoint
from tinymoe.errors import CheckpointError, TinyMoeError


def validate_checkpoint(path: str | Path) -> dict:
    """{"checkpoint", "step", "valid", "problems": [one line each], "files", "tensors"}."""
    report = {"checkpoint": None, "step": None, "valid": False, "problems": [], "files": 0, "tensors": 0}
    problems = report["problems"]
    try:
        ckpt = checkpoint.resolve(path)
        report["checkpoint"] = str(ckpt)
        manifest = checkpoint.read_manifest(ckpt)
    except CheckpointError as exc:
        problems.append(str(exc))
        return report
    report["step"] = manifest["step"]
    report["files"], report["tensors"] = len(manifest["files"]), len(manifest["tensors"])

    problems.extend(checkpoint.check_files(ckpt, manifest))
    problems.extend(_model_problems(ckpt, manifest))
    report["valid"] = not problems
    return report


def _model_problems(ckpt: Path, manifest: dict) -> list[str]:
    """Weights vs the model config, optimizer moments vs weights, tokenizer vs vocabulary."""
    from tinymoe.config import TrainConfig, from_dict
    from tinymoe.io.loader import model_config_of, model_for_index
    from tinymoe.tokenizers.load import load_tokenizer

    problems = []
    try:
        cfg = model_config_of(manifest, ckpt)
    except CheckpointError as exc:
        return [str(exc)]
    _, shape_problems = model_for_index(cfg, manifest, ckpt)
    problems.extend(shape_problems)
    weights = {e["name"]: e["shape"] for f in ("model.safetensors", "experts.safetensors")
               for _, e in checkpoint.entries_in(manifest, f)}
    for _, entry in checkpoint.entries_in(manifest, "optimizer.safetensors"):
        param, _, moment = entry["name"].rpartition(".")
        if moment in ("m", "v") and param in weights and entry["shape"] != weights[param]:
            problems.append(f"{ckpt / 'optimizer.safetensors'}: '{entry['name']}' has shape {entry['shape']}, "
                            f"its weight has {weights[param]}")
    if isinstance(manifest.get("train"), dict):
        try:
            from_dict(TrainConfig, manifest["train"], "train config")
        except TinyMoeError as exc:
            problems.append(f"{ckpt}/manifest.json: {exc}")
    try:
        tokenizer = load_tokenizer(manifest["tokenizer"], ckpt)
        if tokenizer.vocab_size > cfg.vocab_size:
            problems.append(f"{ckpt}/manifest.json: tokenizer has {tokenizer.vocab_size} tokens, "
                            f"the model config says vocab_size {cfg.vocab_size}")
    except TinyMoeError as exc:
        problems.append(str(exc))
    return problems
