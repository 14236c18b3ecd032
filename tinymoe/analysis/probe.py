"""Linear probes: where in the model the domain of a token can be read off, layer by layer.

For each block, the residual stream after it (T, D), and for each MoE layer the router's
distribution over experts (T, E), are collected on held-out windows, routed freely (no domain
mask, so a hard-mode run's routers are asked what they would choose on their own). A linear probe
per layer predicts each token's domain from that vector: ridge regression onto one-hot labels on
standardised features, argmax (closed form, deterministic, no learning-rate to tune). Windows
alternate between fitting and scoring, so the accuracy is on tokens the probe never saw; the
majority class's share of the scored tokens is the chance level to beat.

Shapes: T tokens, D model width, E experts, C domains.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from tinymoe.data.batches import eval_batches

RIDGE = 1e-2  # on standardised features: enough to keep X^T X invertible, small next to T


def collect(model, tokens: np.ndarray, domain_ids: np.ndarray, batch_size: int, context: int,
            max_batches: int | None = None) -> dict:
    """{"hidden": [per block (T, D)], "routing": [per MoE layer (T, E)], "labels": (T,),
    "window": (T,) index of each token's window}."""
    hidden, routing, labels, window = None, None, [], []
    n_windows = 0
    batches = zip(eval_batches(tokens, batch_size, context, max_batches),
                  eval_batches(domain_ids, batch_size, context, max_batches))
    for (inputs, _), (domains, _) in batches:
        x = model.embed(mx.array(inputs))
        records: list = []
        states = []
        for block in model.blocks:
            x, _ = block(x, None, records)
            states.append(x.reshape(-1, x.shape[-1]).astype(mx.float32))
        probs = [r["probs"] for r in records]
        mx.eval(states, probs)
        states = [np.array(s) for s in states]
        probs = [np.array(p) for p in probs]
        hidden = [[s] for s in states] if hidden is None else [h + [s] for h, s in zip(hidden, states)]
        routing = [[p] for p in probs] if routing is None else [r + [p] for r, p in zip(routing, probs)]
        labels.append(domains.reshape(-1))
        B, L = inputs.shape
        window.append(np.repeat(np.arange(n_windows, n_windows + B), L))
        n_windows += B
    if not labels:
        return {"hidden": [], "routing": [], "labels": np.zeros(0, np.int64), "window": np.zeros(0, np.int64)}
    return {"hidden": [np.concatenate(h) for h in hidden], "routing": [np.concatenate(r) for r in routing],
            "labels": np.concatenate(labels).astype(np.int64), "window": np.concatenate(window)}


def fit_ridge(X_TF: np.ndarray, labels_T: np.ndarray, num_classes: int, ridge: float = RIDGE):
    """(weights (F+1, C), mean (F,), scale (F,)) of a ridge probe: standardise, add a bias column,
    solve (X^T X + ridge T I) W = X^T Y."""
    mean = X_TF.mean(axis=0)
    scale = X_TF.std(axis=0) + 1e-6
    X = np.hstack([(X_TF - mean) / scale, np.ones((X_TF.shape[0], 1))]).astype(np.float64)
    Y = np.eye(num_classes)[labels_T]
    gram = X.T @ X + ridge * X.shape[0] * np.eye(X.shape[1])
    return np.linalg.solve(gram, X.T @ Y), mean, scale


def predict_ridge(probe, X_TF: np.ndarray) -> np.ndarray:
    W, mean, scale = probe
    X = np.hstack([(X_TF - mean) / scale, np.ones((X_TF.shape[0], 1))])
    return np.argmax(X @ W, axis=1)


def probe_accuracy(X_TF: np.ndarray, labels_T: np.ndarray, fit_T: np.ndarray, num_classes: int) -> float:
    """Accuracy on the tokens outside `fit_T` (bool) of a probe fitted on those inside."""
    probe = fit_ridge(X_TF[fit_T], labels_T[fit_T], num_classes)
    return float(np.mean(predict_ridge(probe, X_TF[~fit_T]) == labels_T[~fit_T]))


def run_probes(collected: dict, moe_layers: list[int], num_classes: int) -> dict:
    """Held-out accuracy per layer from hidden states and from routing vectors, and chance."""
    labels, window = collected["labels"], collected["window"]
    fit = window % 2 == 0  # even windows fit, odd windows score
    scored = labels[~fit]
    if fit.sum() == 0 or scored.size == 0 or np.unique(labels[fit]).size < 2:
        return {"tokens": {"fit": int(fit.sum()), "scored": int(scored.size)}, "chance": None,
                "hidden": [], "routing": []}
    chance = float(np.bincount(scored, minlength=num_classes).max() / scored.size)
    return {"tokens": {"fit": int(fit.sum()), "scored": int(scored.size)}, "chance": chance,
            "hidden": [{"layer": i, "accuracy": probe_accuracy(h, labels, fit, num_classes)}
                       for i, h in enumerate(collected["hidden"])],
            "routing": [{"layer": layer, "accuracy": probe_accuracy(r, labels, fit, num_classes)}
                        for layer, r in zip(moe_layers, collected["routing"])]}
