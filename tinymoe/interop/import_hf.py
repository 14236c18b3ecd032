"""Bring a Hugging Face-format model into tinymoe, and write weights-only checkpoints.

`load_hf` reads config.json (hf_config decides whether tinymoe computes the same function),
the safetensors files (hf_weights renames and restacks, float32 on the way in) and the tokenizer
(hf_tokenizer). `load_source` accepts a tinymoe checkpoint or run directory as well, so upcycling
takes either. `write_checkpoint` stores a model with no training state as step 0 of a run
directory: `sample`, `eval`, `inspect` and `export` read it, `train --init` (or `--resume`, which
then starts a fresh optimizer) continues from it.
"""

from __future__ import annotations

from pathlib import Path

from tinymoe.config import ModelConfig, to_dict, validate
from tinymoe.errors import TinyMoeError
from tinymoe.router_registry import active_params


def load_hf(directory: Path, context: int | None = None) -> dict:
    """{"cfg", "weights" (tinymoe names, float32 mx arrays), "tokenizer", "arch", "source",
    "quantization" (the record of tinymoe.nn.quantize for a quantized directory, else None)}."""
    from tinymoe.interop import hf_config_read, hf_quant, hf_weights
    from tinymoe.memory_check import require_fits
    from tinymoe.tokenizers.hf import read_hf_tokenizer

    directory = Path(directory)
    where = str(directory)
    config = hf_config_read.read_hf_config(directory)
    quant = hf_quant.settings(config, where)  # (bits, group_size) of an mlx-lm quantized model
    cfg, arch = hf_config_read.hf_to_model_config(config, where, context)
    validate(cfg)  # before any weight is read: sizes, finiteness, router options
    require_fits(cfg, mode="sample", context=1, what=where)  # weights only; a sample's KV cache comes later
    cfg, weights = hf_weights.from_hf(cfg, hf_weights.read_safetensors_dir(directory), arch, where, quant)
    validate(cfg)
    hf_weights.check_shapes(cfg, weights, where, quant[1] if quant else None)
    record = None
    if quant is not None:
        record = {"mode": "affine", "bits": quant[0], "group_size": quant[1],
                  "modules": hf_quant.module_paths(weights), "keep_float": []}
        weights = hf_quant.ungroup(weights)
    tokenizer = read_hf_tokenizer(directory, cfg.vocab_size)
    return {"cfg": cfg, "weights": weights, "tokenizer": tokenizer, "arch": arch, "source": where,
            "quantization": record}


def is_tinymoe(path: Path) -> bool:
    return (path / "manifest.json").is_file() or (path / "latest").is_file() or (path / "checkpoints").is_dir()


def load_source(source: str, context: int | None = None) -> dict:
    """A tinymoe checkpoint/run directory, a Hugging Face directory, or a hub repository id."""
    from tinymoe.interop.hub import resolve_source

    path = resolve_source(source)
    if is_tinymoe(path):
        import dataclasses

        from mlx.utils import tree_flatten

        from tinymoe.io.loader import load_model

        from tinymoe.interop.quantize import refuse_quantized

        model, manifest, tokenizer, ckpt = load_model(path)
        refuse_quantized(manifest, ckpt, "upcycled")
        cfg = model.cfg if context is None else dataclasses.replace(model.cfg, context=context)
        return {"cfg": cfg, "weights": dict(tree_flatten(model.parameters())), "tokenizer": tokenizer,
                "arch": "tinymoe", "source": str(ckpt), "manifest": manifest}
    if (path / "config.json").is_file():
        loaded = load_hf(path, context)
        if loaded["quantization"]:
            raise TinyMoeError(f"{source}: a quantized model cannot be upcycled; use its float weights")
        return loaded
    raise TinyMoeError(f"{source}: neither a tinymoe checkpoint (manifest.json) nor a Hugging Face "
                       f"model directory (config.json)")


def param_counts(cfg: ModelConfig, weights: dict, bits: int | None = None) -> dict:
    """Total parameters of `weights` and those one token uses, by the rule count_params and the
    planner use (tinymoe.router_registry.active_params). bits: of a quantized model, whose packed
    uint32 words hold 32 / bits weights each (scales and biases are not counted)."""
    def size(name: str) -> int:
        w = weights[name]
        if name.endswith(("_scales", "_biases", ".scales", ".biases")) and bits:
            return 0
        return int(w.size) * (32 // bits) if bits and str(w.dtype).endswith("uint32") else int(w.size)

    total = sum(size(n) for n in weights)
    moe = [i for i in range(cfg.n_layers) if cfg.layer_is_moe(i)]
    per_expert = sum(size(f"blocks.{moe[0]}.moe.experts.{p}") // cfg.moe_experts
                     for p in ("w_gate", "w_up", "w_down")) if moe else 0
    return {"total": total, "active": active_params(cfg, total, per_expert)}


def write_checkpoint(out: Path, cfg: ModelConfig, weights: dict, tokenizer, provenance: dict,
                     overwrite: bool = False, source: str | None = None, quantization: dict | None = None) -> Path:
    """Step 0 of a new run folder `out`: weights, model config, tokenizer; no optimizer state;
    with `quantization` (a tinymoe.nn.quantize record) the weights are that quantized model's.

    Written into a hidden sibling and renamed into place (tinymoe.io.folders), so a crash leaves
    no partial folder; an earlier run folder in `out` is replaced only with `overwrite`."""
    from tinymoe.io import checkpoint
    from tinymoe.io.folders import staged_output

    out = Path(out)
    bits = quantization["bits"] if quantization else None
    manifest = {"model": to_dict(cfg), "tokenizer": tokenizer.to_manifest(), "tokens_seen": 0,
                "params": param_counts(cfg, weights, bits), "source": provenance,
                **({"quantization": quantization} if quantization else {})}
    with staged_output(out, "run", overwrite, source) as tmp:
        ckpt = checkpoint.save(tmp, 0, weights, {}, manifest, tokenizer)
    return out / ckpt.relative_to(tmp)


def import_hf(source: str, out: Path, context: int | None = None, overwrite: bool = False) -> dict:
    """`tinymoe import`: a Hugging Face directory (or hub id) -> a tinymoe run directory."""
    from tinymoe.interop.hub import resolve_source
    from tinymoe.io.folders import check_output

    check_output(Path(out), "run", overwrite, source)  # refuse before the slow part; deletes nothing
    path = resolve_source(source)
    loaded = load_hf(path, context)
    cfg = loaded["cfg"]
    ckpt = write_checkpoint(Path(out), cfg, loaded["weights"], loaded["tokenizer"],
                            {"kind": "import", "from": source, "architecture": loaded["arch"]}, overwrite, source,
                            loaded["quantization"])
    return {"checkpoint": str(ckpt), "architecture": loaded["arch"], "tokenizer": loaded["tokenizer"].kind,
            "moe_experts": cfg.moe_experts, "moe_topk": cfg.moe_topk, "router_norm": cfg.router_norm,
            "moe_layers": [i for i in range(cfg.n_layers) if cfg.layer_is_moe(i)],
            "params": param_counts(cfg, loaded["weights"], (loaded["quantization"] or {}).get("bits")),
            **({"quantization": {k: loaded["quantization"][k] for k in ("bits", "group_size")}}
               if loaded["quantization"] else {})}
