"""Refuse a model that cannot fit in this machine's memory, before anything is allocated.

A config can name any size (`--set d_model=1000000`, a hand-edited preset, an imported
config.json). MLX builds weights lazily, so nothing fails when the model object is made; the
first evaluation then asks the allocator for terabytes and the process dies with a segmentation
fault or is killed by the kernel, with no message at all. The planner (tinymoe.planner) prices a
config by arithmetic alone, so `require_fits` asks it first and turns "cannot fit" into one line
naming both numbers. The check is deliberately loose: it refuses only what needs more than the
machine's whole memory (not the planner's 75% working-set budget), so nothing that might run is
refused; `tinymoe plan` gives the finer verdict. No MLX import here.
"""

from __future__ import annotations

import os
from pathlib import Path

from tinymoe.errors import TinyMoeError
from tinymoe.planner import GIB, param_counts, plan
from tinymoe.precision_check import checkpoint_every

# Each block is a handful of Python objects and small MLX arrays besides its weights: measured
# 20-100 KiB per block on Linux/MLX 0.32 (5000 tiny blocks), so 10**6 layers cost gigabytes alone.
PER_BLOCK_OVERHEAD_BYTES = 64 * 1024
MEMORY_ENV = "TINYMOE_MEMORY_GIB"  # overrides what the machine reports (tests, shared machines)


def _cgroup_limit() -> int | None:
    """The memory limit of this process's container (cgroup v2, then v1), if one is set."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except (OSError, ValueError):
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" or a huge number: no limit
            return int(text)
    return None


def machine_memory_bytes() -> int | None:
    """Physical memory (or the container's limit, or $TINYMOE_MEMORY_GIB); None when unknown."""
    override = os.environ.get(MEMORY_ENV)
    if override:
        try:
            gib = float(override)
        except ValueError:
            raise TinyMoeError(f"${MEMORY_ENV} must be a number of GiB, got {override!r}") from None
        if not gib > 0 or gib == float("inf"):
            raise TinyMoeError(f"${MEMORY_ENV} must be a positive number of GiB, got {override!r}")
        return int(gib * GIB)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        physical = None
    limits = [n for n in (physical, _cgroup_limit()) if n and n > 0]
    return min(limits) if limits else None


def require_fits(cfg, *, mode: str = "train", batch: int = 1, context: int | None = None,
                 optimizer: str = "adamw", state_dtype: str = "float32", what: str = "the model",
                 param_dtype: str = "float32", checkpoint_every: int = 0, grad_accum: int = 1) -> None:
    """Raise TinyMoeError when `cfg` (run as `mode`) needs more than this machine's memory.
    Call it after `config.validate` (the planner assumes a valid config)."""
    available = machine_memory_bytes()
    if available is None:
        return
    result = plan(cfg, mode=mode, batch=batch, context=context, optimizer=optimizer, state_dtype=state_dtype,
                  param_dtype=param_dtype, checkpoint_every=checkpoint_every, grad_accum=grad_accum,
                  memory_gib=available / GIB,
                  usable_fraction=1.0)
    needed = result["total_bytes"] + cfg.n_layers * PER_BLOCK_OVERHEAD_BYTES
    if needed > available:
        params = param_counts(cfg).total
        setting = f"batch {batch}, " if mode == "train" else ""
        doing = "training" if mode == "train" else "loading it"
        raise TinyMoeError(f"{what} does not fit in memory: {doing} needs about {needed / GIB:,.1f} GiB "
                           f"({params:,} parameters, {setting}context {result['assumptions']['context']}), "
                           f"this machine has {available / GIB:,.1f} GiB; see `tinymoe plan`")


def require_train_fits(model_cfg, train_cfg, what: str = "the model") -> None:
    """`require_fits` for a training run with these settings."""
    require_fits(model_cfg, mode="train", batch=train_cfg.batch_size, optimizer=train_cfg.optimizer,
                 state_dtype=train_cfg.optimizer_state_dtype, what=what,
                 param_dtype=getattr(train_cfg, "dtype", "float32"), grad_accum=getattr(train_cfg, "grad_accum", 1),
                 checkpoint_every=checkpoint_every(getattr(train_cfg, "checkpoint_activations", "none")))


def layers_memory_allows() -> int | None:
    """The most blocks whose Python objects alone fit in memory: a bound to check a layer count
    against before any loop over the layers (None when the machine's memory is unknown)."""
    available = machine_memory_bytes()
    return None if available is None else available // PER_BLOCK_OVERHEAD_BYTES
