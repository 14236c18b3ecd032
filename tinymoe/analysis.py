"""Router statistics: what each MoE layer does with a stream of tokens.

Definitions (docs/inspect.md repeats them):
  load[e]       share of routed token-slots (T*K in all) that went to expert e; sums to 1.
  entropy       mean over tokens of the router's softmax entropy, in nats (ln E = no preference,
                0 = one expert certain). It measures how decided the router is per token.
  load_cv       coefficient of variation of the load over experts, std/mean (population std):
                0 for perfectly even load, sqrt(E-1) when one expert takes everything.
  dead expert   an expert whose load is below 10% of the uniform share 1/E.
"""

from __future__ import annotations

import math

import numpy as np

DEAD_FRACTION = 0.1


def layer_stats(counts_E: np.ndarray, entropy_sum: float, n_tokens: int, top_k: int) -> dict:
    """Statistics of one layer from its slot counts (E,) and summed per-token entropy."""
    counts = np.asarray(counts_E, dtype=np.float64)
    E = counts.size
    total = counts.sum()
    load = counts / total if total else np.zeros(E)
    mean = load.mean()
    cv = float(load.std() / mean) if mean > 0 else 0.0
    dead = int(np.sum(load < DEAD_FRACTION / E))
    return {"experts": E, "top_k": top_k, "load": [round(float(v), 6) for v in load],
            "entropy": entropy_sum / n_tokens if n_tokens else 0.0, "max_entropy": math.log(E),
            "load_cv": cv, "dead_experts": dead, "tokens": n_tokens}


def routing_stats(model, tokens: np.ndarray, batch_size: int, context: int,
                  max_batches: int | None = None) -> list[dict]:
    """Per-MoE-layer statistics of the model's routing over `tokens` (non-overlapping windows)."""
    import mlx.core as mx

    from tinymoe.data import eval_batches

    layers = model.moe_layers()
    E = {i: model.blocks[i].moe.router.num_experts for i in layers}
    K = {i: model.blocks[i].moe.router.top_k for i in layers}
    counts = {i: np.zeros(E[i], dtype=np.int64) for i in layers}
    entropy = {i: 0.0 for i in layers}
    n_tokens = 0
    model.train(False)
    for inputs, _ in eval_batches(tokens, batch_size, context, max_batches):
        routing: list = []
        model(mx.array(inputs), routing=routing)
        for i, r in zip(layers, routing):
            idx = np.array(r["indices"]).reshape(-1)
            counts[i] += np.bincount(idx, minlength=E[i])
            p = r["probs"]
            ent = -mx.sum(p * mx.log(mx.maximum(p, 1e-30)), axis=-1)
            entropy[i] += mx.sum(ent).item()
        n_tokens += inputs.size
    return [{"layer": i, **layer_stats(counts[i], entropy[i], n_tokens, K[i])} for i in layers]


def bar(value: float, scale: float, width: int = 30) -> str:
    n = int(round(width * min(1.0, value / scale))) if scale > 0 else 0
    return "█" * n + "·" * (width - n)
