"""The largest model of a preset's shape whose training fits a memory budget (`tinymoe plan --fit`).

"Preset-shaped" keeps what is not size: the head width, the query/key-value head ratio, the
FFN and expert widths as multiples of d_model, the experts, top-k, MoE layer pattern, vocabulary,
context and batch. The size grows along one line: width d_model = s x the preset's and depth
n_layers = round(sqrt(s) x the preset's), so depth grows more slowly than width (a 16x wider
`tiny` is 4x deeper), the usual shape of model families. The answer is the widest such model
whose training plan (tinymoe.planner.plan, with the dtype, optimizer and activation
checkpointing given) fits; widths step by one head group of the preset's head width. No MLX.
"""

from __future__ import annotations

import dataclasses
import math

from tinymoe.config import ModelConfig
from tinymoe.planner import GIB, plan

MAX_WIDTH = 65536


def scaled(cfg: ModelConfig, d_model: int) -> ModelConfig:
    """`cfg`'s shape at width d_model (a multiple of its head width x head-group size)."""
    s = d_model / cfg.d_model
    group = cfg.n_heads // cfg.n_kv_heads
    n_heads = d_model // cfg.head_dim
    return dataclasses.replace(
        cfg, d_model=d_model, n_heads=n_heads, n_kv_heads=max(1, n_heads // group),
        n_layers=max(1, round(cfg.n_layers * math.sqrt(s))),
        d_ff=max(1, round(cfg.d_ff * s)), expert_hidden=round(cfg.expert_hidden * s) if cfg.expert_hidden else 0,
        moe_first_dense=min(cfg.moe_first_dense, max(1, round(cfg.n_layers * math.sqrt(s))) - 1))


def largest_that_fits(cfg: ModelConfig, memory_gib: float, **plan_kwargs) -> dict | None:
    """{"config", "plan"} of the widest preset-shaped model whose training fits `memory_gib`
    (at plan_kwargs' usable_fraction), or None when not even the narrowest does. Sizes grow
    with width, so the search walks up until the first that does not fit."""
    step = cfg.head_dim * (cfg.n_heads // cfg.n_kv_heads)
    best = None
    for width in range(step, MAX_WIDTH + 1, step):
        candidate = scaled(cfg, width)
        result = plan(candidate, mode="train", memory_gib=memory_gib, **plan_kwargs)
        if not result["fits"]:
            break
        best = {"config": candidate, "plan": result}
    return best


def format_fit(best: dict | None, memory_gib: float, usable_fraction: float, title: str) -> str:
    if best is None:
        return f"{title}: not even the narrowest model of this shape trains in {memory_gib:g} GiB"
    c, p = best["config"], best["plan"]
    a = p["assumptions"]
    ckpt = f", every {a['checkpoint_every']} block(s) recomputed" if a.get("checkpoint_every") else ""
    return "\n".join([
        f"largest {title} that trains in {memory_gib:g} GiB x {usable_fraction:.0%} usable "
        f"({a['param_dtype']}, {a['optimizer']} state {a['optimizer_state_dtype']}, batch {a['batch']}, "
        f"context {a['context']}{ckpt}):",
        f"  d_model {c.d_model}, n_layers {c.n_layers}, n_heads {c.n_heads}/{c.n_kv_heads}, d_ff {c.d_ff}, "
        f"experts {c.moe_experts} x {c.expert_d_ff} top-{c.moe_topk}",
        f"  parameters {p['params']['total']:,} total, {p['params']['active']:,} active per token; "
        f"needs {p['total_bytes'] / GIB:.2f} GiB of {p['budget_bytes'] / GIB:.2f} GiB",
    ])
