"""Tensor names and layouts between tinymoe checkpoints and Hugging Face directories.

tinymoe keeps experts stacked, (E, H, D) for w_gate/w_up and (E, D, H) for w_down; Hugging Face
files keep one tensor per expert (`...experts.3.w1.weight`, or `gate_proj` for Qwen2-MoE and
ERNIE), which both transformers and mlx-lm restack on load. Linear weights are (out, in) on both
sides, so everything else is a rename.

One layout change: ERNIE 4.5 applies RoPE to interleaved pairs (x[2i], x[2i+1]) where tinymoe
rotates halves (x[i], x[i + Dh/2]) with the same frequencies. Reordering the rows of each head of
the q and k projections by `rope_permutation` turns one into the other exactly, and attention
scores are unchanged because q and k are reordered alike.

Router extras: the sigmoid-bias router's `selection_bias` is GLM-4-MoE's
`e_score_correction_bias`; the smart router's learned temperature is folded into the exported
router weight (W / T gives the same logits); the noisy router's noise weights act only in
training and are not exported. Shared experts (one ungated SwiGLU of width N x H in tinymoe) are
ERNIE's and GLM's `shared_experts` as they are, and Qwen2-MoE's sigmoid-gated `shared_expert`
with a zero gate weight (sigmoid(0) = 1/2 exactly) and `down_proj` doubled (exact in floating
point); an import halves it back.

Quantized weights (mlx-lm's layout: `.weight`, `.scales`, `.biases`) go through every step as
one value each (tinymoe.interop.hf_quant), so the mapping below is written once for both.

Shapes: D model width, H FFN hidden width, E experts, Dh head width.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tinymoe.config import ModelConfig
from tinymoe.errors import TinyMoeError
from tinymoe.interop import hf_quant
from tinymoe.interop.hf_config import ALWAYS_UNTIED, QWEN2_MOE_SHARED_HIDDEN

# Per MoE architecture: the FFN module name, the router name, HF names of (w_gate, w_up, w_down).
MOE_LAYOUT = {
    "mixtral": ("block_sparse_moe", "gate", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
    "ernie4_5_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
    "glm4_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
}
SHARED_MODULE = {"ernie4_5_moe": "shared_experts", "glm4_moe": "shared_experts"}  # ungated, renamed only
_ATTN = (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj"))
_DENSE = (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))
_EXPERTS = ("w_gate", "w_up", "w_down")


def rope_permutation(head_dim: int) -> np.ndarray:
    """Row order of one head for interleaved RoPE: new[2i] = old[i], new[2i+1] = old[i + Dh/2]."""
    half = head_dim // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)  # (Dh,)


def _permute_heads(w, head_dim: int, order: np.ndarray):
    """Reorder the rows of every head of a (heads*Dh, ...) projection (or its bias)."""
    import mlx.core as mx

    shape = w.shape
    heads = shape[0] // head_dim
    return w.reshape(heads, head_dim, *shape[1:])[:, mx.array(order)].reshape(shape)


def name_map(cfg: ModelConfig, arch: str) -> dict[str, str]:
    """tinymoe tensor name -> HF tensor name, for the renamed (not restacked) tensors."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        t, h = f"blocks.{i}", f"model.layers.{i}"
        names[f"{t}.attn_norm.weight"] = f"{h}.input_layernorm.weight"
        names[f"{t}.ffn_norm.weight"] = f"{h}.post_attention_layernorm.weight"
        for ours, theirs in _ATTN:
            names[f"{t}.attn.{ours}.weight"] = f"{h}.self_attn.{theirs}.weight"
            if cfg.attn_bias and ours != "wo":
                names[f"{t}.attn.{ours}.bias"] = f"{h}.self_attn.{theirs}.bias"
        if cfg.layer_is_moe(i):
            block, router, _ = MOE_LAYOUT[arch]
            names[f"{t}.moe.router.weight"] = f"{h}.{block}.{router}.weight"
            if getattr(cfg, "router", "topk") == "sigmoid-bias":
                names[f"{t}.moe.router.selection_bias"] = f"{h}.mlp.gate.e_score_correction_bias"
            if getattr(cfg, "shared_experts", 0) and arch in SHARED_MODULE:
                for ours, theirs in _DENSE:
                    names[f"{t}.moe.shared.{ours}.weight"] = f"{h}.mlp.{SHARED_MODULE[arch]}.{theirs}.weight"
        else:
            for ours, theirs in _DENSE:
                names[f"{t}.ffn.{ours}.weight"] = f"{h}.mlp.{theirs}.weight"
    return names


def expert_names(arch: str, layer: int, n_experts: int) -> dict[str, list[str]]:
    """tinymoe stacked expert tensor -> the E per-expert HF names, in expert order."""
    block, _, projs = MOE_LAYOUT[arch]
    h = f"model.layers.{layer}.{block}.experts"
    return {f"blocks.{layer}.moe.experts.{ours}": [f"{h}.{e}.{theirs}.weight" for e in range(n_experts)]
            for ours, theirs in zip(_EXPERTS, projs)}


def _is_rope_proj(name: str) -> bool:
    return ".attn.wq." in name or ".attn.wk." in name


def to_hf(cfg: ModelConfig, weights: dict, arch: str) -> dict:
    """tinymoe weights (name -> mx.array) -> HF tensors (name -> mx.array), for `arch`."""
    import mlx.core as mx

    out = {}
    weights = hf_quant.group(weights)
    router = getattr(cfg, "router", "topk")
    for ours, theirs in name_map(cfg, arch).items():
        w = weights[ours]
        if arch == "ernie4_5_moe" and _is_rope_proj(ours):
            w = hf_quant.apply(w, lambda a: _permute_heads(a, cfg.head_dim, rope_permutation(cfg.head_dim)))
        if router == "smart" and ours.endswith(".moe.router.weight"):
            w = w.astype(mx.float32) / _temperature(weights[ours.replace(".weight", ".log_temperature")])
        out[theirs] = w
    if arch in ALWAYS_UNTIED:  # mlx-lm always reads an lm_head; the head is the embedding when tied
        out["lm_head.weight"] = weights["lm_head.weight" if not cfg.tie_embeddings else "embed.weight"]
    D, dt = cfg.d_model, weights["norm.weight"].dtype  # padding tensors follow the model dtype (norms: never packed)
    for i in range(cfg.n_layers):
        h = f"model.layers.{i}"
        if arch == "qwen2_moe":
            for p in ("q_proj", "k_proj", "v_proj"):  # qkv_bias is always on in mlx-lm
                if f"{h}.self_attn.{p}.bias" not in out:
                    rows = hf_quant.rows(out[f"{h}.self_attn.{p}.weight"])
                    out[f"{h}.self_attn.{p}.bias"] = mx.zeros((rows,), dt)
        if not cfg.layer_is_moe(i):
            continue
        for ours, per_expert in expert_names(arch, i, cfg.moe_experts).items():
            stacked = weights[ours]  # (E, H, D) or (E, D, H)
            for e, theirs in enumerate(per_expert):
                out[theirs] = hf_quant.index(stacked, e)
        shared = getattr(cfg, "shared_experts", 0)
        if arch == "qwen2_moe":
            out[f"{h}.mlp.shared_expert_gate.weight"] = mx.zeros((1, D), dt)  # gate = 1/2
            if shared:
                t = f"blocks.{i}.moe.shared"
                out[f"{h}.mlp.shared_expert.gate_proj.weight"] = weights[f"{t}.w_gate.weight"]
                out[f"{h}.mlp.shared_expert.up_proj.weight"] = weights[f"{t}.w_up.weight"]
                out[f"{h}.mlp.shared_expert.down_proj.weight"] = hf_quant.scale(weights[f"{t}.w_down.weight"], 2)
            else:
                s = QWEN2_MOE_SHARED_HIDDEN
                out[f"{h}.mlp.shared_expert.gate_proj.weight"] = mx.zeros((s, D), dt)
                out[f"{h}.mlp.shared_expert.up_proj.weight"] = mx.zeros((s, D), dt)
                out[f"{h}.mlp.shared_expert.down_proj.weight"] = mx.zeros((D, s), dt)
        elif arch == "ernie4_5_moe":  # zero selection bias = plain softmax top-k
            out[f"{h}.mlp.moe_statics.e_score_correction_bias"] = mx.zeros((1, cfg.moe_experts), mx.float32)
        elif arch == "glm4_moe":
            if not shared:  # transformers always has one: make it compute nothing
                H = cfg.expert_d_ff
                for p, shape in (("gate_proj", (H, D)), ("up_proj", (H, D)), ("down_proj", (D, H))):
                    out[f"{h}.mlp.shared_experts.{p}.weight"] = mx.zeros(shape, dt)
    return hf_quant.hf_ungroup(out)


def _temperature(log_t):
    """The smart router's temperature, clipped as the router clips it."""
    import mlx.core as mx

    from tinymoe.nn.routers import LOG_TEMPERATURE_RANGE

    return mx.exp(mx.clip(log_t.astype(mx.float32), *LOG_TEMPERATURE_RANGE))


_QUANT: dict = {"group_size": None, "bits": None}  # of the directory being read (one at a time)


def _all_zero(a) -> bool:
    import mlx.core as mx

    a = hf_quant.dequantized(a, _QUANT["group_size"], _QUANT["bits"])
    return not bool(mx.any(a != 0).item())


def _equal(a, b) -> bool:
    import mlx.core as mx

    if isinstance(a, hf_quant.Packed) != isinstance(b, hf_quant.Packed):
        return False
    pairs = zip(a, b) if isinstance(a, hf_quant.Packed) else [(a, b)]
    return all(x.shape == y.shape and mx.array_equal(x, y).item() for x, y in pairs)


def from_hf(cfg: ModelConfig, hf: dict, arch: str, where: str, quant: tuple | None = None) -> tuple[ModelConfig, dict]:
    """HF tensors -> (config, tinymoe weights as float32). Extra parts that compute nothing
    (zero biases, zero shared experts, zero selection biases) are dropped; any other tensor this
    mapping does not place is an error, so nothing is silently ignored. quant: (bits, group_size)
    of a quantized directory (tinymoe.interop.hf_quant.settings); its packed weights stay packed
    (uint32, with float32 scales and biases, under tinymoe's quantized names)."""
    hf = dict(hf)
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}  # recomputed
    if quant is not None:
        hf = hf_quant.hf_group(hf)
        _QUANT.update(bits=quant[0], group_size=quant[1])
    else:
        _QUANT.update(bits=None, group_size=None)

    def take(name: str):
        if name not in hf:
            raise TinyMoeError(f"{where}: tensor '{name}' is missing")
        return hf_quant.to_float32(hf.pop(name))

    if cfg.attn_bias:  # keep biases only when some are non-zero
        biases = [v for k, v in hf.items() if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
        if biases and all(_all_zero(b) for b in biases):
            for k in [k for k in hf if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]:
                del hf[k]
            cfg.attn_bias = False
    if not cfg.tie_embeddings and "lm_head.weight" in hf and "model.embed_tokens.weight" in hf:
        if _equal(hf["lm_head.weight"], hf["model.embed_tokens.weight"]):
            cfg.tie_embeddings = True  # an exported tied model (see ALWAYS_UNTIED)
            del hf["lm_head.weight"]
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some tied checkpoints still carry a copy
    out = _shared_from_hf(cfg, hf, arch, where)
    for ours, theirs in name_map(cfg, arch).items():
        w = take(theirs)
        if arch == "ernie4_5_moe" and _is_rope_proj(ours):
            w = hf_quant.apply(w, lambda a: _permute_heads(a, cfg.head_dim, np.argsort(rope_permutation(cfg.head_dim))))
        out[ours] = w
    for i in range(cfg.n_layers):
        if not cfg.layer_is_moe(i):
            continue
        for ours, per_expert in expert_names(arch, i, cfg.moe_experts).items():
            out[ours] = hf_quant.stack([take(n) for n in per_expert])
        if arch == "ernie4_5_moe":
            bias = hf.pop(f"model.layers.{i}.mlp.moe_statics.e_score_correction_bias", None)
            if bias is not None and not _all_zero(bias):
                raise TinyMoeError(f"{where}: layer {i} has a non-zero e_score_correction_bias "
                                   f"(biased expert selection) that tinymoe's softmax top-k router lacks")
    if hf:
        extra = sorted(hf)
        raise TinyMoeError(f"{where}: {len(extra)} tensor(s) tinymoe has no place for, e.g. '{extra[0]}'")
    return cfg, out  # quantized weights still grouped: check_shapes, then hf_quant.ungroup


def _shared_tensors(hf: dict, layer: int, arch: str) -> dict:
    prefix = f"model.layers.{layer}.mlp.{'shared_expert' if arch == 'qwen2_moe' else 'shared_experts'}."
    return {k: v for k, v in hf.items() if k.startswith(prefix)}


def _shared_from_hf(cfg: ModelConfig, hf: dict, arch: str, where: str) -> dict:
    """Decide the shared experts from the tensors: all-zero ones (in every MoE layer) are dropped;
    Qwen2-MoE's are converted here (gate must be constant, down_proj halved); ERNIE's and GLM's
    are left in `hf` for name_map. Sets cfg.shared_experts; returns converted tinymoe tensors."""
    layers = [i for i in range(cfg.n_layers) if cfg.layer_is_moe(i)]
    parts = {i: _shared_tensors(hf, i, arch) for i in layers}
    if not any(parts.values()):
        if cfg.shared_experts:
            raise TinyMoeError(f"{where}: the config has {cfg.shared_experts} shared experts but the "
                               f"files hold no shared-expert tensors")
        return {}
    # A SwiGLU with an all-zero gate, up or down projection adds exactly nothing.
    if all(any(_all_zero(v) for v in p.values()) for p in parts.values()):
        for p in parts.values():
            for k in p:
                del hf[k]
        for i in layers:
            hf.pop(f"model.layers.{i}.mlp.shared_expert_gate.weight", None)
        cfg.shared_experts = 0
        return {}
    first = parts[layers[0]]
    width = hf_quant.logical_shape(next(v for k, v in first.items() if k.endswith("up_proj.weight")),
                                   _QUANT["group_size"])[0]
    if width % cfg.expert_d_ff:
        raise TinyMoeError(f"{where}: shared expert width {width} is not a multiple of the expert width "
                           f"{cfg.expert_d_ff} (tinymoe's shared experts are N experts wide)")
    cfg.shared_experts = width // cfg.expert_d_ff
    if arch != "qwen2_moe":
        return {}
    out = {}
    for i in layers:
        h = f"model.layers.{i}.mlp"
        gate = hf.pop(f"{h}.shared_expert_gate.weight", None)
        if gate is None or not _all_zero(gate):
            raise TinyMoeError(f"{where}: layer {i}'s shared expert has an input-dependent sigmoid gate; "
                               f"tinymoe's shared experts are ungated")
        for ours, theirs in _DENSE:
            w = hf_quant.to_float32(hf.pop(f"{h}.shared_expert.{theirs}.weight"))
            out[f"blocks.{i}.moe.shared.{ours}.weight"] = hf_quant.scale(w, 0.5) if ours == "w_down" else w  # sigmoid(0)
    return out


def read_safetensors_dir(directory: Path) -> dict:
    """All tensors of an HF directory's model*.safetensors files (sharded or not), lazily."""
    import mlx.core as mx

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TinyMoeError(f"{index}: not a valid safetensors index ({exc})") from None
    else:
        files = sorted(p.name for p in directory.glob("model*.safetensors"))
    if not files:
        hint = " (PyTorch .bin weights are not supported; convert them to safetensors)" \
            if any(directory.glob("*.bin")) else ""
        raise TinyMoeError(f"{directory}: no model*.safetensors files{hint}")
    tensors = {}
    for name in files:
        try:
            tensors.update(mx.load(str(directory / name)))
        except Exception as exc:  # MLX raises plain RuntimeError/ValueError on bad files
            raise TinyMoeError(f"{directory / name}: unreadable safetensors ({exc})") from None
    return tensors


def check_shapes(cfg: ModelConfig, weights: dict, where: str, group_size: int | None = None) -> None:
    """Every tensor a tinymoe Model of `cfg` expects is present with its shape, and no other
    (`weights` as from_hf returns them: a quantized weight grouped, at its float shape)."""
    from mlx.utils import tree_flatten

    from tinymoe.nn.model import Model

    expected = {k: v.shape for k, v in tree_flatten(Model(cfg, "dense").parameters())}  # lazy, never evaluated
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise TinyMoeError(f"{where}: weights do not fit the model ({'missing ' + missing[0] if missing else 'unexpected ' + extra[0]})")
    for k, shape in expected.items():
        got = hf_quant.logical_shape(weights[k], group_size)
        if got != tuple(shape):
            raise TinyMoeError(f"{where}: '{k}' has shape {got}, the config implies {tuple(shape)}")
