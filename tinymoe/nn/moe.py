"""The Mixture-of-Experts FFN: a router, stacked SwiGLU experts, optional shared experts, capacity.

Shapes: T tokens (batch and sequence flattened), D model width, E experts, K slots per token,
H expert hidden width. The routers (tinymoe.nn.routers) run in float32 whatever the model dtype, and
their top-k indices are wrapped in `stop_gradient`: only gate values carry gradient back.

A layer returns (y, stats) with the router's losses summed by the model (`LAYER_LOSSES`, each with
its own weight in ModelConfig, added to the LM loss by the trainer) and per-layer statistics
(`LAYER_STATS`) the trainer logs:
  load       share of the kept slots that went to each expert (E,), sums to 1.
  drop_rate  share of the routed slots dropped by expert capacity (expert choice: share of tokens
             no expert took); 0 when dropless.
  mean_k     experts a token actually used, on average (K when dropless and k is fixed).

A call with `stats=False` in eval mode (sampling; no routing record asked for, no eval-mode
capacity) returns (y, None): the router runs lean (tinymoe.nn.routers) and the layer builds no
losses or statistics, which on a decoded token cost more to build than the experts.

Shared experts (DeepSeekMoE) are one dense SwiGLU of hidden width shared_experts * H beside the
routed experts, added to every token's output ungated; `shared_experts` separate SwiGLUs of width
H would compute exactly the same function, so one wide one is kept (one matmul per projection).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from tinymoe.nn.capacity import apply_capacity, expert_capacity, expert_choice_experts
from tinymoe.nn.dispatch import run_experts
from tinymoe.nn.routers import RoutingResult, TopKRouter, make_router, router_losses  # noqa: F401 (public names)
from tinymoe.router_registry import ROUTER_OPTIONS

LAYER_LOSSES = ("balance_loss", "z_loss", "entropy_loss")  # fields of RoutingResult
LAYER_STATS = ("load", "drop_rate", "mean_k")
# A call with at most this many tokens (one decoding step, a small batch of them) runs the
# layer's decode dispatch: the backend that is fastest at a few rows (tinymoe.nn.dispatch).
DECODE_TOKENS = 8


class SwiGLUExperts(nn.Module):
    """E SwiGLU FFNs stacked into three arrays, so one expert is one slice of each."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, out_scale: float = 1.0):
        super().__init__()
        s_in, s_hid = 1.0 / math.sqrt(d_model), out_scale / math.sqrt(d_hidden)
        self.w_gate = mx.random.uniform(-s_in, s_in, (num_experts, d_hidden, d_model))
        self.w_up = mx.random.uniform(-s_in, s_in, (num_experts, d_hidden, d_model))
        self.w_down = mx.random.uniform(-s_hid, s_hid, (num_experts, d_model, d_hidden))

    def params_per_expert(self) -> int:
        return sum(w[0].size for w in (self.w_gate, self.w_up, self.w_down))

    @property
    def num_experts(self) -> int:
        return self.w_gate.shape[0]

    def weights(self) -> tuple:
        """What the dispatch backends take: arrays here, `QWeight`s for quantized experts."""
        return self.w_gate, self.w_up, self.w_down

    def float_weights(self) -> tuple:
        return self.w_gate, self.w_up, self.w_down


class SwiGLU(nn.Module):
    """A dense SwiGLU FFN: the FFN of dense layers (`blocks.N.ffn`) and the always-active shared
    experts of MoE layers (`blocks.N.moe.shared`, stored in model.safetensors)."""

    def __init__(self, d_model: int, d_hidden: int, out_scale: float = 1.0):
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_hidden, bias=False)
        self.w_up = nn.Linear(d_model, d_hidden, bias=False)
        self.w_down = nn.Linear(d_hidden, d_model, bias=False)
        self.w_down.weight = self.w_down.weight * out_scale

    def __call__(self, x):
        return self.w_down(nn.silu(self.w_gate(x)) * self.w_up(x))


class MoELayer(nn.Module):
    def __init__(self, d_model, num_experts, top_k, d_hidden, norm=True, out_scale=1.0, *, router: str = "topk",
                 shared_experts: int = 0, capacity_factor: float = 0.0, eval_capacity_factor: float = 0.0,
                 **router_options):
        super().__init__()
        self.router = make_router(router, d_model, num_experts, top_k, norm, capacity_factor=capacity_factor,
                                  eval_capacity_factor=eval_capacity_factor, **router_options)
        self.experts = SwiGLUExperts(num_experts, d_model, d_hidden, out_scale)
        if shared_experts:
            self.shared = SwiGLU(d_model, shared_experts * d_hidden, out_scale)
        self.num_shared = shared_experts
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.dispatch = "dense"  # set by Model.set_dispatch; not a parameter
        self.decode_dispatch = "dense"  # for calls of at most DECODE_TOKENS tokens (decoding)
        # Domain routing (tinymoe.nn.domain), numpy so they are settings, not parameters:
        self.domain_hard = False  # per-token domains mask the routing (else they only feed domain_loss)
        self.domain_allowed = None  # (E,) bool: every token routes within this set (sampling --domain)
        self.expert_slots = None  # (E,) int32: expert id -> row of a partial expert stack (selective loading)

    @classmethod
    def from_config(cls, cfg, out_scale: float = 1.0) -> "MoELayer":
        # Every router option (the factory hands each router the ones its registry spec lists).
        options = {name: getattr(cfg, name) for name in ROUTER_OPTIONS}
        return cls(cfg.d_model, cfg.moe_experts, cfg.moe_topk, cfg.expert_d_ff, cfg.router_norm, out_scale,
                   router=cfg.router, shared_experts=cfg.shared_experts, **options)

    def __call__(self, x: mx.array, routing: list | None = None, key=None, stats: bool = True, domain=None):
        """domain: (allowed (T, E) bool, mapped (T,) float) per-token domain routing: the allowed
        experts mask the routing when `domain_hard`, and feed `domain_loss` either way."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        T = x_TD.shape[0]
        if not (stats or routing is not None or self.training or self.eval_capacity_factor or domain is not None):
            return self.infer(x_TD).reshape(shape), None
        mask = self.route_mask(domain)
        if mask is not None:
            route: RoutingResult = self.router(x_TD, key, allowed_TE=mask)
        else:  # without a key, the plain one-argument call (wrappers such as tinymoe.infer.offload's take x only)
            route = self.router(x_TD) if key is None else self.router(x_TD, key)
        indices, gates, probs = route.indices, route.gates, route.probs
        kept = route.selected  # (T, K) or None: every slot used
        e, E = self.experts, self.experts.num_experts
        if route.tokens_EC is not None:  # expert choice: run the per-expert view directly
            y = expert_choice_experts(x_TD, route.tokens_EC, route.gates_EC, *e.float_weights())
            drop_rate = 1.0 - mx.mean(mx.any(kept, axis=-1).astype(mx.float32))  # tokens no expert took
        else:
            factor = self.capacity_factor if self.training else self.eval_capacity_factor
            capacity = expert_capacity(factor, T, indices.shape[1], E)
            if capacity:
                routed = kept
                kept = apply_capacity(indices, routed, E, capacity)
                n_routed = T * indices.shape[1] if routed is None else mx.sum(routed)
                drop_rate = 1.0 - mx.sum(kept).astype(mx.float32) / mx.maximum(n_routed, 1)
            else:
                drop_rate = mx.array(0.0)
            if kept is not None:
                gates = mx.where(kept, gates, 0.0)  # a dropped slot adds nothing
            backend = self.decode_dispatch if T <= DECODE_TOKENS else self.dispatch
            run = getattr(e, "run_experts", run_experts)  # adapted experts (tinymoe.nn.lora) add their own
            y = run(backend, x_TD, self.stack_rows(indices), gates.astype(x.dtype), *e.weights())
        if self.num_shared:
            y = y + self.shared(x_TD)
        stats = {name: getattr(route, name) for name in LAYER_LOSSES}
        if domain is not None:
            stats["domain_loss"] = domain_loss(probs, *domain)
        stats["drop_rate"] = mx.stop_gradient(drop_rate.astype(mx.float32))
        if kept is None:
            stats["load"], stats["mean_k"] = route.load, mx.array(float(indices.shape[1]))
        else:
            counts = mx.sum((indices[..., None] == mx.arange(E)) & kept[..., None], axis=(0, 1))
            stats["load"] = mx.stop_gradient(counts.astype(mx.float32) / mx.maximum(mx.sum(counts), 1))  # (E,)
            stats["mean_k"] = mx.stop_gradient(mx.sum(kept).astype(mx.float32) / T)
        if routing is not None:  # analysis only (inspect, route, sample --show-routing)
            record = {"indices": indices, "gates": gates, "probs": probs}
            if kept is not None:
                record["kept"] = kept
            routing.append(record)
        return y.reshape(shape), stats

    def infer(self, x_TD: mx.array) -> mx.array:
        """The layer's output alone, routed lean: the same experts and gates as __call__ in eval
        mode (capacity aside, which `infer` leaves to __call__: it needs the slots in order). # (T, D)"""
        mask = self.route_mask(None)
        if mask is not None:
            route: RoutingResult = self.router(x_TD, None, lean=True, allowed_TE=mask)
        else:
            route = self.router(x_TD, lean=True)
        e = self.experts
        if route.tokens_EC is not None:
            y = expert_choice_experts(x_TD, route.tokens_EC, route.gates_EC, *e.float_weights())
        else:  # an unused dynamic slot already has gate 0
            backend = self.decode_dispatch if x_TD.shape[0] <= DECODE_TOKENS else self.dispatch
            run = getattr(e, "run_experts", run_experts)
            y = run(backend, x_TD, self.stack_rows(route.indices), route.gates.astype(x_TD.dtype), *e.weights())
        return y + self.shared(x_TD) if self.num_shared else y

    def route_mask(self, domain) -> mx.array | None:
        """The experts routing may use: a fixed domain's set, or the tokens' own sets in hard mode."""
        if self.domain_allowed is not None:
            return mx.array(self.domain_allowed)  # (E,)
        if domain is not None and self.domain_hard:
            return domain[0]  # (T, E)
        return None

    def stack_rows(self, indices_TK: mx.array) -> mx.array:
        """Expert ids as rows of the expert stack: the same unless only some experts are loaded."""
        if self.expert_slots is None:
            return indices_TK
        return mx.array(self.expert_slots)[indices_TK]


def domain_loss(probs_TE: mx.array, allowed_TE: mx.array, mapped_T: mx.array) -> mx.array:
    """Router supervision: mean over tokens with a mapped domain of -ln(routing probability mass on
    the domain's experts). 0 when all of it is there (always so under a hard mask). # ()"""
    in_set_T = mx.sum(mx.where(allowed_TE, probs_TE, 0.0), axis=-1)
    nll_T = -mx.log(mx.maximum(in_set_T, 1e-9))
    return mx.sum(nll_T * mapped_T) / mx.maximum(mx.sum(mapped_T), 1.0)


def needs_key(model) -> bool:
    """Whether any router of `model` draws random numbers while training."""
    return any(getattr(layer.router, "random", False) for layer in moe_layers_of(model))


def has_router_state(model) -> bool:
    return any(hasattr(layer.router, "after_step") for layer in moe_layers_of(model))


def update_router_state(model, load_LE: mx.array) -> None:
    """After an optimizer step: routers with non-trained state (the sigmoid-bias router's balancing
    bias) update it from the step's observed load, one row of `load_LE` (L MoE layers, E) each."""
    for layer, load in zip(moe_layers_of(model), load_LE):
        if hasattr(layer.router, "after_step"):
            layer.router.after_step(load)


def moe_layers_of(model) -> list:
    return [block.moe for block in model.blocks if block.is_moe]
