"""The learning-rate schedule: linear warmup, then cosine decay."""

from __future__ import annotations

import math

import mlx.core as mx

from tinymoe.config import TrainConfig


def lr_schedule(train: TrainConfig):
    """Linear warmup to `lr` over `warmup_steps` (lr * (s+1) / warmup at step s), then cosine
    decay to lr * min_lr_ratio at the last step. Written out rather than joined from MLX's
    schedules so that any warmup length, 1 included, works."""
    base, end, warmup = train.lr, train.lr * train.min_lr_ratio, train.warmup_steps
    decay_steps = max(1, train.steps - warmup)

    def schedule(step):
        s = mx.array(step).astype(mx.float32)
        warm = base * (s + 1) / max(1, warmup)
        t = mx.clip((s - warmup) / decay_steps, 0.0, 1.0)
        cosine = end + (base - end) * 0.5 * (1 + mx.cos(math.pi * t))
        return mx.where(s < warmup, warm, cosine)

    return schedule
