"""Held-out metrics: mean cross-entropy, perplexity and bits per byte.

Bits per byte divides the summed cross-entropy (converted to bits) by the number of UTF-8 bytes
the target tokens stand for, so models with different tokenizers can be compared: a byte-level
model's bits per byte is its loss / ln 2; a sentencepiece model's is lower per token but spread
over several bytes. Windows are consecutive and non-overlapping, so every position is scored once.
With a target mask (instruction data), only the target tokens are scored, and only their bytes count.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from tinymoe.data.batches import eval_batches


def evaluate(model, tokens: np.ndarray, byte_lengths: np.ndarray, batch_size: int, context: int,
             max_batches: int | None = None, mask: np.ndarray | None = None,
             domains: np.ndarray | None = None) -> dict:
    """{"loss", "ppl", "bits_per_byte", "tokens", "loss_on"} over `tokens` (None values when it is
    empty). With a target `mask` (N,), only target tokens are scored: "tokens" counts them and
    "loss_on" is "target". With per-token `domains` (N,), the model gets each window's domain ids
    (a run with domain experts routes them as in training, tinymoe.nn.domain)."""
    total_nats, n_tokens, n_bytes = 0.0, 0, 0
    windows_of_domains = (eval_batches(domains, batch_size, context, max_batches) if domains is not None
                          else iter(lambda: None, 0))  # the same windows of the domain ids, or None
    for batch, domain_batch in zip(eval_batches(tokens, batch_size, context, max_batches, mask), windows_of_domains):
        inputs, targets = batch[0], batch[1]
        logits, _ = model(mx.array(inputs), domains_BL=None if domain_batch is None else mx.array(domain_batch[0]))
        logits = logits.astype(mx.float32)  # a bfloat16/float16 model's loss in float32, as in training
        if mask is None:
            nats = nn.losses.cross_entropy(logits, mx.array(targets), reduction="sum")
            n_tokens += targets.size
            n_bytes += int(byte_lengths[targets].sum())
        else:
            keep = batch[2]  # (b, L) 1.0 on target tokens
            nats = mx.sum(nn.losses.cross_entropy(logits, mx.array(targets), reduction="none") * mx.array(keep))
            n_tokens += int(keep.sum())
            n_bytes += int((byte_lengths[targets] * keep).sum())
        total_nats += nats.item()
    loss_on = "all" if mask is None else "target"
    if n_tokens == 0:
        return {"loss": None, "ppl": None, "bits_per_byte": None, "tokens": 0, "loss_on": loss_on}
    loss = total_nats / n_tokens
    bpb = total_nats / math.log(2) / n_bytes if n_bytes else None
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bits_per_byte": bpb, "tokens": n_tokens,
            "loss_on": loss_on}


def combine(results: list[dict]) -> dict:
    """One result from `evaluate` results over separate streams, as if their tokens were scored together."""
    if len(results) == 1:
        return results[0]
    scored = [r for r in results if r["tokens"]]
    if not scored:
        return results[0] if results else {"loss": None, "ppl": None, "bits_per_byte": None, "tokens": 0}
    n_tokens = sum(r["tokens"] for r in scored)
    nats = sum(r["loss"] * r["tokens"] for r in scored)
    n_bits_over_bpb = [r["loss"] * r["tokens"] / math.log(2) / r["bits_per_byte"] for r in scored if r["bits_per_byte"]]
    loss = nats / n_tokens
    bpb = nats / math.log(2) / sum(n_bits_over_bpb) if len(n_bits_over_bpb) == len(scored) else None
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bits_per_byte": bpb, "tokens": n_tokens,
            "loss_on": scored[0].get("loss_on")}
