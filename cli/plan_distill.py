"""`tinymoe plan --mode teacher-cache` and `plan --teacher-cache DIR`: distillation's memory and disk."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tinymoe.cli.common import UserError, print_json


def _teacher_config(preset: str, source: str | None):
    """The teacher's ModelConfig: a tinymoe checkpoint or run folder (--from), else the preset."""
    from tinymoe.config import ModelConfig, from_dict, load_preset

    if not source:
        return load_preset(preset)[0], f"preset {preset}"
    folder = Path(source)
    if (folder / "latest").is_file():
        folder = folder / "checkpoints" / (folder / "latest").read_text().strip()
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return from_dict(ModelConfig, manifest["model"], f"{folder}/manifest.json"), str(source)
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{source}: --mode teacher-cache plans a tinymoe checkpoint or run folder (or a preset)") \
            from None


def plan_teacher_cache(preset, source, batch_chunks, k, method, dtype, tokens, memory_gib, usable_fraction,
                       as_json) -> None:
    """Memory of `tinymoe teacher-cache` (the teacher's weights and one forward pass) and the cache's size."""
    from tinymoe.distill_plan import bytes_per_token, format_cache_lines, teacher_forward_bytes
    from tinymoe.planner import GIB, plan

    cfg, title = _teacher_config(preset, source)
    if not 1 <= k <= cfg.vocab_size:
        raise UserError(f"--top-k {k}: must be between 1 and the teacher's vocabulary ({cfg.vocab_size})")
    weights = plan(cfg, mode="sample", batch=1, memory_gib=memory_gib, usable_fraction=usable_fraction)
    parts = {"weights": weights["bytes"]["weights"], **teacher_forward_bytes(cfg, batch_chunks)}
    total = sum(parts.values())
    per = bytes_per_token(k, method, cfg.vocab_size, dtype)
    result = {"mode": "teacher-cache", "teacher": title, "batch_chunks": batch_chunks, "context": cfg.context,
              "bytes": parts, "total_bytes": total, "budget_bytes": weights["budget_bytes"],
              "fits": total <= weights["budget_bytes"], "cache": {"method": method, "k": k, "dtype": dtype,
                                                                 "bytes_per_token": per,
                                                                 "bytes": per * tokens if tokens else None}}
    if as_json:
        print_json(result)
        return
    click.echo(f"{title} (teacher-cache: {batch_chunks} chunks of {cfg.context} tokens per forward pass)")
    for name, n in parts.items():
        click.echo(f"  {name:<17} {n / 2**20:11.2f} MiB")
    click.echo(f"  {'total':<17} {total / 2**20:11.2f} MiB")
    click.echo(f"  {'fits' if result['fits'] else 'does NOT fit'} in {weights['budget_bytes'] / GIB:.2f} GiB usable")
    for line in format_cache_lines(k, method, cfg.vocab_size, dtype, tokens):
        click.echo(line)


def cache_read_lines(cache_dir: str, batch: int, context: int) -> list[str]:
    """A training run's plan lines for the teacher cache it would read."""
    from tinymoe.distill_plan import format_cache_lines

    try:
        m = json.loads((Path(cache_dir) / "manifest.json").read_text())
        return format_cache_lines(int(m["k"]), m["method"], int(m["vocab_size"]), m["dtype"], int(m["tokens"]),
                                  batch, context)
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"teacher cache {cache_dir}: no complete cache there (manifest.json missing or "
                        f"unreadable)") from None
