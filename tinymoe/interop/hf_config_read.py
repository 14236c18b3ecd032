"""A Hugging Face config.json -> tinymoe ModelConfig, refusing what tinymoe cannot compute.

The inverse of hf_config's export mapping for the same architectures. Fields a file omits take
transformers' defaults for that architecture (`_HF_DEFAULTS`); structural sizes must be present.
Shared experts and q/k/v biases are decided here from the config and corrected by hf_weights
from the tensors (a shared expert or bias that is all zeros computes nothing and is dropped).
No MLX import here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tinymoe.config import MAX_INT, ModelConfig
from tinymoe.errors import TinyMoeError
from tinymoe.interop.hf_config import DENSE_ARCHS, MOE_ARCHS, TINYMOE_KEY
from tinymoe.memory_check import layers_memory_allows

_HF_DEFAULTS = {
    "llama": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "attention_bias": False, "mlp_bias": False},
    "qwen2": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6},
    "mixtral": {"tie_word_embeddings": False, "rms_norm_eps": 1e-5},
    "qwen2_moe": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "decoder_sparse_step": 1,
                  "norm_topk_prob": False, "qkv_bias": True, "mlp_only_layers": []},
    "ernie4_5_moe": {"tie_word_embeddings": True, "rms_norm_eps": 1e-5, "use_bias": False,
                     "moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 1,
                     "moe_num_shared_experts": 2, "moe_gate_act": "softmax"},
    "glm4_moe": {"tie_word_embeddings": False, "rms_norm_eps": 1e-5, "attention_bias": False,
                 "n_shared_experts": 1, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
                 "first_k_dense_replace": 1, "norm_topk_prob": True, "use_qk_norm": False},
}
_DEFAULT_THETA = {"llama": 10000.0, "qwen2": 10000.0, "mixtral": 1e6, "qwen2_moe": 10000.0,
                  "ernie4_5_moe": 500000.0, "glm4_moe": 10000.0}
_DEFAULT_PARTIAL_ROTARY = {"glm4_moe": 0.5}  # transformers' backward-compatible default


def read_hf_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise TinyMoeError(f"{path}: missing (not a Hugging Face model directory)") from None
    except (OSError, ValueError) as exc:
        raise TinyMoeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise TinyMoeError(f"{path}: not a JSON object")
    return raw


def _rope_theta(hf: dict, arch: str, where: str) -> float:
    # transformers >= 5 writes rope_parameters; older files write rope_theta and rope_scaling.
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise TinyMoeError(f"{where}: 'rope_parameters' must be an object, got {type(params).__name__}")
    scaling = hf.get("rope_scaling")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if isinstance(scaling, dict) and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise TinyMoeError(f"{where}: rope_scaling {scaling} is not supported (tinymoe uses plain RoPE)")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", _DEFAULT_PARTIAL_ROTARY.get(arch, 1.0)))
    if rope_type != "default" or _float(partial, "partial_rotary_factor", where) != 1.0:
        raise TinyMoeError(f"{where}: RoPE type {rope_type!r} with partial_rotary_factor {partial} is not "
                           f"supported (tinymoe rotates the whole head with plain RoPE)")
    return _float(params.get("rope_theta", hf.get("rope_theta", _DEFAULT_THETA[arch])), "rope_theta", where)


def _int(value, key: str, where: str, minimum: int = 0) -> int:
    """An integer setting of config.json: a JSON integer (or a float with no fraction) >= minimum.
    `int()` alone would truncate 1.5, read "12", and raise TypeError on a list."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TinyMoeError(f"{where}: '{key}' must be an integer, got {_shown(value)}")
    if not minimum <= value <= MAX_INT:
        raise TinyMoeError(f"{where}: '{key}' must be in [{minimum}, {MAX_INT}], got {value}")
    return value


def _ints(value, key: str, where: str, empty_ok: bool = False) -> list[int]:
    """An integer or a list of integers (layer indices)."""
    values = value if isinstance(value, list) else [value]
    if not values and not empty_ok:
        raise TinyMoeError(f"{where}: '{key}' is an empty list")
    return [_int(v, key, where, -1) for v in values]


def _float(value, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TinyMoeError(f"{where}: '{key}' must be a finite number, got {_shown(value)}")
    return float(value)


def _bool(value, key: str, where: str) -> bool:
    if not isinstance(value, bool) and value not in (0, 1):
        raise TinyMoeError(f"{where}: '{key}' must be true or false, got {_shown(value)}")
    return bool(value)


def _shown(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, list, dict)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def moe_placement(moe_layers: set[int], n_layers: int, where: str) -> tuple[int, int]:
    """(moe_every, moe_first_dense) whose `layer_is_moe` gives exactly `moe_layers`: the smallest
    such `every`, then the smallest `first`. Linear in n_layers (up to the number of divisors)."""
    if not moe_layers:
        return 1, n_layers
    lowest = min(moe_layers)
    for every in range(1, lowest + 2):
        if (lowest + 1) % every:
            continue  # the first MoE layer must be one of this period's layers
        if set(range(lowest, n_layers, every)) == moe_layers:
            return every, max(0, lowest - every + 1)  # no earlier layer of the period is MoE
    raise TinyMoeError(f"{where}: MoE layers {sorted(moe_layers)} are not 'every Nth layer after the "
                       f"first F', the placements tinymoe supports")


def _get(hf: dict, arch: str, key: str, where: str):
    if key in hf and hf[key] is not None:
        return hf[key]
    if key in _HF_DEFAULTS.get(arch, {}):
        return _HF_DEFAULTS[arch][key]
    raise TinyMoeError(f"{where}: '{key}' is missing")


def hf_to_model_config(hf: dict, where: str, context: int | None = None) -> tuple[ModelConfig, str]:
    """(ModelConfig, architecture) for a config.json; refuses what tinymoe cannot compute."""
    arch = hf.get("model_type")
    if arch not in DENSE_ARCHS + MOE_ARCHS:
        raise TinyMoeError(f"{where}: model_type {arch!r} is not supported "
                           f"(supported: {', '.join(DENSE_ARCHS + MOE_ARCHS)})")
    get = lambda key: _get(hf, arch, key, where)  # noqa: E731
    geti = lambda key, minimum=0: _int(get(key), key, where, minimum)  # noqa: E731
    getf = lambda key: _float(get(key), key, where)  # noqa: E731
    getb = lambda key: _bool(get(key), key, where)  # noqa: E731
    d_model, n_heads = geti("hidden_size"), geti("num_attention_heads")
    n_layers = geti("num_hidden_layers")
    if n_heads < 1 or n_layers < 1:
        raise TinyMoeError(f"{where}: num_attention_heads and num_hidden_layers must be positive, "
                           f"got {n_heads} and {n_layers}")
    max_layers = layers_memory_allows()
    if max_layers is not None and n_layers > max_layers:  # before any loop over the layers
        raise TinyMoeError(f"{where}: num_hidden_layers {n_layers:,} cannot fit in this machine's memory "
                           f"(at most {max_layers:,} blocks)")
    head_dim = _int(hf.get("head_dim") or d_model // n_heads, "head_dim", where)
    if n_heads * head_dim != d_model:
        raise TinyMoeError(f"{where}: head_dim {head_dim} x {n_heads} heads != hidden_size {d_model} "
                           f"(tinymoe needs head_dim = hidden_size / heads)")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise TinyMoeError(f"{where}: hidden_act {hf.get('hidden_act')!r} is not supported (SwiGLU needs silu)")
    if hf.get("use_sliding_window"):
        raise TinyMoeError(f"{where}: sliding-window attention is not supported")
    max_pos = _int(hf.get("max_position_embeddings") or 2048, "max_position_embeddings", where)
    window = hf.get("sliding_window") if arch == "mixtral" else None
    # Attention limited to a window is identical to full attention over a context that short.
    ctx = context or (min(max_pos, _int(window, "sliding_window", where)) if window else max_pos)
    cfg = dict(vocab_size=geti("vocab_size"), d_model=d_model, n_layers=n_layers, n_heads=n_heads,
               n_kv_heads=_int(hf.get("num_key_value_heads") or n_heads, "num_key_value_heads", where), context=ctx,
               d_ff=geti("intermediate_size"), rope_theta=_rope_theta(hf, arch, where),
               norm_eps=getf("rms_norm_eps"), tie_embeddings=getb("tie_word_embeddings"))
    if arch == "llama":
        if get("attention_bias") or get("mlp_bias"):
            raise TinyMoeError(f"{where}: llama with attention_bias/mlp_bias is not supported "
                               f"(tinymoe has no output-projection or FFN biases)")
    elif arch == "qwen2":
        cfg["attn_bias"] = True  # dropped again by hf_weights when every bias is zero
    elif arch == "mixtral":
        cfg.update(moe_experts=geti("num_local_experts"), moe_topk=geti("num_experts_per_tok"))
    elif arch == "qwen2_moe":
        dense, step = set(_ints(get("mlp_only_layers"), "mlp_only_layers", where, True)), geti("decoder_sparse_step", 1)
        moe = {i for i in range(n_layers) if i not in dense and (i + 1) % step == 0}
        every, first = moe_placement(moe, n_layers, where)
        cfg.update(moe_experts=geti("num_experts"), moe_topk=geti("num_experts_per_tok"),
                   expert_hidden=geti("moe_intermediate_size"), router_norm=getb("norm_topk_prob"),
                   moe_every=every, moe_first_dense=first, attn_bias=getb("qkv_bias"))
    elif arch == "ernie4_5_moe":
        if get("use_bias"):
            raise TinyMoeError(f"{where}: ernie4_5_moe with use_bias is not supported")
        if get("moe_gate_act") != "softmax":
            raise TinyMoeError(f"{where}: moe_gate_act {get('moe_gate_act')!r} is not supported (softmax only)")
        start, end = get("moe_layer_start_index"), get("moe_layer_end_index")
        start = min(_ints(start, "moe_layer_start_index", where))
        end = max(_ints(end, "moe_layer_end_index", where))
        end = n_layers - 1 if end == -1 else end
        interval = geti("moe_layer_interval", 1)
        moe = {i for i in range(n_layers) if (i + 1) % interval == 0 and start <= i <= end}
        every, first = moe_placement(moe, n_layers, where)
        cfg.update(moe_experts=geti("moe_num_experts"), moe_topk=geti("moe_k"),
                   expert_hidden=_int(hf.get("moe_intermediate_size") or 0, "moe_intermediate_size", where),
                   moe_every=every, moe_first_dense=first, shared_experts=geti("moe_num_shared_experts"))
    elif arch == "glm4_moe":
        if get("use_qk_norm"):
            raise TinyMoeError(f"{where}: glm4_moe with use_qk_norm is not supported (tinymoe has no q/k norms)")
        if getf("routed_scaling_factor") != 1.0:
            raise TinyMoeError(f"{where}: routed_scaling_factor {get('routed_scaling_factor')} is not supported (1.0 only)")
        if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
            raise TinyMoeError(f"{where}: only sigmoid scoring with noaux_tc top-k is supported")
        cfg.update(moe_experts=geti("n_routed_experts"), moe_topk=geti("num_experts_per_tok"),
                   expert_hidden=geti("moe_intermediate_size"), router="sigmoid-bias",
                   router_norm=getb("norm_topk_prob"), moe_first_dense=geti("first_k_dense_replace"),
                   shared_experts=geti("n_shared_experts"), attn_bias=getb("attention_bias"),
                   router_groups=geti("n_group"), router_group_topk=geti("topk_group"))
    hints = hf.get(TINYMOE_KEY)
    if isinstance(hints, dict):
        for key in ("aux_loss_weight", "z_loss_weight", "entropy_weight", "capacity_factor", "bias_rate"):
            value = hints.get(key)
            if key == "bias_rate" and cfg.get("router") != "sigmoid-bias":
                continue  # only that router reads it
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                cfg[key] = _float(value, f"{TINYMOE_KEY}.{key}", where)
    model_cfg = ModelConfig(**cfg)
    if model_cfg.expert_hidden == model_cfg.d_ff:
        model_cfg.expert_hidden = 0  # tinymoe's spelling of "same as d_ff"
    return model_cfg, arch
