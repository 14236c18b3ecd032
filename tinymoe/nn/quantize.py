"""Quantizing a model, rebuilding a quantized model's structure, and reading it back as floats.

`quantize_model` replaces, in place, every matmul weight of a tinymoe Model by its MLX affine
quantization (tinymoe.nn.quantized): the stacked experts of each MoE layer, attention
projections, dense and shared-expert FFNs, the embedding and the output head. Routers stay in
float (their weight is an (E, D) array, not a layer, and routing is decided by small logit gaps
that 4-bit weights would move), as do norms and biases, and every module whose path or weight
name matches a `keep_float` pattern (fnmatch: `embed.*`, `blocks.*.attn.*`).

It returns the record a checkpoint keeps (`quantization` in manifest.json): mode, bits,
group_size and the paths of the quantized modules. `apply_record` rebuilds that structure on a
freshly built float model (placeholders, nothing computed), so a reader can compare names and
shapes with the file and load the packed tensors. `float_weights` gives the dequantized
weights under the float model's names: the reference a quantized model is tested against.
"""

from __future__ import annotations

import fnmatch

import mlx.core as mx
import mlx.nn as nn

from tinymoe.errors import TinyMoeError
from tinymoe.nn.moe import SwiGLUExperts
from tinymoe.nn.quantized import (BITS, GROUP_SIZES, MODE, PROJECTIONS, QEmbedding, QLinear,
                                  QuantizedSwiGLUExperts)

_QUANTIZED = (QuantizedSwiGLUExperts, nn.QuantizedLinear, nn.QuantizedEmbedding)


def record_of(model) -> dict | None:
    """The model's quantization record, or None for a float model."""
    return model.__dict__.get("quantization")


def _candidates(model) -> list[tuple[str, nn.Module]]:
    """(path, module) of every float module quantize_model may replace, in tree order."""
    found = []
    for path, module in model.named_modules():
        if ".router" in f".{path}":
            continue
        if isinstance(module, (nn.Linear, nn.Embedding, SwiGLUExperts)):
            found.append((path, module))
    return sorted(found, key=lambda pm: pm[0])


def _weight_names(path: str, module) -> list[str]:
    if isinstance(module, (SwiGLUExperts, QuantizedSwiGLUExperts)):
        return [f"{path}.{p}" for p in PROJECTIONS]
    return [f"{path}.weight"]


def _in_widths(module) -> list[tuple[str, int]]:
    """(weight name suffix, width its groups run along) of a float module."""
    if isinstance(module, SwiGLUExperts):
        return [(p, getattr(module, p).shape[-1]) for p in PROJECTIONS]
    return [("weight", module.weight.shape[-1])]


def check_settings(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise TinyMoeError(f"--bits {bits}: choose one of {', '.join(map(str, BITS))}")
    if group_size not in GROUP_SIZES:
        raise TinyMoeError(f"--group-size {group_size}: choose one of {', '.join(map(str, GROUP_SIZES))}")


def quantize_model(model, bits: int, group_size: int, keep_float=()) -> dict:
    """Quantize `model` in place; returns its quantization record. TinyMoeError for settings
    MLX cannot honour (a group size that does not divide a width) or a model already quantized."""
    check_settings(bits, group_size)
    if record_of(model) is not None:
        raise TinyMoeError("the model is quantized already; quantize its float checkpoint instead")
    chosen = []
    for path, module in _candidates(model):
        names = [path, *_weight_names(path, module)]
        if any(fnmatch.fnmatchcase(n, pattern) for n in names for pattern in keep_float):
            continue
        for suffix, width in _in_widths(module):
            if width % group_size:
                raise TinyMoeError(f"--group-size {group_size} does not divide the width {width} of "
                                   f"{path}.{suffix}; choose a group size that does, or --keep-float '{path}*'")
        chosen.append((path, module))
    for path, module in chosen:
        _replace(model, path, _quantized(module, group_size, bits))
    record = {"mode": MODE, "bits": bits, "group_size": group_size, "modules": [p for p, _ in chosen],
              "keep_float": list(keep_float)}
    object.__setattr__(model, "quantization", record)
    return record


def _quantized(module, group_size: int, bits: int):
    if isinstance(module, SwiGLUExperts):
        return QuantizedSwiGLUExperts.from_float(module, group_size, bits)
    if isinstance(module, nn.Embedding):
        return QEmbedding.from_embedding(module, group_size, bits, mode=MODE)
    return QLinear.from_linear(module, group_size, bits, mode=MODE)


def _placeholder(module, group_size: int, bits: int):
    """A quantized module of the float module's shapes, whose tensors a checkpoint will fill."""
    if isinstance(module, SwiGLUExperts):
        E, H, D = module.w_gate.shape
        return QuantizedSwiGLUExperts(E, D, H, group_size, bits)
    if isinstance(module, nn.Embedding):
        V, D = module.weight.shape
        return QEmbedding(V, D, group_size, bits, mode=MODE)
    out_dim, in_dim = module.weight.shape
    return QLinear(in_dim, out_dim, "bias" in module, group_size, bits, mode=MODE)


def _replace(model, path: str, new) -> None:
    parent, _, last = path.rpartition(".")
    owner = model
    for part in parent.split(".") if parent else ():
        owner = owner[int(part)] if isinstance(owner, list) else getattr(owner, part)
    if isinstance(owner, list):
        owner[int(last)] = new
    else:
        setattr(owner, last, new)


def apply_record(model, record: dict) -> None:
    """Give a freshly built float model the quantized structure `record` describes (tensors are
    placeholders until a checkpoint's are loaded). TinyMoeError when it does not fit the model."""
    bits, group_size = record["bits"], record["group_size"]
    check_settings(bits, group_size)
    modules = dict(_candidates(model))
    for path in record["modules"]:
        module = modules.get(path)
        if module is None:
            raise TinyMoeError(f"quantized module '{path}' is not a layer of this model")
        for suffix, width in _in_widths(module):
            if width % group_size:
                raise TinyMoeError(f"quantized module '{path}': group size {group_size} does not divide "
                                   f"the width {width} of {suffix}")
        _replace(model, path, _placeholder(module, group_size, bits))
    object.__setattr__(model, "quantization", dict(record))


def float_weights(model) -> dict:
    """name -> float weight of every parameter, quantized ones dequantized, under the names the
    float model uses: load them into `Model(cfg)` to get the dequantized reference model."""
    from mlx.utils import tree_flatten

    out = {}
    quantized = {path: m for path, m in model.named_modules() if isinstance(m, _QUANTIZED)}
    for name, value in tree_flatten(model.parameters()):
        path = next((p for p in quantized if name.startswith(p + ".")), None)
        if path is None:
            out[name] = value
    for path, m in quantized.items():
        if isinstance(m, QuantizedSwiGLUExperts):
            out.update({f"{path}.{p}": w for p, w in zip(PROJECTIONS, m.float_weights())})
            continue
        out[f"{path}.weight"] = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits, mode=MODE)
        if "bias" in m:
            out[f"{path}.bias"] = m.bias
    return out


def param_count(model) -> int:
    """Weights the model stands for, counting a quantized weight as its float original."""
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(float_weights(model) if record_of(model) else model.parameters()))
