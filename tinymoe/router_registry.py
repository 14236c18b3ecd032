"""The router registry: one `RouterSpec` per router, and the checks and counts derived from it.

Why one table: the router names, the options each router reads, how many experts a token pays
for and the parameters a router adds used to be written down in five places (a validator, the
factory's if-chain, the MoE layer, the planner and the parameter count), with three different
active-parameter rules. Now the factory (tinymoe.nn.routers.make_router), the config validator
(`check_router`, called by tinymoe.config.validate), the planner (tinymoe.planner) and every
parameter count (`active_params`) read this table. It imports no MLX: `tinymoe --help`, config
checks and planning never load it. The routers themselves live in tinymoe.nn.routers;
docs/routers.md explains each one; tests/test_router_registry.py checks the table against them.

Shapes in `ExtraParam.shape` are symbols: E experts, D model width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from tinymoe.errors import TinyMoeError

ROUTER_ORDERS = ("softmax-topk", "topk-softmax")
# ModelConfig fields a router constructor may read, in the order the validator checks them.
ROUTER_OPTIONS = ("router_order", "noise_scale", "jitter_eps", "bias_rate", "router_groups", "router_group_topk",
                  "k_min", "k_max", "dynamic_threshold", "capacity_factor", "eval_capacity_factor")
# Options every MoE layer reads (token-choice capacity drops slots in tinymoe.nn.moe), so setting
# one is never an error, although only expert choice hands them to its router.
LAYER_OPTIONS = ("capacity_factor", "eval_capacity_factor")


@dataclass(frozen=True)
class ExtraParam:
    """A parameter a router holds besides its scoring weight (E, D)."""

    name: str  # attribute of the router module: checkpoint name blocks.N.moe.router.<name>
    shape: tuple  # symbols "E", "D" or ints
    trainable: bool = True  # False: stored, never updated by the optimizer (so no optimizer state)

    def dims(self, num_experts: int, d_model: int) -> tuple[int, ...]:
        sizes = {"E": num_experts, "D": d_model}
        return tuple(sizes.get(s, s) for s in self.shape)


def dynamic_k_max(cfg) -> int:
    """Slots per token of the dynamic router: k_max, or moe_topk when k_max is 0."""
    return cfg.k_max or cfg.moe_topk


def _k(cfg) -> float:
    return cfg.moe_topk


def _one(cfg) -> float:
    return 1


def _capacity(cfg) -> float:
    # Each expert takes C = factor * T * K / E tokens (factor 1 when 0), so E * C expert-token pairs
    # are computed for T tokens: factor * K per token on average, at most E (C <= T).
    return min(cfg.moe_experts, (cfg.capacity_factor or 1.0) * cfg.moe_topk)


@dataclass(frozen=True)
class RouterSpec:
    """What the rest of tinymoe needs to know about one router."""

    name: str
    cls: str  # its class in tinymoe.nn.routers, built as cls(d_model, E, K, norm, **options)
    options: tuple[str, ...]  # ModelConfig fields (from ROUTER_OPTIONS) its constructor reads
    # Experts whose expert MLPs one token's forward computes: K (or k_max) slots for token-choice
    # routers (unused and capacity-dropped slots are gated to 0, not skipped); on average for expert
    # choice. This is the one rule behind every "active parameters" figure.
    active_k: Callable = _k
    extra: tuple[ExtraParam, ...] = ()
    causal: bool = True  # a token's experts depend on that token alone (in eval mode)
    fixed_k: int = 0  # a router that routes every token to exactly this many experts (0: moe_topk)
    entropy_weight: float = 0.0  # what entropy_weight -1 (auto) means for this router


SPECS = {spec.name: spec for spec in (
    RouterSpec("topk", "TopKRouter", ("router_order", "router_groups", "router_group_topk")),
    RouterSpec("switch", "SwitchRouter", ("jitter_eps",), active_k=_one, fixed_k=1),
    RouterSpec("noisy", "NoisyRouter", ("noise_scale",), extra=(ExtraParam("w_noise", ("E", "D")),)),
    RouterSpec("jitter", "JitterRouter", ("router_order", "jitter_eps")),
    RouterSpec("sigmoid-bias", "SigmoidBiasRouter", ("bias_rate", "router_groups", "router_group_topk"),
               extra=(ExtraParam("selection_bias", ("E",), trainable=False),)),
    # Not causal: an expert ranks every token of the batch, later tokens included.
    RouterSpec("expert-choice", "ExpertChoiceRouter", ("capacity_factor", "eval_capacity_factor"),
               active_k=_capacity, causal=False),
    RouterSpec("smart", "SmartRouter", ("router_order", "jitter_eps"), extra=(ExtraParam("log_temperature", (1,)),),
               entropy_weight=0.01),
    RouterSpec("dynamic", "DynamicRouter", ("k_min", "k_max", "dynamic_threshold"), active_k=dynamic_k_max),
)}
ROUTERS = tuple(SPECS)
CAUSAL_ROUTERS = tuple(name for name, spec in SPECS.items() if spec.causal)


def spec_of(name: str) -> RouterSpec:
    if name not in SPECS:
        raise TinyMoeError(f"unknown router '{name}' (choose from: {', '.join(ROUTERS)})")
    return SPECS[name]


def option_users(option: str) -> tuple[str, ...]:
    """The routers whose constructor reads `option`."""
    return tuple(name for name, spec in SPECS.items() if option in spec.options)


# --- counts (the planner, nn.model.count_params and interop.import_hf.param_counts use these) ---

def active_experts(cfg) -> float:
    """Experts one token's forward computes in one MoE layer (RouterSpec.active_k)."""
    return spec_of(getattr(cfg, "router", "topk")).active_k(cfg)


def active_params(cfg, total: int, per_expert: int) -> int:
    """Parameters one token's forward uses: `total` less, in each MoE layer, the experts it does not
    compute (E - active_experts). Embeddings, attention, routers and shared experts always count."""
    moe_layers = sum(cfg.layer_is_moe(i) for i in range(cfg.n_layers))
    return total - round(moe_layers * (cfg.moe_experts - active_experts(cfg)) * per_expert)


def router_params(cfg) -> int:
    """Parameters of one MoE layer's router: its weight (E, D) plus the spec's extras."""
    E, D = cfg.moe_experts, cfg.d_model
    extra = 0
    for p in spec_of(getattr(cfg, "router", "topk")).extra:
        n = 1
        for size in p.dims(E, D):
            n *= size
        extra += n
    return E * D + extra


def router_factored_state(cfg) -> int:
    """Adafactor's statistics for one router: rows + cols per trainable matrix, every element of a
    trainable vector (tinymoe.optim.adafactor); frozen extras keep no state."""
    E, D = cfg.moe_experts, cfg.d_model
    n = E + D  # the weight (E, D)
    for p in spec_of(getattr(cfg, "router", "topk")).extra:
        if p.trainable:
            dims = p.dims(E, D)
            n += sum(dims) if len(dims) == 2 else dims[0]
    return n


# --- behaviour the trainer and the samplers ask about ---

def effective_entropy_weight(cfg) -> float:
    """The weight of the entropy bonus the trainer uses (resolves the -1 = auto default)."""
    weight = getattr(cfg, "entropy_weight", -1.0)
    if weight >= 0:
        return float(weight)
    return spec_of(getattr(cfg, "router", "topk")).entropy_weight


def is_causal(cfg) -> bool:
    return getattr(cfg, "router", "topk") in CAUSAL_ROUTERS


def require_causal(cfg) -> None:
    """Refuse token-by-token generation with a router whose choices depend on later tokens."""
    if not is_causal(cfg):
        raise TinyMoeError(f"router '{cfg.router}' is not causal (each expert picks tokens from the whole "
                           f"batch, later tokens included), so it cannot generate text token by token; "
                           f"use eval or inspect, or train with a token-choice router")


# --- the validator ---

def check_router(cfg) -> None:
    """Raise TinyMoeError for an unknown router, an option it cannot use (a flag that silently does
    nothing is worse than a refusal) or an impossible value."""
    router = cfg.router
    spec = spec_of(router)
    if cfg.router_order not in ROUTER_ORDERS:
        raise TinyMoeError(f"unknown router_order '{cfg.router_order}' (choose from: {', '.join(ROUTER_ORDERS)})")
    if not cfg.moe_experts > 1:
        if cfg.shared_experts:
            raise TinyMoeError("shared_experts needs an MoE model (moe_experts > 1)")
        return
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for option in ROUTER_OPTIONS:
        if option not in LAYER_OPTIONS and getattr(cfg, option) != defaults[option] and option not in spec.options:
            raise TinyMoeError(f"{option} applies to router {' / '.join(option_users(option))}, not '{router}'")
    E, K = cfg.moe_experts, cfg.moe_topk
    for name in ("noise_scale", "bias_rate", "capacity_factor", "eval_capacity_factor"):
        if not getattr(cfg, name) >= 0:
            raise TinyMoeError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.jitter_eps < 1:
        raise TinyMoeError(f"jitter_eps must be in [0, 1), got {cfg.jitter_eps}")
    if not (cfg.entropy_weight >= 0 or cfg.entropy_weight == -1):
        raise TinyMoeError(f"entropy_weight must be >= 0 (or -1 for the router's default), got {cfg.entropy_weight}")
    if cfg.shared_experts < 0:
        raise TinyMoeError(f"shared_experts must be >= 0, got {cfg.shared_experts}")
    if spec.fixed_k and K != spec.fixed_k:
        experts = "one expert" if spec.fixed_k == 1 else f"{spec.fixed_k} experts"
        raise TinyMoeError(f"router '{router}' routes each token to {experts}; set moe_topk {spec.fixed_k} (got {K})")
    if cfg.router_order == "topk-softmax" and not cfg.router_norm:
        raise TinyMoeError("router_order topk-softmax always normalises the gates; it cannot be used "
                           "with router_norm false")
    G, M = cfg.router_groups, cfg.router_group_topk
    if G < 1 or E % G:
        raise TinyMoeError(f"router_groups must be >= 1 and divide moe_experts {E}, got {G}")
    if not 1 <= M <= G:
        raise TinyMoeError(f"router_group_topk must be in [1, router_groups {G}], got {M}")
    if K > M * (E // G):
        raise TinyMoeError(f"moe_topk {K} exceeds the {M * (E // G)} experts in router_group_topk {M} "
                           f"groups of {E // G}")
    if router == "dynamic":
        k_max = dynamic_k_max(cfg)
        if not 1 <= cfg.k_min <= k_max <= E:
            raise TinyMoeError(f"dynamic routing needs 1 <= k_min <= k_max <= moe_experts, got "
                               f"k_min {cfg.k_min}, k_max {k_max}, moe_experts {E}")
        if not 0 < cfg.dynamic_threshold <= 1:
            raise TinyMoeError(f"dynamic_threshold must be in (0, 1], got {cfg.dynamic_threshold}")
