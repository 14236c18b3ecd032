"""Which Hugging Face architecture computes exactly what a tinymoe model computes, and back.

Every architecture handled here shares tinymoe's skeleton: pre-norm decoder, RMSNorm, RoPE with
the rotate-half convention (mlx `nn.RoPE(traditional=False)`), grouped-query attention without
output bias, SwiGLU FFNs, no embedding scaling. They differ in routing and layer placement:

  llama          dense, no biases
  qwen2          dense, q/k/v biases
  mixtral        softmax over experts, top-k, renormalised (top-k of logits then softmax over
                 the k is the same thing); every layer MoE
  ernie4_5_moe   softmax, top-k, renormalised; MoE iff layer >= start and (layer+1) % interval
                 == 0, exactly tinymoe's `layer_is_moe`; interleaved RoPE (handled by permuting
                 the q/k projection rows, see hf_weights); no attention biases in mlx-lm
  qwen2_moe      softmax, top-k, NOT renormalised (mlx-lm ignores norm_topk_prob), every layer
                 MoE (mlx-lm ignores decoder_sparse_step), always a sigmoid-gated shared expert
                 (exported as zeros), q/k/v biases

An export target must be implemented by both mlx-lm and transformers with the same semantics.
`EXPORT_CANDIDATES` maps a tinymoe router name to its candidate architectures in order of
preference; `export_problem` says why one does not fit. A router with no entry (or a setting this
module does not know) is refused, never exported approximately. No MLX import here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tinymoe.config import ModelConfig
from tinymoe.errors import TinyMoeError

DENSE_ARCHS = ("llama", "qwen2")
MOE_ARCHS = ("mixtral", "ernie4_5_moe", "qwen2_moe")
CLASS_NAMES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
               "ernie4_5_moe": "Ernie4_5_MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def _topk_candidates(cfg: ModelConfig) -> list[str]:
    return list(MOE_ARCHS) if cfg.is_moe else list(DENSE_ARCHS)


# tinymoe router name -> candidate architectures (best first). Add a router here together with
# its cases in `export_problem`, `hf_to_model_config` and hf_weights.
EXPORT_CANDIDATES = {"topk": _topk_candidates}

# ModelConfig fields whose meaning the mapping covers. Any other field with a non-default value
# (a feature added later) makes export refuse rather than silently drop it.
KNOWN_FIELDS = {"vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "context", "d_ff",
                "rope_theta", "norm_eps", "tie_embeddings", "attn_bias", "moe_experts", "moe_topk",
                "expert_hidden", "moe_every", "moe_first_dense", "router_norm", "aux_loss_weight",
                "z_loss_weight", "router"}
# Training-only hints carried in config.json under this key, so a round trip keeps them.
TINYMOE_KEY = "tinymoe"


def router_name(cfg: ModelConfig) -> str:
    return str(getattr(cfg, "router", "topk"))


def all_moe(cfg: ModelConfig) -> bool:
    return all(cfg.layer_is_moe(i) for i in range(cfg.n_layers))


def export_problem(cfg: ModelConfig, arch: str) -> str | None:
    """Why `arch` cannot represent `cfg` exactly, or None when it can."""
    if arch in DENSE_ARCHS:
        if cfg.is_moe:
            return "a dense architecture cannot hold MoE layers"
        if arch == "llama" and cfg.attn_bias:
            return "llama has no q/k/v biases (use qwen2)"
        return None
    if arch not in MOE_ARCHS:
        return f"unknown architecture '{arch}'"
    if not cfg.is_moe:
        return "the model is dense (use llama or qwen2)"
    if arch == "mixtral":
        if not cfg.router_norm:
            return "mixtral renormalises the top-k gates (the model has router_norm = false)"
        if not all_moe(cfg):
            return "mixtral has an MoE FFN in every layer (the model has dense layers)"
        if cfg.attn_bias:
            return "mixtral has no q/k/v biases"
    elif arch == "ernie4_5_moe":
        if not cfg.router_norm:
            return "ernie4_5_moe renormalises the top-k gates (the model has router_norm = false)"
        if cfg.attn_bias:
            return "mlx-lm's ernie4_5_moe cannot hold q/k/v biases alone"
    elif arch == "qwen2_moe":
        if cfg.router_norm:
            return "mlx-lm's qwen2_moe never renormalises the top-k gates (the model has router_norm = true)"
        if not all_moe(cfg):
            return "mlx-lm's qwen2_moe has an MoE FFN in every layer (the model has dense layers)"
    return None


def choose_arch(cfg: ModelConfig, requested: str | None = None) -> str:
    """The export architecture for `cfg`: `requested` if it fits, else the first that fits."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for name, value in dataclasses.asdict(cfg).items():
        if name not in KNOWN_FIELDS and value != defaults.get(name):
            raise TinyMoeError(f"export does not support the setting {name} = {value!r} "
                               f"(no Hugging Face architecture mapping for it yet)")
    router = router_name(cfg)
    if router not in EXPORT_CANDIDATES:
        raise TinyMoeError(f"router '{router}' matches no Hugging Face architecture that mlx-lm and "
                           f"transformers both implement; export supports: {', '.join(EXPORT_CANDIDATES)}")
    candidates = EXPORT_CANDIDATES[router](cfg)
    if requested and requested != "auto":
        if requested not in candidates:
            raise TinyMoeError(f"--arch {requested} does not fit this model (candidates: {', '.join(candidates)})")
        problem = export_problem(cfg, requested)
        if problem:
            raise TinyMoeError(f"--arch {requested}: {problem}")
        return requested
    reasons = []
    for arch in candidates:
        problem = export_problem(cfg, arch)
        if problem is None:
            return arch
        reasons.append(f"{arch}: {problem}")
    raise TinyMoeError("no Hugging Face architecture matches this model exactly (" + "; ".join(reasons) + ")")


def hf_config_from_model(cfg: ModelConfig, arch: str) -> dict:
    """config.json for `cfg` exported as `arch` (assumes `export_problem(cfg, arch)` is None)."""
    hf = {
        "architectures": [CLASS_NAMES[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.context, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
        "bos_token_id": None, "eos_token_id": None, "use_cache": True,
        TINYMOE_KEY: {"aux_loss_weight": cfg.aux_loss_weight, "z_loss_weight": cfg.z_loss_weight},
    }
    if arch == "llama":
        hf.update(intermediate_size=cfg.d_ff, attention_bias=False, mlp_bias=False)
    elif arch == "qwen2":
        hf.update(intermediate_size=cfg.d_ff, use_sliding_window=False, sliding_window=None)
    elif arch == "mixtral":
        hf.update(intermediate_size=cfg.expert_d_ff, num_local_experts=cfg.moe_experts,
                  num_experts_per_tok=cfg.moe_topk, sliding_window=None)
    elif arch == "ernie4_5_moe":
        hf.update(intermediate_size=cfg.d_ff, moe_intermediate_size=cfg.expert_d_ff,
                  moe_num_experts=cfg.moe_experts, moe_k=cfg.moe_topk,
                  moe_layer_start_index=cfg.moe_first_dense, moe_layer_end_index=cfg.n_layers - 1,
                  moe_layer_interval=cfg.moe_every, moe_num_shared_experts=0, use_bias=False,
                  moe_gate_act="softmax", moe_use_aux_free=False, moe_norm_min=1e-12)
    elif arch == "qwen2_moe":
        # mlx-lm's Qwen2-MoE always has a shared expert and always un-tied lm_head: both are
        # written out (the shared expert as zeros, so it adds exactly nothing).
        hf.update(intermediate_size=cfg.d_ff, moe_intermediate_size=cfg.expert_d_ff,
                  num_experts=cfg.moe_experts, num_experts_per_tok=cfg.moe_topk,
                  norm_topk_prob=cfg.router_norm, decoder_sparse_step=1, mlp_only_layers=[],
                  shared_expert_intermediate_size=QWEN2_MOE_SHARED_HIDDEN, qkv_bias=True,
                  use_sliding_window=False, sliding_window=None, tie_word_embeddings=False)
    return hf


QWEN2_MOE_SHARED_HIDDEN = 1  # width of the all-zero shared expert an export has to carry

# Hugging Face config defaults (transformers) for the flags read on import when a file omits them.
_HF_DEFAULTS = {
    "llama": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "attention_bias": False, "mlp_bias": False},
    "qwen2": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6},
    "mixtral": {"tie_word_embeddings": False, "rms_norm_eps": 1e-5},
    "qwen2_moe": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "decoder_sparse_step": 1,
                  "norm_topk_prob": False, "qkv_bias": True, "mlp_only_layers": []},
    "ernie4_5_moe": {"tie_word_embeddings": True, "rms_norm_eps": 1e-5, "use_bias": False,
                     "moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 1,
                     "moe_num_shared_experts": 2, "moe_gate_act": "softmax"},
}
_DEFAULT_THETA = {"llama": 10000.0, "qwen2": 10000.0, "mixtral": 1e6, "qwen2_moe": 10000.0,
                  "ernie4_5_moe": 500000.0}


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
    scaling = hf.get("rope_scaling")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if scaling not in (None, {}) and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise TinyMoeError(f"{where}: rope_scaling {scaling} is not supported (tinymoe uses plain RoPE)")
    if rope_type != "default" or params.get("partial_rotary_factor", 1.0) != 1.0:
        raise TinyMoeError(f"{where}: rope_parameters {params} are not supported (tinymoe uses plain RoPE)")
    return float(params.get("rope_theta", hf.get("rope_theta", _DEFAULT_THETA[arch])))


def moe_placement(moe_layers: set[int], n_layers: int, where: str) -> tuple[int, int]:
    """(moe_every, moe_first_dense) whose `layer_is_moe` gives exactly `moe_layers`."""
    for every in range(1, n_layers + 1):
        for first in range(n_layers + 1):
            if {i for i in range(n_layers) if i >= first and (i + 1) % every == 0} == moe_layers:
                return every, first
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
    d_model, n_heads = int(get("hidden_size")), int(get("num_attention_heads"))
    n_layers = int(get("num_hidden_layers"))
    head_dim = hf.get("head_dim") or d_model // n_heads
    if n_heads * head_dim != d_model:
        raise TinyMoeError(f"{where}: head_dim {head_dim} x {n_heads} heads != hidden_size {d_model} "
                           f"(tinymoe needs head_dim = hidden_size / heads)")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise TinyMoeError(f"{where}: hidden_act {hf.get('hidden_act')!r} is not supported (SwiGLU needs silu)")
    if hf.get("use_sliding_window"):
        raise TinyMoeError(f"{where}: sliding-window attention is not supported")
    max_pos = int(hf.get("max_position_embeddings") or 2048)
    window = hf.get("sliding_window") if arch == "mixtral" else None
    # Attention limited to a window is identical to full attention over a context that short.
    ctx = context or (min(max_pos, int(window)) if window else max_pos)
    cfg = dict(vocab_size=int(get("vocab_size")), d_model=d_model, n_layers=n_layers, n_heads=n_heads,
               n_kv_heads=int(hf.get("num_key_value_heads") or n_heads), context=ctx,
               d_ff=int(get("intermediate_size")), rope_theta=_rope_theta(hf, arch, where),
               norm_eps=float(get("rms_norm_eps")), tie_embeddings=bool(get("tie_word_embeddings")))
    if arch == "llama":
        if get("attention_bias") or get("mlp_bias"):
            raise TinyMoeError(f"{where}: llama with attention_bias/mlp_bias is not supported "
                               f"(tinymoe has no output-projection or FFN biases)")
    elif arch == "qwen2":
        cfg["attn_bias"] = True  # dropped again on import when every bias is zero
    elif arch == "mixtral":
        cfg.update(moe_experts=int(get("num_local_experts")), moe_topk=int(get("num_experts_per_tok")),
                   router_norm=True)
    elif arch == "qwen2_moe":
        moe = {i for i in range(n_layers) if i not in set(get("mlp_only_layers"))
               and (i + 1) % int(get("decoder_sparse_step")) == 0}
        every, first = moe_placement(moe, n_layers, where)
        cfg.update(moe_experts=int(get("num_experts")), moe_topk=int(get("num_experts_per_tok")),
                   expert_hidden=int(get("moe_intermediate_size")), router_norm=bool(get("norm_topk_prob")),
                   moe_every=every, moe_first_dense=first, attn_bias=bool(get("qkv_bias")))
    elif arch == "ernie4_5_moe":
        if get("use_bias"):
            raise TinyMoeError(f"{where}: ernie4_5_moe with use_bias is not supported")
        if get("moe_gate_act") != "softmax":
            raise TinyMoeError(f"{where}: moe_gate_act {get('moe_gate_act')!r} is not supported (softmax only)")
        start, end = get("moe_layer_start_index"), get("moe_layer_end_index")
        start = min(start) if isinstance(start, list) else int(start)
        end = max(end) if isinstance(end, list) else int(end)
        end = n_layers - 1 if end == -1 else end
        interval = int(get("moe_layer_interval"))
        moe = {i for i in range(n_layers) if (i + 1) % interval == 0 and start <= i <= end}
        every, first = moe_placement(moe, n_layers, where)
        cfg.update(moe_experts=int(get("moe_num_experts")), moe_topk=int(get("moe_k")),
                   expert_hidden=int(hf.get("moe_intermediate_size") or 0), router_norm=True,
                   moe_every=every, moe_first_dense=first)
    hints = hf.get(TINYMOE_KEY)
    if isinstance(hints, dict):
        for key in ("aux_loss_weight", "z_loss_weight"):
            if isinstance(hints.get(key), (int, float)) and not isinstance(hints.get(key), bool):
                cfg[key] = float(hints[key])
    model_cfg = ModelConfig(**cfg)
    if model_cfg.expert_hidden == model_cfg.d_ff:
        model_cfg.expert_hidden = 0  # tinymoe's spelling of "same as d_ff"
    return model_cfg, arch
