"""What a run is about to do, printed before training: steps, tokens, the learning-rate schedule
and the settings in force, plus warnings for a schedule that cannot do what it says."""

from __future__ import annotations


def schedule_warnings(train) -> list[str]:
    """Warnings for a degenerate warmup + cosine schedule (tinymoe.train.schedule)."""
    if train.warmup_steps and train.steps <= train.warmup_steps:
        suggestion = max(1, train.steps // 10)
        return [f"warning: all {train.steps} steps fall inside the {train.warmup_steps} warmup steps: the learning "
                f"rate never reaches its peak {train.lr:g} and never decays; pass --warmup-steps {suggestion} "
                f"(or more --steps)"]
    return []


def stage_lines(stages, lr: float) -> list[str]:
    """One line per stage: each has its own warmup and cosine (tinymoe.train.schedule)."""
    lines, start = [], 0
    for i, st in enumerate(stages, 1):
        lines.append(f"  stage {i} ({st.name}): steps {start}-{start + st.steps}, trains {', '.join(st.train)}, "
                     f"lr {lr * st.lr_scale:g}, warmup {st.warmup}, loss on {st.loss_on}")
        start += st.steps
    return lines


def run_plan(train, context: int, start_step: int = 0, stages=None) -> list[str]:
    """Lines describing the run from `start_step` to `train.steps` (per stage for a staged run)."""
    per_step = train.grad_accum * train.batch_size * context
    todo = train.steps - start_step
    where = f"steps {start_step}-{train.steps}" if start_step else f"{train.steps} steps"
    saves = f"every {train.save_every} steps" if train.save_every else "at the end"
    evals = f"every {train.eval_every} steps" if train.eval_every else "at the end"
    schedule = ("in stages, each with its own warmup and cosine" if stages else
                f"lr {train.lr:g}, warmup {train.warmup_steps}, cosine to {train.lr * train.min_lr_ratio:g}")
    lines = [
        f"plan: {where} x {train.grad_accum * train.batch_size} sequences x {context} tokens = "
        f"{todo * per_step:,} tokens; {schedule}; validate {evals} ({train.eval_batches} batches), save {saves}",
    ]
    if stages:
        return lines + stage_lines(stages, train.lr)
    return lines + schedule_warnings(train)
