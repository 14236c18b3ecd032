"""Router names, which options each router reads, and their checks (no MLX import here).

`config.validate` calls `check_router`, so a preset, a flag or a `--set` that names an unknown
router, gives a router an option it does not read (e.g. `--bias-rate` with `--router topk`), or
sets an impossible value fails with one line before any model is built. The routers themselves
live in tinymoe.nn.routers; docs/routers.md explains each one.
"""

from __future__ import annotations

import dataclasses

from tinymoe.errors import TinyMoeError

ROUTERS = ("topk", "switch", "noisy", "jitter", "sigmoid-bias", "expert-choice", "smart", "dynamic")
ROUTER_ORDERS = ("softmax-topk", "topk-softmax")
# Every token's experts depend on that token alone (in eval mode, without an eval capacity), so
# sampling token by token gives what a full forward gives. Expert choice ranks tokens against each
# other, so a token's experts depend on the tokens after it.
CAUSAL_ROUTERS = tuple(r for r in ROUTERS if r != "expert-choice")
SMART_ENTROPY_WEIGHT = 0.01  # entropy_weight = -1 (auto) means this for `smart`, 0 otherwise

# option -> the routers that read it. Any other router with the option off its default is an error:
# a flag that silently does nothing is worse than a refusal.
OPTION_USERS = {
    "router_order": ("topk", "jitter", "smart"),
    "noise_scale": ("noisy",),
    "jitter_eps": ("jitter", "switch", "smart"),
    "bias_rate": ("sigmoid-bias",),
    "router_groups": ("topk", "sigmoid-bias"),
    "router_group_topk": ("topk", "sigmoid-bias"),
    "k_min": ("dynamic",),
    "k_max": ("dynamic",),
    "dynamic_threshold": ("dynamic",),
}


def effective_entropy_weight(cfg) -> float:
    """The weight of the entropy bonus the trainer uses (resolves the -1 = auto default)."""
    weight = getattr(cfg, "entropy_weight", -1.0)
    if weight >= 0:
        return float(weight)
    return SMART_ENTROPY_WEIGHT if getattr(cfg, "router", "topk") == "smart" else 0.0


def dynamic_k_max(cfg) -> int:
    """Slots per token of the dynamic router: k_max, or moe_topk when k_max is 0."""
    return cfg.k_max or cfg.moe_topk


def is_causal(cfg) -> bool:
    return getattr(cfg, "router", "topk") in CAUSAL_ROUTERS


def require_causal(cfg) -> None:
    """Refuse token-by-token generation with a router whose choices depend on later tokens."""
    if not is_causal(cfg):
        raise TinyMoeError(f"router '{cfg.router}' is not causal (each expert picks tokens from the whole "
                           f"batch, later tokens included), so it cannot generate text token by token; "
                           f"use eval or inspect, or train with a token-choice router")


def check_router(cfg) -> None:
    """Raise TinyMoeError for an unknown router or an option it cannot use."""
    router = cfg.router
    if router not in ROUTERS:
        raise TinyMoeError(f"unknown router '{router}' (choose from: {', '.join(ROUTERS)})")
    if cfg.router_order not in ROUTER_ORDERS:
        raise TinyMoeError(f"unknown router_order '{cfg.router_order}' (choose from: {', '.join(ROUTER_ORDERS)})")
    if not cfg.moe_experts > 1:
        if cfg.shared_experts:
            raise TinyMoeError("shared_experts needs an MoE model (moe_experts > 1)")
        return
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for option, users in OPTION_USERS.items():
        if getattr(cfg, option) != defaults[option] and router not in users:
            raise TinyMoeError(f"{option} applies to router {' / '.join(users)}, not '{router}'")
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
    if router == "switch" and K != 1:
        raise TinyMoeError(f"router 'switch' routes each token to one expert; set moe_topk 1 (got {K})")
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
