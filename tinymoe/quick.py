"""Shortened runs, to try a command end to end in seconds (docs/runs.md, "Trying a long command
quickly"). Two environment variables, both read where the work happens:

  TINYMOE_MAX_STEPS=N   every training command stops after at most N steps from where it starts,
                        then validates and saves as if interrupted (`--resume` continues)
  TINYMOE_QUICK=1       evaluation and routing statistics score at most QUICK_BATCHES batches;
                        the scripts in benchmarks/ measure only their smallest case, once

The check that runs every documented command (tests/docs_check.py) sets both.
"""

from __future__ import annotations

import os

from tinymoe.errors import TinyMoeError

MAX_STEPS_ENV = "TINYMOE_MAX_STEPS"
QUICK_ENV = "TINYMOE_QUICK"
QUICK_BATCHES = 2


def quick() -> bool:
    return os.environ.get(QUICK_ENV, "").strip() not in ("", "0")


def eval_batches(requested: int | None) -> int | None:
    """The batches an evaluation may score: `requested` (None = all), capped in quick mode."""
    if quick() and (requested is None or requested > QUICK_BATCHES):
        return QUICK_BATCHES
    return requested


def stop_step(start: int, steps: int) -> int:
    """Where a training invocation stops: the run's last step, or N steps from `start` when
    TINYMOE_MAX_STEPS=N is set."""
    raw = os.environ.get(MAX_STEPS_ENV, "").strip()
    if not raw:
        return steps
    if not raw.isdigit() or int(raw) == 0:
        raise TinyMoeError(f"{MAX_STEPS_ENV} must be a positive integer, got {raw!r}")
    return min(steps, start + int(raw))
