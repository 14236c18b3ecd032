"""Router drift: how a fine-tune changed routing, against its base model on the same tokens.

Both models route the same windows (spread over the text as `inspect` spreads them); per MoE layer:
  base_load, tuned_load   share of kept slots per expert (E,), each summing to 1
  load_change             tuned_load - base_load per expert (E,)
  max_load_change         the largest |load_change|
  topk_changed            share of tokens whose set of kept experts differs (order ignored)
  first_changed           share of tokens whose first choice (the highest-gated slot) differs
Routing inside a layer depends on the layers before it, so drift includes what adapted attention
and experts of earlier layers did to the router's input, as it does when the model runs.
"""

from __future__ import annotations

import numpy as np

from tinymoe.analysis.stats import load_shares, spread_windows


def _chosen(record: dict, E: int) -> np.ndarray:
    """(T, E) bool: experts each token's kept slots went to."""
    indices = np.array(record["indices"])  # (T, K)
    kept = np.ones(indices.shape, bool) if record.get("kept") is None else np.array(record["kept"])
    out = np.zeros((indices.shape[0], E), bool)
    rows = np.repeat(np.arange(indices.shape[0]), indices.shape[1])
    out[rows[kept.reshape(-1)], indices.reshape(-1)[kept.reshape(-1)]] = True
    return out


def routing_drift(tuned, base, tokens: np.ndarray, batch_size: int, context: int,
                  max_batches: int | None = None) -> dict:
    """{"tokens", "layers": [per-layer drift]} over up to batch_size * max_batches windows."""
    import mlx.core as mx

    layers = tuned.moe_layers()
    E = tuned.cfg.moe_experts
    counts = {i: [np.zeros(E), np.zeros(E)] for i in layers}
    changed = {i: [0, 0] for i in layers}  # tokens with another expert set, another first choice
    max_windows = None if max_batches is None else batch_size * max_batches
    starts = spread_windows(int(tokens.shape[0]), context, max_windows)
    offsets = np.arange(context, dtype=np.int64)
    tuned.train(False)
    base.train(False)
    for b in range(0, starts.size, batch_size):
        inputs = mx.array(np.asarray(tokens[starts[b:b + batch_size, None] + offsets], dtype=np.int32))
        records = []
        for model in (base, tuned):
            routing: list = []
            model(inputs, routing=routing)
            records.append(routing)
        for i, r_base, r_tuned in zip(layers, *records):
            c_base, c_tuned = _chosen(r_base, E), _chosen(r_tuned, E)
            counts[i][0] += c_base.sum(axis=0)
            counts[i][1] += c_tuned.sum(axis=0)
            changed[i][0] += int(np.any(c_base != c_tuned, axis=1).sum())
            first = [np.take_along_axis(np.array(r["indices"]), np.argmax(np.array(r["gates"]), axis=1)[:, None], 1)
                     for r in (r_base, r_tuned)]
            changed[i][1] += int(np.sum(first[0] != first[1]))
    n = int(starts.size * context)
    out = []
    for i in layers:
        base_load, tuned_load = load_shares(counts[i][0]), load_shares(counts[i][1])
        delta = tuned_load - base_load
        out.append({"layer": i, "base_load": base_load.round(5).tolist(), "tuned_load": tuned_load.round(5).tolist(),
                    "load_change": delta.round(5).tolist(), "max_load_change": float(np.abs(delta).max()),
                    "topk_changed": changed[i][0] / max(n, 1), "first_changed": changed[i][1] / max(n, 1)})
    return {"tokens": n, "layers": out}
