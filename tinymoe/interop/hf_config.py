"""Which Hugging Face architecture computes exactly what a tinymoe model computes at inference.

Every architecture handled here shares tinymoe's skeleton: pre-norm decoder, RMSNorm, RoPE with
the rotate-half convention (mlx `nn.RoPE(traditional=False)`), grouped-query attention without
output bias, SwiGLU FFNs, no embedding scaling. They differ in routing, layer placement, shared
experts and q/k/v biases:

  llama          dense, no biases
  qwen2          dense, q/k/v biases
  mixtral        softmax over experts, top-k, renormalised (top-k of logits then softmax over
                 the k is the same thing); every layer MoE; no shared experts
  ernie4_5_moe   softmax, top-k, renormalised; MoE iff layer >= start and (layer+1) % interval
                 == 0, exactly tinymoe's `layer_is_moe`; ungated shared experts; interleaved RoPE
                 (handled by permuting the q/k projection rows, see hf_weights)
  qwen2_moe      softmax, top-k, NOT renormalised (mlx-lm ignores norm_topk_prob), every layer
                 MoE (mlx-lm ignores decoder_sparse_step), q/k/v biases, a sigmoid-gated shared
                 expert (a zero gate weight makes it a constant 1/2, see hf_weights)
  glm4_moe       sigmoid scores, top-k of scores + e_score_correction_bias, renormalised or not
                 (DeepSeek-V3 routing); MoE from layer first_k_dense_replace on; ungated shared
                 experts; q/k/v biases

An export target must be implemented by both mlx-lm and transformers with the same semantics.
`INFERENCE_ROUTING` is the table from a tinymoe router name to what that router computes in
eval mode (training-only noise and jitter do not count); `export_problem` says why an
architecture does not fit. A router without an entry, or a model setting this module does not
know, is refused, never exported approximately. No MLX import here.
"""

from __future__ import annotations

import dataclasses

from tinymoe.config import ModelConfig
from tinymoe.errors import TinyMoeError

DENSE_ARCHS = ("llama", "qwen2")
SOFTMAX_ARCHS = ("mixtral", "ernie4_5_moe", "qwen2_moe")
SIGMOID_ARCHS = ("glm4_moe",)
MOE_ARCHS = SOFTMAX_ARCHS + SIGMOID_ARCHS
CLASS_NAMES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
               "ernie4_5_moe": "Ernie4_5_MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
               "glm4_moe": "Glm4MoeForCausalLM"}
QWEN2_MOE_SHARED_HIDDEN = 1  # width of the all-zero shared expert a Qwen2-MoE export must carry
# mlx-lm builds these with an lm_head whatever tie_word_embeddings says: tied models write the
# embedding out as lm_head (an import re-ties a head equal to the embedding).
ALWAYS_UNTIED = ("qwen2_moe", "glm4_moe")


def _softmax_family(cfg: ModelConfig) -> tuple[str, bool]:
    # topk-softmax (softmax over the k chosen logits) equals renormalised softmax-topk.
    return "softmax", cfg.router_norm or cfg.router_order == "topk-softmax"


# tinymoe router -> its eval-mode routing as (scores, top-k gates renormalised?). jitter and noisy
# perturb only while training; smart's learned temperature is folded into the router weight.
INFERENCE_ROUTING = {
    "topk": _softmax_family,
    "jitter": _softmax_family,
    "smart": _softmax_family,
    "noisy": lambda cfg: ("softmax", True),
    "switch": lambda cfg: ("softmax", False),
    "sigmoid-bias": lambda cfg: ("sigmoid", cfg.router_norm),
}
NOT_EXPORTABLE = {
    "expert-choice": "experts pick tokens across the batch (not causal); no autoregressive architecture routes that way",
    "dynamic": "a per-token number of experts by probability threshold has no Hugging Face architecture in mlx-lm",
}

# ModelConfig fields the mapping understands. Training-only ones (losses, noise, jitter, bias
# rate, training capacity) do not change the exported function. Any other field with a
# non-default value (a feature added later) makes export refuse rather than drop it silently.
KNOWN_FIELDS = {"vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "context", "d_ff",
                "rope_theta", "norm_eps", "tie_embeddings", "attn_bias", "moe_experts", "moe_topk",
                "expert_hidden", "moe_every", "moe_first_dense", "router_norm", "aux_loss_weight",
                "z_loss_weight", "router", "router_order", "noise_scale", "jitter_eps", "bias_rate",
                "router_groups", "router_group_topk", "entropy_weight", "capacity_factor",
                "eval_capacity_factor", "k_min", "k_max", "dynamic_threshold", "shared_experts"}
# Training settings carried in config.json under TINYMOE_KEY so that an import restores them.
TINYMOE_KEY = "tinymoe"
HINT_FIELDS = ("aux_loss_weight", "z_loss_weight", "entropy_weight", "capacity_factor")


def all_moe(cfg: ModelConfig) -> bool:
    return all(cfg.layer_is_moe(i) for i in range(cfg.n_layers))


def routing_of(cfg: ModelConfig) -> tuple[str, bool]:
    router = getattr(cfg, "router", "topk")
    if router in NOT_EXPORTABLE:
        raise TinyMoeError(f"router '{router}' cannot be exported: {NOT_EXPORTABLE[router]}")
    if router not in INFERENCE_ROUTING:
        raise TinyMoeError(f"router '{router}' has no Hugging Face architecture mapping "
                           f"(export supports: {', '.join(INFERENCE_ROUTING)})")
    return INFERENCE_ROUTING[router](cfg)


def export_problem(cfg: ModelConfig, arch: str) -> str | None:
    """Why `arch` cannot represent `cfg` exactly, or None when it can."""
    if arch in DENSE_ARCHS:
        if cfg.is_moe:
            return "a dense architecture cannot hold MoE layers"
        return "llama has no q/k/v biases (use qwen2)" if arch == "llama" and cfg.attn_bias else None
    if arch not in MOE_ARCHS:
        return f"unknown architecture '{arch}'"
    if not cfg.is_moe:
        return "the model is dense (use llama or qwen2)"
    scores, normalised = routing_of(cfg)
    if scores == "softmax" and arch not in SOFTMAX_ARCHS:
        return f"{arch} routes with sigmoid scores; the model's router uses a softmax"
    if scores == "sigmoid" and arch not in SIGMOID_ARCHS:
        return f"{arch} routes with a softmax; the model's router uses sigmoid scores"
    if getattr(cfg, "router_groups", 1) > 1:
        return ("group-limited routing: mlx-lm's glm4_moe masks excluded groups with 0 where transformers "
                "and tinymoe use -inf, and no softmax architecture has groups")
    shared = getattr(cfg, "shared_experts", 0)
    if arch == "mixtral":
        if not normalised:
            return "mixtral renormalises the top-k gates (the model does not)"
        if not all_moe(cfg):
            return "mixtral has an MoE FFN in every layer (the model has dense layers)"
        if cfg.attn_bias:
            return "mixtral has no q/k/v biases"
        if shared:
            return "mixtral has no shared experts"
    elif arch == "ernie4_5_moe":
        if not normalised:
            return "ernie4_5_moe renormalises the top-k gates (the model does not)"
        if cfg.attn_bias:
            return "mlx-lm's ernie4_5_moe cannot hold q/k/v biases alone"
    elif arch == "qwen2_moe":
        if normalised:
            return "mlx-lm's qwen2_moe never renormalises the top-k gates (the model does)"
        if not all_moe(cfg):
            return "mlx-lm's qwen2_moe has an MoE FFN in every layer (the model has dense layers)"
    elif arch == "glm4_moe":
        if cfg.moe_every != 1:
            return "glm4_moe has MoE in every layer after the first dense ones (the model has moe_every > 1)"
        if normalised and cfg.moe_topk == 1:
            return "mlx-lm's glm4_moe does not renormalise a single gate (use --no-router-norm for top-1)"
    return None


def choose_arch(cfg: ModelConfig, requested: str | None = None) -> str:
    """The export architecture for `cfg`: `requested` if it fits, else the first that fits."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for name, value in dataclasses.asdict(cfg).items():
        if name not in KNOWN_FIELDS and value != defaults.get(name):
            raise TinyMoeError(f"export does not support the setting {name} = {value!r} "
                               f"(no Hugging Face architecture mapping for it yet)")
    if cfg.is_moe:
        routing_of(cfg)  # refuses routers without a mapping
        if getattr(cfg, "eval_capacity_factor", 0.0) > 0:
            raise TinyMoeError("eval_capacity_factor > 0 drops tokens at inference; no Hugging Face "
                               "architecture does that (export with eval_capacity_factor 0)")
    candidates = list(MOE_ARCHS if cfg.is_moe else DENSE_ARCHS)
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
    hints = {k: getattr(cfg, k) for k in HINT_FIELDS if hasattr(cfg, k)}
    if getattr(cfg, "router", "topk") == "sigmoid-bias":
        hints["bias_rate"] = cfg.bias_rate
    hf = {
        "architectures": [CLASS_NAMES[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.context, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
        "bos_token_id": None, "eos_token_id": None, "use_cache": True, TINYMOE_KEY: hints,
    }
    shared = getattr(cfg, "shared_experts", 0)
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
                  moe_layer_interval=cfg.moe_every, moe_num_shared_experts=shared, use_bias=False,
                  moe_gate_act="softmax", moe_use_aux_free=False, moe_norm_min=1e-12)
    elif arch == "qwen2_moe":
        # mlx-lm's Qwen2-MoE always has a shared expert: a model without shared experts gets a
        # zero one (it adds exactly nothing).
        width = shared * cfg.expert_d_ff if shared else QWEN2_MOE_SHARED_HIDDEN
        hf.update(intermediate_size=cfg.d_ff, moe_intermediate_size=cfg.expert_d_ff,
                  num_experts=cfg.moe_experts, num_experts_per_tok=cfg.moe_topk,
                  norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                  shared_expert_intermediate_size=width, qkv_bias=True,
                  use_sliding_window=False, sliding_window=None)
    elif arch == "glm4_moe":
        # transformers always builds shared experts: a model without them gets one zero expert.
        hf.update(intermediate_size=cfg.d_ff, moe_intermediate_size=cfg.expert_d_ff,
                  n_routed_experts=cfg.moe_experts, num_experts_per_tok=cfg.moe_topk,
                  n_shared_experts=max(shared, 1), norm_topk_prob=cfg.router_norm,
                  routed_scaling_factor=1.0, n_group=1, topk_group=1,
                  first_k_dense_replace=cfg.moe_first_dense, attention_bias=cfg.attn_bias,
                  use_qk_norm=False, partial_rotary_factor=1.0, scoring_func="sigmoid",
                  topk_method="noaux_tc", num_nextn_predict_layers=0)
    if arch in ALWAYS_UNTIED:
        hf["tie_word_embeddings"] = False
    return hf
