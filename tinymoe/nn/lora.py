"""Low-rank adapters (LoRA) on a tinymoe Model: attach, freeze the base, merge back.

An adapted weight W (out, in) computes W x + s B A x with A (r, in), B (out, r) and the scale
s = alpha / r; B starts at zero, so a freshly adapted model computes exactly what its base does.
Targets (tinymoe.names.LORA_TARGETS):
  attention  wq, wk, wv, wo of every block
  experts    the routed experts: one adapter per expert and projection, stacked like the experts
             (`w_up_lora_a` (E, r, D), `w_up_lora_b` (E, H, r)), computed by tinymoe.nn.lora_experts
             over the same routing, so a token pays only for its own experts' adapters
  shared     the shared experts' three projections
  ffn        the dense FFN layers' three projections
  router     the router's (E, D) scoring weight (float32, as the router computes)
or the router trained fully (`router_mode` "full": it is small). The base may be float or
quantized (tinymoe.nn.quantized: QLoRA); it stays frozen either way, and only the adapters (and a
fully trained router) are trainable parameters.

Adapting a module changes its class in place to a subclass that adds the low-rank term, so the
base weights keep their checkpoint names (`blocks.0.attn.wq.weight`) and the adapters sit beside
them (`blocks.0.attn.wq.lora_a`). The model records what was attached (`finetune_record`), which a
checkpoint stores; `saved_names` are the weights an adapter checkpoint holds.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from tinymoe.errors import TinyMoeError
from tinymoe.names import LORA_TARGETS
from tinymoe.nn.quantized import PROJECTIONS

ROUTER_MODES = ("lora", "full", "frozen")
A, B = "lora_a", "lora_b"


def _init_a(shape: tuple, fan_in: int) -> mx.array:
    """A's initial values: uniform in +-1/sqrt(fan_in), so A x has the scale of x (B is 0)."""
    bound = 1.0 / math.sqrt(fan_in)
    return mx.random.uniform(-bound, bound, shape)


class _LinearAdapter:
    """Mixed into nn.Linear / QLinear / nn.QuantizedLinear: y = base(x) + s (x A^T) B^T."""

    def __call__(self, x):
        y = super().__call__(x)
        low = (x @ self[A].astype(x.dtype).T) @ self[B].astype(x.dtype).T
        return y + self.lora_scale * low

    def merged_weight(self, base_weight: mx.array) -> mx.array:
        return base_weight + self.lora_scale * (self[B] @ self[A]).astype(base_weight.dtype)


class _RouterAdapter:
    """Mixed into a router: it scores with W + s B A (an (E, D) matrix, cheap to form per call), so
    every router option (jitter, noise, groups) sees the adapted weight exactly as its own."""

    def logits(self, x_TD, key=None):
        base = self["weight"]
        self["weight"] = self.merged_weight(base)
        try:
            return super().logits(x_TD, key)
        finally:
            self["weight"] = base

    def merged_weight(self, base_weight: mx.array) -> mx.array:
        return base_weight + self.lora_scale * (self[B] @ self[A]).astype(base_weight.dtype)


class _ExpertAdapters:
    """Mixed into SwiGLUExperts / QuantizedSwiGLUExperts: stacked adapters per projection."""

    def adapters(self) -> tuple:
        """((A, B) of w_gate, of w_up, of w_down)."""
        return tuple((self[f"{p}_{A}"], self[f"{p}_{B}"]) for p in PROJECTIONS)

    def float_weights(self) -> tuple:
        """The merged float weights W_e + s B_e A_e (E, out, in): the reference computation,
        and what expert-choice routing and the `dense` backend run."""
        base = super().float_weights()
        return tuple(w + self.lora_scale * (b @ a).astype(w.dtype) for w, (a, b) in zip(base, self.adapters()))

    def run_experts(self, backend, x_TD, indices_TK, gates_TK, w_gate, w_up, w_down):
        from tinymoe.nn.lora_experts import run_adapted_experts

        return run_adapted_experts(backend, x_TD, indices_TK, gates_TK, (w_gate, w_up, w_down), self.adapters(),
                                   self.lora_scale, self.float_weights)


_CLASSES: dict = {}


def _adapt(module, mixin, scale: float) -> None:
    """Turn `module` into its adapted subclass, in place (its parameters keep their names)."""
    key = (mixin, type(module))
    if key not in _CLASSES:
        _CLASSES[key] = type(f"LoRA{type(module).__name__}", (mixin, type(module)), {})
    module.__class__ = _CLASSES[key]
    module.lora_scale = scale


def _linear_shape(module) -> tuple[int, int]:
    """(out, in) of a float or quantized linear layer."""
    if isinstance(module, nn.QuantizedLinear):
        return module.scales.shape[0], module.scales.shape[1] * module.group_size
    return module.weight.shape


def _check_rank(rank: int, name: str, out_dim: int, in_dim: int, hint: str = "") -> None:
    if rank > min(out_dim, in_dim):
        raise TinyMoeError(f"--lora-rank {rank} is larger than the width {min(out_dim, in_dim)} of {name} "
                           f"({out_dim} x {in_dim}); choose a rank of at most {min(out_dim, in_dim)}{hint}")


def _targets_present(model) -> dict[str, list[tuple[str, nn.Module]]]:
    """target -> [(path, module)] of what each target would adapt in this model."""
    found = {t: [] for t in LORA_TARGETS}
    for i, block in enumerate(model.blocks):
        found["attention"] += [(f"blocks.{i}.attn.{n}", getattr(block.attn, n)) for n in ("wq", "wk", "wv", "wo")]
        if block.is_moe:
            found["experts"].append((f"blocks.{i}.moe.experts", block.moe.experts))
            found["router"].append((f"blocks.{i}.moe.router", block.moe.router))
            if block.moe.num_shared:
                found["shared"] += [(f"blocks.{i}.moe.shared.{p}", getattr(block.moe.shared, p)) for p in PROJECTIONS]
        else:
            found["ffn"] += [(f"blocks.{i}.ffn.{p}", getattr(block.ffn, p)) for p in PROJECTIONS]
    return found


def check_lora(rank: int, alpha: float, targets, router_mode: str) -> None:
    """Settings alone (no model): TinyMoeError for an unknown target, a bad rank or alpha."""
    for t in targets:
        if t not in LORA_TARGETS:
            raise TinyMoeError(f"unknown --lora-targets entry '{t}' (choose from {', '.join(LORA_TARGETS)})")
    if not targets and router_mode != "full":
        raise TinyMoeError("--lora-targets names nothing to train")
    if not isinstance(rank, int) or rank < 1:
        raise TinyMoeError(f"--lora-rank must be a positive integer, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise TinyMoeError(f"--lora-alpha must be a positive number, got {alpha!r}")
    if router_mode not in ROUTER_MODES:
        raise TinyMoeError(f"router mode must be one of {', '.join(ROUTER_MODES)}, got {router_mode!r}")
    if router_mode == "full" and "router" in targets:
        raise TinyMoeError("the router is either adapted ('router' in --lora-targets) or trained fully "
                           "(--full-router), not both")


def attach(model, rank: int, alpha: float, targets, router_mode: str = "frozen") -> dict:
    """Add adapters for `targets` to `model` (in place), freeze everything else (but a fully trained
    router), and return the record a checkpoint keeps. TinyMoeError for settings that do not fit
    the model: a target it does not have, a rank larger than an adapted matrix's smaller side."""
    targets = list(dict.fromkeys(targets))
    if "router" in targets:
        router_mode = "lora"
    check_lora(rank, alpha, targets, router_mode)
    present = _targets_present(model)
    for t in targets:
        if not present[t]:
            what = {"experts": "no MoE layers", "router": "no MoE layers", "shared": "no shared experts",
                    "ffn": "no dense FFN layers", "attention": "no attention"}[t]
            raise TinyMoeError(f"--lora-targets '{t}': the model has {what}")
    if router_mode == "full" and not present["router"]:
        raise TinyMoeError("--full-router: the model has no MoE layers")
    trainable_before = {k for k, _ in tree_flatten(model.trainable_parameters())}
    scale = alpha / rank
    for t in targets:
        for path, module in present[t]:
            _attach_one(t, path, module, rank, scale)
    model.freeze()
    for t in targets:
        for _, module in present[t]:
            keys = [f"{p}_{s}" for p in PROJECTIONS for s in (A, B)] if t == "experts" else [A, B]
            module._no_grad.difference_update(keys)  # (nn.QuantizedLinear.unfreeze re-freezes itself)
    if router_mode == "full":
        for path, router in present["router"]:
            router._no_grad.difference_update(k for k in router if f"{path}.{k}" in trainable_before)
    record = {"method": "lora", "rank": rank, "alpha": float(alpha), "targets": targets, "router": router_mode}
    object.__setattr__(model, "finetune", record)
    return record


def _attach_one(target: str, path: str, module, rank: int, scale: float) -> None:
    if target == "experts":
        E, H = module.w_gate.shape[0], module.w_gate.shape[1]
        D = module.w_down.shape[1]
        _check_rank(rank, f"{path} (per expert)", H, D)
        for p, (out_dim, in_dim) in zip(PROJECTIONS, ((H, D), (H, D), (D, H))):
            module[f"{p}_{A}"] = _init_a((E, rank, in_dim), in_dim)
            module[f"{p}_{B}"] = mx.zeros((E, out_dim, rank))
        _adapt(module, _ExpertAdapters, scale)
        return
    if target == "router":
        E, D = module.weight.shape
        _check_rank(rank, f"{path}.weight", E, D, "; or train the router fully (--full-router)")
        module[A] = _init_a((rank, D), D)
        module[B] = mx.zeros((E, rank))
        _adapt(module, _RouterAdapter, scale)
        return
    out_dim, in_dim = _linear_shape(module)
    _check_rank(rank, f"{path}.weight", out_dim, in_dim)
    module[A] = _init_a((rank, in_dim), in_dim)
    module[B] = mx.zeros((out_dim, rank))
    _adapt(module, _LinearAdapter, scale)


def apply_finetune(model, record: dict) -> None:
    """Rebuild a fine-tuned model's structure on a freshly built Model: the base's quantization
    (when the record names one), then the adapters. TinyMoeError when the record does not fit."""
    from tinymoe.nn.quantize import apply_record

    if not isinstance(record, dict):
        raise TinyMoeError("'finetune' is not an object")
    quant = (record.get("base") or {}).get("quantization")
    if quant:
        apply_record(model, quant)
    try:
        attach(model, record["rank"], record["alpha"], list(record["targets"]), record["router"])
    except (KeyError, TypeError) as exc:
        raise TinyMoeError(f"'finetune' record is incomplete ({exc})") from None
    model.__dict__["finetune"] = dict(record)


def finetune_record(model) -> dict | None:
    return model.__dict__.get("finetune")


def saved_names(model) -> set[str]:
    """Weights an adapter checkpoint holds: the trainable ones, and every router weight when the
    router trains (the sigmoid-bias router's balancing bias moves with it)."""
    names = {k for k, _ in tree_flatten(model.trainable_parameters())}
    if any(".moe.router." in n for n in names):
        names |= {k for k, _ in tree_flatten(model.parameters()) if ".moe.router." in k}
    return names


def saved_weights(model) -> dict:
    """name -> array of what a checkpoint of `model` stores: all weights, or a fine-tuned model's
    adapters (and trained router)."""
    weights = dict(tree_flatten(model.parameters()))
    if finetune_record(model) is None:
        return weights
    keep = saved_names(model)
    return {k: v for k, v in weights.items() if k in keep}


def merged_float_weights(model) -> dict:
    """name -> float weight of the fine-tuned model with every adapter merged into its base (a
    quantized base dequantized first), under the names of the plain float Model of the config."""
    from tinymoe.nn.quantize import float_weights

    out = {k: v for k, v in float_weights(model).items() if not k.endswith((A, B))}
    for path, module in model.named_modules():
        if isinstance(module, _ExpertAdapters):
            out.update({f"{path}.{p}": w for p, w in zip(PROJECTIONS, module.float_weights())})
        elif isinstance(module, (_LinearAdapter, _RouterAdapter)):
            out[f"{path}.weight"] = module.merged_weight(out[f"{path}.weight"])
    return out


def fused_model(model, requantize: bool = False):
    """A plain Model (no adapters) computing what the fine-tuned `model` computes: adapters merged
    into float weights; with `requantize`, quantized again as the base was (bits, group size,
    layers kept in float)."""
    from mlx.utils import tree_unflatten

    from tinymoe.nn.model import Model
    from tinymoe.nn.quantize import quantize_model

    record = finetune_record(model) or {}
    fused = Model(model.cfg, model.dispatch)
    fused.update(tree_unflatten(list(merged_float_weights(model).items())))
    quant = (record.get("base") or {}).get("quantization")
    if requantize:
        if not quant:
            raise TinyMoeError("--requantize: the fine-tuned model's base is not quantized")
        quantize_model(fused, quant["bits"], quant["group_size"], tuple(quant.get("keep_float", ())))
    mx.eval(fused.parameters())
    return fused


def adapter_layers(model) -> int:
    """How many modules carry adapters (for reports)."""
    return sum(isinstance(m, (_LinearAdapter, _RouterAdapter, _ExpertAdapters)) for _, m in model.named_modules())



def adapter_report(model) -> str:
    """One line: what is trained and how much of the model that is."""
    record = finetune_record(model) or {}
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    base = sum(v.size for k, v in tree_flatten(float_weights_count(model)))
    quant = (record.get("base") or {}).get("quantization")
    kind = f"{quant['bits']}-bit base (QLoRA)" if quant else "float base"
    router = {"lora": "router adapted", "full": "router trained fully", "frozen": "router frozen"}[record["router"]]
    return (f"lora: rank {record['rank']}, alpha {record['alpha']:g} (scale {record['alpha'] / record['rank']:g}), "
            f"targets {', '.join(record['targets']) or 'none'}, {router}; {kind}; trainable {trainable:,} weights "
            f"({100 * trainable / max(base, 1):.2f}% of the base's {base:,}) in {adapter_layers(model)} layers")


def float_weights_count(model) -> dict:
    """The base's weights as floats (a quantized weight counted as the float it stands for)."""
    from tinymoe.nn.quantize import float_weights

    return {k: v for k, v in float_weights(model).items() if not k.endswith((A, B))}
