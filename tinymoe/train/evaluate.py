"""Held-out metrics: mean cross-entropy, perplexity and bits per byte.

Bits per byte divides the summed cross-entropy (converted to bits) by the number of UTF-8 bytes
the target tokens stand for, so models with different tokenizers can be compared: a byte-level
model's bits per byte is its loss / ln 2; a sentencepiece model's is lower per token but spread
over several bytes. Windows are consecutive and non-overlapping, so every position is scored once.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from tinymoe.data.batches import eval_batches


def evaluate(model, tokens: np.ndarray, byte_lengths: np.ndarray, batch_size: int, context: int,
             max_batches: int | None = None) -> dict:
    """{"loss", "ppl", "bits_per_byte", "tokens"} over `tokens` (None values when it is empty)."""
    total_nats, n_tokens, n_bytes = 0.0, 0, 0
    for inputs, targets in eval_batches(tokens, batch_size, context, max_batches):
        logits, _ = model(mx.array(inputs))
        nats = nn.losses.cross_entropy(logits, mx.array(targets), reduction="sum")
        total_nats += nats.item()
        n_tokens += targets.size
        n_bytes += int(byte_lengths[targets].sum())
    if n_tokens == 0:
        return {"loss": None, "ppl": None, "bits_per_byte": None, "tokens": 0}
    loss = total_nats / n_tokens
    bpb = total_nats / math.log(2) / n_bytes if n_bytes else None
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bits_per_byte": bpb, "tokens": n_tokens}
