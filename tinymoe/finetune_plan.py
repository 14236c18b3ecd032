"""Memory plans for fine-tuning (LoRA, QLoRA) and sampling a real model, from its shape alone.

A `Shape` is what memory depends on: widths, layers, heads and head width, experts, top-k, expert
and shared-expert widths, vocabulary. It comes from a tinymoe ModelConfig (a checkpoint's
manifest) or from a Hugging Face config.json, including the published configs shipped in
presets/published/ (OLMoE-1B-7B, Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B, Mixtral-8x7B) and
architectures tinymoe cannot import exactly (q/k norms, a head width other than d_model / heads):
planning needs the sizes, not the computation. No MLX here.

Fine-tuning with adapters (tinymoe.nn.lora) needs, in bytes:
  base_weights       the frozen base: float, or quantized (bits/8 per weight plus a scale and a
                     bias per group; routers, norms, biases and q/k norms stay float)
  adapters           rank r x (in + out) per adapted matrix (one per routed expert), float32
  adapter_grads      the same again; no gradient exists for the frozen base
  optimizer          AdamW: two float32 moments per adapter weight
  update_transient   the compiled update holds new and old adapters, gradients and moments
  activations        what backprop keeps per token and layer: tinymoe.planner's count for full
                     training (the input gradient still flows through every frozen layer) times
                     ACTIVATION_CALIBRATION, measured (the adapted layers keep the base and
                     low-rank products apart, and more besides, that the count does not model)
  dequant_transient  quantized bases on the CPU: the largest matrix dequantized for a matmul
Sampling needs the weights and the KV cache (tinymoe.planner's sample plan, with the real head width).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tinymoe.config import ModelConfig
from tinymoe.errors import TinyMoeError
from tinymoe.names import DTYPE_BYTES, LORA_TARGETS
from tinymoe.planner import DEFAULT_MEMORY_GIB, DEFAULT_USABLE_FRACTION, GIB, moe_layer_count, weight_bytes
from tinymoe.router_registry import router_params

# Measured, not modeled: MLX's peak grew by 72.5 MiB per 256-token sequence fine-tuning the tiny
# 8x top-2 MoE (rank 8 on attention, experts and router; batch 1, 4 and 8 on a 2-core Linux CPU),
# where the full-training count gives 33.3 MiB (and full training itself measured 36.5 MiB). With
# fewer targets the factor over-estimates (attention only: by ~30%), the safe direction.
ACTIVATION_CALIBRATION = 2.2
PUBLISHED = ("olmoe-1b-7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "mixtral-8x7b")
FINETUNE_CONTEXT = 2048  # a fine-tune's default window when the model's context is longer (as mlx_lm.lora)


@dataclass
class Shape:
    name: str
    vocab: int
    d_model: int
    n_layers: int
    moe_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    experts: int
    topk: int
    expert_hidden: int
    dense_hidden: int = 0  # FFN width of the dense layers
    shared_hidden: int = 0  # width of the always-active shared expert(s), 0 = none
    shared_gate: int = 0  # parameters of a shared expert's gate (Qwen2-MoE: d_model)
    router: int = 0  # router parameters per MoE layer
    attn_bias: bool = False
    qk_norm: int = 0  # q/k norm weights per layer (OLMoE, Qwen3-MoE)
    tie: bool = False
    context: int = 2048

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def shape_from_config(cfg: ModelConfig, name: str = "checkpoint") -> Shape:
    return Shape(name, cfg.vocab_size, cfg.d_model, cfg.n_layers, moe_layer_count(cfg), cfg.n_heads, cfg.n_kv_heads,
                 cfg.head_dim, cfg.moe_experts if cfg.is_moe else 0, cfg.moe_topk, cfg.expert_d_ff, cfg.d_ff,
                 cfg.shared_experts * cfg.expert_d_ff, 0, router_params(cfg) if cfg.is_moe else 0, cfg.attn_bias, 0,
                 cfg.tie_embeddings, cfg.context)


def _int(config: dict, *keys, default=None) -> int:
    for key in keys:
        if isinstance(config.get(key), int) and not isinstance(config.get(key), bool) and config[key] > 0:
            return config[key]
    if default is not None:
        return default
    raise TinyMoeError(f"config.json: missing a positive integer '{keys[0]}'")


def shape_from_hf(config: dict, name: str = "config.json") -> Shape:
    """The shape of a Hugging Face MoE (or dense) config: mixtral, qwen2_moe, qwen3_moe, olmoe,
    and the dense llama/qwen2 family (keys as transformers names them)."""
    kind = config.get("model_type")
    d = _int(config, "hidden_size")
    layers = _int(config, "num_hidden_layers")
    heads = _int(config, "num_attention_heads")
    kv = _int(config, "num_key_value_heads", default=heads)
    head_dim = _int(config, "head_dim", default=d // heads)
    experts = _int(config, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", default=1)
    topk = _int(config, "num_experts_per_tok", "moe_k", default=1)
    ffn = _int(config, "intermediate_size")
    expert_hidden = _int(config, "moe_intermediate_size", default=ffn)
    dense_layers = set(config.get("mlp_only_layers") or [])
    step = _int(config, "decoder_sparse_step", default=1)
    moe = 0 if experts <= 1 else sum(1 for i in range(layers) if i not in dense_layers and (i + 1) % step == 0)
    shared = config.get("shared_expert_intermediate_size") or 0
    qk_norm = {"olmoe": d + kv * head_dim, "qwen3_moe": 2 * head_dim}.get(kind, 0)
    bias = kind in ("qwen2", "qwen2_moe") or bool(config.get("attention_bias"))
    return Shape(name, _int(config, "vocab_size"), d, layers, moe, heads, kv, head_dim, experts if moe else 0, topk,
                 expert_hidden, ffn, shared, d if shared and kind == "qwen2_moe" else 0, experts * d if moe else 0,
                 bias, qk_norm, bool(config.get("tie_word_embeddings", False)),
                 _int(config, "max_position_embeddings", default=2048))


def published_path(name: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("tinymoe.presets"))) / "published" / f"{name}.json"


def load_shape(source: str) -> tuple[Shape, dict | None]:
    """(shape, quantization record or None) of a published config name, a config.json (or a
    folder holding one), or a tinymoe checkpoint or run folder (its manifest)."""
    from tinymoe.config import from_dict

    path = Path(source)
    if source in PUBLISHED and not path.exists():
        path = published_path(source)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "manifest.json").is_file():
        path = path / "config.json"
    if path.is_dir():  # a checkpoint, or a run folder naming its latest one (docs/checkpoint-format.md)
        ckpt = path
        if (path / "latest").is_file():
            ckpt = path / "checkpoints" / (path / "latest").read_text().strip()
        try:
            manifest = json.loads((ckpt / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise TinyMoeError(f"{ckpt}: no readable manifest.json ({exc})") from None
        if "finetune" in manifest:
            raise TinyMoeError(f"{ckpt} holds adapters; plan with its base checkpoint")
        cfg = from_dict(ModelConfig, manifest.get("model", {}), "checkpoint model config")
        return shape_from_config(cfg, str(ckpt)), manifest.get("quantization")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise TinyMoeError(f"{source}: no such file, folder or published config "
                           f"(published: {', '.join(PUBLISHED)})") from None
    except (OSError, ValueError) as exc:
        raise TinyMoeError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise TinyMoeError(f"{path}: not a JSON object")
    quant = config.get("quantization") if isinstance(config.get("quantization"), dict) else None
    return shape_from_hf(config, path.stem if path.parent.name == "published" else str(path)), quant


def counts(s: Shape) -> dict:
    """Parameters: total, active per token, routed experts, and kept float when quantized."""
    d = s.d_model
    attn = d * (s.q_dim + 2 * s.kv_dim) + s.q_dim * d + ((s.q_dim + 2 * s.kv_dim) if s.attn_bias else 0)
    per_expert = 3 * d * s.expert_hidden
    dense = s.n_layers - s.moe_layers
    moe = s.router + s.experts * per_expert + 3 * d * s.shared_hidden + s.shared_gate
    total = s.vocab * d * (1 if s.tie else 2) + d + s.n_layers * (2 * d + attn + s.qk_norm) + s.moe_layers * moe \
        + dense * 3 * d * s.dense_hidden
    active = total - s.moe_layers * max(s.experts - s.topk, 0) * per_expert
    biases = (s.q_dim + 2 * s.kv_dim) if s.attn_bias else 0
    float_part = (2 * s.n_layers + 1) * d + s.n_layers * (biases + s.qk_norm) + s.moe_layers * (s.router + s.shared_gate)
    return {"total": total, "active": active, "expert": s.moe_layers * s.experts * per_expert, "float": float_part}


def adapter_params(s: Shape, rank: int, targets, router_full: bool = False) -> int:
    """Weights of the adapters `tinymoe finetune` attaches (tinymoe.nn.lora)."""
    for t in targets:
        if t not in LORA_TARGETS:
            raise TinyMoeError(f"unknown --lora-targets entry '{t}' (choose from {', '.join(LORA_TARGETS)})")
    d, n = s.d_model, 0
    if "attention" in targets:
        n += s.n_layers * rank * ((d + s.q_dim) * 2 + (d + s.kv_dim) * 2)
    if "experts" in targets:
        n += s.moe_layers * s.experts * 3 * rank * (d + s.expert_hidden)
    if "shared" in targets:
        n += s.moe_layers * 3 * rank * (d + s.shared_hidden)
    if "ffn" in targets:
        n += (s.n_layers - s.moe_layers) * 3 * rank * (d + s.dense_hidden)
    if "router" in targets:
        n += s.moe_layers * rank * (d + s.experts)
    if router_full:
        n += s.moe_layers * s.router
    return n


def _activation_bytes(s: Shape, batch: int, context: int, act_bytes: int) -> int:
    """What backprop keeps per micro-batch (tinymoe.planner's count, with the real head width)."""
    d, h = s.d_model, s.expert_hidden
    per_token = s.n_layers * (5 * d + 2 * s.q_dim + 3 * s.kv_dim)  # norm, q, k, v, rotated q/k, output
    per_token += s.moe_layers * (3 * d + 3 * s.experts + s.topk * (2 * d + 4 * h) + 4 * s.shared_hidden)
    per_token += (s.n_layers - s.moe_layers) * (3 * d + 4 * s.dense_hidden)
    per_token += 3 * s.vocab
    scores = s.n_layers * batch * s.n_heads * context * context * 2
    return (batch * context * per_token + scores) * act_bytes


def _verdict(parts: dict, memory_gib: float, usable_fraction: float) -> dict:
    total = sum(parts.values())
    budget = int(memory_gib * GIB * usable_fraction)
    return {"bytes": parts, "total_bytes": total, "budget_bytes": budget, "fits": total <= budget}


def plan_finetune(s: Shape, *, rank: int = 8, targets=("attention", "experts", "router"), router_full: bool = False,
                  quant_bits: int = 0, group_size: int = 64, batch: int = 4, context: int | None = None,
                  param_dtype: str = "float32", memory_gib: float = DEFAULT_MEMORY_GIB,
                  usable_fraction: float = DEFAULT_USABLE_FRACTION) -> dict:
    if param_dtype not in DTYPE_BYTES:
        raise TinyMoeError(f"unknown param dtype '{param_dtype}' (choose from {', '.join(DTYPE_BYTES)})")
    if rank < 1 or batch < 1:
        raise TinyMoeError("the rank and the batch must be positive")
    context = context or min(s.context, FINETUNE_CONTEXT)
    c, p = counts(s), DTYPE_BYTES[param_dtype]
    adapters = adapter_params(s, rank, targets, router_full)
    parts = {"base_weights": int(weight_bytes(c["total"], c["float"], p, quant_bits, group_size)),
             "adapters": adapters * 4, "adapter_grads": adapters * 4, "optimizer": adapters * 8,
             "update_transient": adapters * 16,
             "activations": int(ACTIVATION_CALIBRATION * _activation_bytes(s, batch, context, p))}
    if quant_bits:
        parts["dequant_transient"] = max(s.vocab * s.d_model, s.q_dim * s.d_model, s.expert_hidden * s.d_model) * p
    return {"mode": "finetune", "model": s.name, "params": {**c, "adapters": adapters},
            "assumptions": {"method": "qlora" if quant_bits else "lora", "rank": rank, "targets": list(targets),
                            "router_full": router_full, "quant_bits": quant_bits, "group_size": group_size,
                            "batch": batch, "context": context, "param_dtype": param_dtype,
                            "memory_gib": memory_gib, "usable_fraction": usable_fraction},
            **_verdict(parts, memory_gib, usable_fraction)}


def plan_sample(s: Shape, *, quant_bits: int = 0, group_size: int = 64, batch: int = 1, context: int | None = None,
                param_dtype: str = "float32", memory_gib: float = DEFAULT_MEMORY_GIB,
                usable_fraction: float = DEFAULT_USABLE_FRACTION) -> dict:
    context = context or s.context
    c, p = counts(s), DTYPE_BYTES[param_dtype]
    parts = {"weights": int(weight_bytes(c["total"], c["float"], p, quant_bits, group_size)),
             "kv_cache": 2 * s.n_layers * batch * context * s.kv_dim * p}
    return {"mode": "sample", "model": s.name, "params": c,
            "assumptions": {"quant_bits": quant_bits, "group_size": group_size, "batch": batch, "context": context,
                            "param_dtype": param_dtype, "memory_gib": memory_gib, "usable_fraction": usable_fraction},
            **_verdict(parts, memory_gib, usable_fraction)}


def _size(n: int) -> str:
    return f"{n / GIB:9.2f} GiB"


def format_result(r: dict) -> str:
    a, p = r["assumptions"], r["params"]
    weights = f"{a['quant_bits']}-bit, group size {a['group_size']}" if a["quant_bits"] else a["param_dtype"]
    head = f"{r['model']} ({r['mode']}: batch {a['batch']}, context {a['context']}, weights {weights}"
    if r["mode"] == "finetune":
        head += f", {a['method']} rank {a['rank']} on {', '.join(a['targets'])}" + (
            ", router trained fully" if a["router_full"] else "")
    lines = [head + ")", f"  parameters        {p['total']:>15,} total   {p['active']:>15,} active per token"]
    if "adapters" in p:
        lines.append(f"  adapters          {p['adapters']:>15,} trainable ({100 * p['adapters'] / p['total']:.2f}%)")
    size = _size if r["total_bytes"] >= GIB else lambda n: f"{n / 2**20:9.2f} MiB"  # a small model in MiB
    lines += [f"  {k:<17} {size(v)}" for k, v in r["bytes"].items()]
    lines.append(f"  {'total':<17} {size(r['total_bytes'])}")
    lines.append(f"  {'fits' if r['fits'] else 'does NOT fit'} in {r['budget_bytes'] / GIB:.2f} GiB usable "
                 f"({a['usable_fraction']:.0%} of {a['memory_gib']:.4g} GiB)")
    return "\n".join(lines)


def published_verdicts(rank: int = 8, context: int = 2048, memory_gib: float = DEFAULT_MEMORY_GIB,
                       usable_fraction: float = DEFAULT_USABLE_FRACTION) -> list[dict]:
    """Each shipped published config: sampling (float32, 4-bit) and fine-tuning (LoRA on a float32
    base, QLoRA on a 4-bit base) at batch 1 and `context`, against the same budget."""
    rows = []
    for name in PUBLISHED:
        shape, _ = load_shape(name)
        kw = {"memory_gib": memory_gib, "usable_fraction": usable_fraction}
        plans = {"sample_float32": plan_sample(shape, context=context, **kw),
                 "sample_4bit": plan_sample(shape, quant_bits=4, context=context, **kw),
                 "lora_float32": plan_finetune(shape, rank=rank, batch=1, context=context, **kw),
                 "qlora_4bit": plan_finetune(shape, rank=rank, quant_bits=4, batch=1, context=context, **kw)}
        c = counts(shape)
        rows.append({"model": name, "shape": asdict(shape), "params_total": c["total"], "params_active": c["active"],
                     **{k: {"gib": round(v["total_bytes"] / GIB, 2), "fits": v["fits"]} for k, v in plans.items()}})
    return rows
