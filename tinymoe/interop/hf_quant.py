"""Quantized weights across the Hugging Face name mapping: mlx-lm's layout and tinymoe's.

mlx-lm stores a quantized layer as three tensors beside each other, `<layer>.weight` (packed
uint32), `<layer>.scales` and `<layer>.biases`, one set per expert for MoE experts, and says
`"quantization": {"group_size", "bits", "mode"}` in config.json; a layer without `.scales` stays
float. tinymoe names a quantized linear layer's tensors the same way, and its stacked experts
`experts.w_up` (packed), `experts.w_up_scales`, `experts.w_up_biases` (tinymoe.nn.quantized).

tinymoe.interop.hf_weights renames, restacks, reorders rows and rescales weights. Rather than
teach every one of those steps about three tensors, each quantized weight travels through them
as one `Packed` value under its float name (`group`/`hf_group`), and the steps use `apply`,
`index`, `stack` and `scale`, which act on a plain array or on all three parts alike; `ungroup`
and `hf_ungroup` spread them out again at the end. Row operations (a permutation, one expert of
a stack) commute with quantization because every row has its own groups; a scale by a constant
multiplies the scales and biases, exactly.
"""

from __future__ import annotations

from typing import NamedTuple

from tinymoe.errors import TinyMoeError

EXPERT_SUFFIXES = ("_scales", "_biases")  # tinymoe's stacked experts (tinymoe.nn.quantized)


class Packed(NamedTuple):
    weight: object  # packed uint32 (rows..., in * bits / 32)
    scales: object  # (rows..., in / group_size)
    biases: object


def _is_expert(name: str) -> bool:
    return ".moe.experts." in name


def group(weights: dict) -> dict:
    """tinymoe tensors -> the same with each quantized weight as one `Packed` under its float name."""
    out = dict(weights)
    for name in list(weights):
        if _is_expert(name) and name + "_scales" in weights:
            out[name] = Packed(out[name], out.pop(name + "_scales"), out.pop(name + "_biases"))
        elif name.endswith(".weight") and name[:-7] + ".scales" in weights:
            stem = name[:-7]
            out[name] = Packed(out[name], out.pop(stem + ".scales"), out.pop(stem + ".biases"))
    return out


def ungroup(weights: dict) -> dict:
    """The inverse of `group`: tinymoe's tensor names."""
    out = {}
    for name, w in weights.items():
        if not isinstance(w, Packed):
            out[name] = w
        elif _is_expert(name):
            out.update({name: w.weight, name + "_scales": w.scales, name + "_biases": w.biases})
        else:
            stem = name[:-len(".weight")]
            out.update({name: w.weight, stem + ".scales": w.scales, stem + ".biases": w.biases})
    return out


def hf_group(hf: dict) -> dict:
    """mlx-lm's tensors -> one `Packed` per quantized `<layer>.weight`."""
    out = dict(hf)
    for name in list(hf):
        if name.endswith(".scales"):
            stem = name[:-len(".scales")]
            if stem + ".weight" not in hf:
                raise TinyMoeError(f"quantized tensor '{name}' has no '{stem}.weight' beside it")
            out[stem + ".weight"] = Packed(out[stem + ".weight"], out.pop(name), out.pop(stem + ".biases", None))
            if out[stem + ".weight"].biases is None:
                raise TinyMoeError(f"quantized tensor '{stem}.weight' has no biases (only affine quantization is read)")
    return out


def hf_ungroup(hf: dict) -> dict:
    out = {}
    for name, w in hf.items():
        if isinstance(w, Packed):
            stem = name[:-len(".weight")]
            out.update({name: w.weight, stem + ".scales": w.scales, stem + ".biases": w.biases})
        else:
            out[name] = w
    return out


def apply(w, fn):
    """fn on a plain array, or on each part of a `Packed` (a row operation)."""
    return Packed(*(fn(p) for p in w)) if isinstance(w, Packed) else fn(w)


def rows(w) -> int:
    return (w.weight if isinstance(w, Packed) else w).shape[0]


def index(w, e: int):
    return apply(w, lambda a: a[e])


def stack(ws: list):
    import mlx.core as mx

    if isinstance(ws[0], Packed):
        return Packed(*(mx.stack([w[i] for w in ws]) for i in range(3)))
    return mx.stack(ws)


def scale(w, factor: float):
    """w * factor; for a quantized weight, exactly: its scales and biases times factor."""
    if isinstance(w, Packed):
        return Packed(w.weight, w.scales * factor, w.biases * factor)
    return w * factor


def to_float32(w):
    """Float32 on the way in (tinymoe computes in float32 on every device); packed words stay."""
    import mlx.core as mx

    if isinstance(w, Packed):
        return Packed(w.weight, w.scales.astype(mx.float32), w.biases.astype(mx.float32))
    return w.astype(mx.float32)


def dequantized(w, group_size: int | None, bits: int | None):
    """The float value a weight stands for (for checks such as "is this all zero")."""
    import mlx.core as mx

    if isinstance(w, Packed):
        return mx.dequantize(w.weight, w.scales, w.biases, group_size, bits)
    return w


def logical_shape(w, group_size: int | None) -> tuple:
    """The float weight's shape: the packed columns stand for scales columns x group size."""
    if isinstance(w, Packed):
        return (*w.scales.shape[:-1], w.scales.shape[-1] * group_size)
    return tuple(w.shape)


def module_paths(weights: dict) -> list[str]:
    """tinymoe module paths of the `Packed` weights of a grouped dict: the quantization record's
    `modules` (one entry per stacked experts module, not per projection)."""
    paths = set()
    for name, w in weights.items():
        if isinstance(w, Packed):
            paths.add(name.rpartition(".")[0])
    return sorted(paths)


def settings(config: dict, where: str) -> tuple[int, int] | None:
    """(bits, group_size) of an mlx-lm config.json's `quantization`, None when absent."""
    q = config.get("quantization")
    if q is None:
        return None
    from tinymoe.io.manifest import QUANT_BITS, QUANT_GROUP_SIZES

    if not isinstance(q, dict) or q.get("mode", "affine") != "affine":
        raise TinyMoeError(f"{where}: config.json 'quantization' {q!r}: only MLX affine quantization is read")
    bits, group_size = q.get("bits"), q.get("group_size")
    if bits not in QUANT_BITS or group_size not in QUANT_GROUP_SIZES or any(
            k not in ("bits", "group_size", "mode") for k in q):
        raise TinyMoeError(f"{where}: config.json 'quantization' {q!r}: tinymoe reads bits in {QUANT_BITS} "
                           f"and group_size in {QUANT_GROUP_SIZES}, with one setting for every layer")
    return bits, group_size
