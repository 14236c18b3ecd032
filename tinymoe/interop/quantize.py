"""`tinymoe quantize`: a float checkpoint -> a new run folder holding its quantized twin.

The weights are quantized by tinymoe.nn.quantize (MLX affine, 4 or 8 bits, routers in float) and
saved as a checkpoint of the same step, whose manifest keeps the source's model config,
tokenizer, training settings and data record (so `tinymoe eval` scores the same validation
split) and adds `quantization` (what was quantized, and how) and `source`. It holds no optimizer
state: a quantized model is for sampling, evaluation, inspection and export, and training refuses
it. Written like every output folder (tinymoe.io.folders): staged, then renamed into place.

The report says what quantizing cost in size and in weight error: bytes of the weight files
before and after, and per quantized weight the largest |w - dequantized w| relative to the
largest |w| (a weight of a group of range r is off by at most one step, r / (2^bits - 1)).
"""

from __future__ import annotations

from pathlib import Path

from tinymoe.errors import TinyMoeError

# Manifest keys the quantized checkpoint does not take from its source (rewritten on save).
_REWRITTEN = ("format", "version", "step", "saved_at", "files", "tensors", "quantization", "source")
WEIGHT_FILES = ("model.safetensors", "experts.safetensors")


def quantize_checkpoint(source: str, out: Path, bits: int, group_size: int, keep_float=(),
                        overwrite: bool = False) -> dict:
    """Quantize the checkpoint (or run's latest) at `source` into the run folder `out`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from tinymoe.io import checkpoint
    from tinymoe.io.folders import check_output, staged_output
    from tinymoe.io.reader import open_checkpoint
    from tinymoe.nn.quantize import check_settings, float_weights, quantize_model

    check_settings(bits, group_size)
    out = Path(out)
    check_output(out, "run", overwrite, source)  # refuse before the slow part; deletes nothing
    reader = open_checkpoint(source, "auto")
    if "quantization" in reader.manifest:
        q = reader.manifest["quantization"]
        raise TinyMoeError(f"{reader.ckpt}: already quantized ({q['bits']}-bit, group size {q['group_size']}); "
                           f"quantize the float checkpoint it came from")
    model, src_manifest, tokenizer, ckpt = reader.load_model()
    before = dict(tree_flatten(model.parameters()))
    record = quantize_model(model, bits, group_size, tuple(keep_float))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(list(weights.values()))
    errors = _relative_errors(before, float_weights(model), record)
    manifest = {k: v for k, v in src_manifest.items() if k not in _REWRITTEN}
    manifest["quantization"] = record
    manifest["source"] = {"kind": "quantize", "from": str(ckpt), "step": src_manifest["step"],
                          **({"source": src_manifest["source"]} if "source" in src_manifest else {})}
    with staged_output(out, "run", overwrite, source) as tmp:
        saved = checkpoint.save(tmp, src_manifest["step"], weights, {}, manifest, tokenizer)
    final = out / saved.relative_to(tmp)
    written = checkpoint.read_manifest(final)
    size = lambda m: sum(m["files"][f]["bytes"] for f in WEIGHT_FILES)  # noqa: E731
    return {"checkpoint": str(final), "source": str(ckpt), "step": src_manifest["step"], "bits": bits,
            "group_size": group_size, "quantized_modules": len(record["modules"]),
            "float_modules_kept": record["keep_float"], "weight_bytes_before": size(src_manifest),
            "weight_bytes_after": size(written),
            "max_relative_weight_error": max(errors.values(), default=0.0)}


def _relative_errors(before: dict, dequantized: dict, record: dict) -> dict:
    """name -> max |w - dequantized w| / max |w| for every weight that was quantized."""
    import mlx.core as mx

    out = {}
    for name, w in before.items():
        if any(name.startswith(p + ".") for p in record["modules"]) and name in dequantized:
            if name.endswith(".bias"):
                continue
            scale = float(mx.max(mx.abs(w)).item()) or 1.0
            out[name] = float(mx.max(mx.abs(w - dequantized[name])).item()) / scale
    return out


def refuse_quantized(manifest: dict, where, what: str) -> None:
    """For paths that need float weights (training, upcycling): one line naming the way back."""
    if "quantization" in manifest:
        raise TinyMoeError(f"{where}: a quantized checkpoint cannot be {what}; use the float checkpoint "
                           f"it was quantized from")
