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


def staged_schedule(train: TrainConfig, stages: list):
    """The learning rate of a run in stages (tinymoe.stages): each stage has its own linear warmup
    to lr x lr_scale over its `warmup` steps and its own cosine decay to lr x lr_scale x
    min_lr_ratio at its last step, so a stage's rates depend on that stage alone (later stages
    may change on resume without changing what was trained)."""
    pieces, start = [], 0
    for stage in stages:
        base = train.lr * stage.lr_scale
        pieces.append((start, base, base * train.min_lr_ratio, stage.warmup, max(1, stage.steps - stage.warmup)))
        start += stage.steps

    def schedule(step):
        s = mx.array(step).astype(mx.float32)
        rate = mx.array(0.0)
        for first, base, end, warmup, decay_steps in pieces:
            local = s - first
            warm = base * (local + 1) / max(1, warmup)
            t = mx.clip((local - warmup) / decay_steps, 0.0, 1.0)
            cosine = end + (base - end) * 0.5 * (1 + mx.cos(math.pi * t))
            rate = mx.where(s >= first, mx.where(local < warmup, warm, cosine), rate)
        return rate

    return schedule
