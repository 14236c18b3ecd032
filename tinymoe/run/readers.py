"""Reading a run while it trains: a checkpoint that vanishes mid-read is retried on the new latest.

A trainer saves a new checkpoint completely before it points `latest` at it and only then prunes
older ones, so a reader that resolved `latest` a moment ago may find its checkpoint being
deleted. Rather than making readers hold locks that a trainer would have to wait for, a read
that fails while its checkpoint directory has disappeared is simply repeated on whatever
`latest` names now (a few times; each retry means a newer checkpoint was completed meanwhile).
A path that names one checkpoint directly is read once: nothing else can stand in for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

from tinymoe.errors import TinyMoeError
from tinymoe.io import checkpoint

T = TypeVar("T")
ATTEMPTS = 20


def read_latest(path: str | Path, read: Callable[[Path], T]) -> T:
    """`read(checkpoint_dir)` on the checkpoint `path` resolves to, retried while the run's
    checkpoints are replaced under it."""
    named_directly = (Path(path) / "manifest.json").is_file()
    for attempt in range(ATTEMPTS):
        ckpt = checkpoint.resolve(path)
        try:
            return read(ckpt)
        except TinyMoeError:
            if named_directly or (ckpt / "manifest.json").is_file() or attempt == ATTEMPTS - 1:
                raise  # a real problem, not a checkpoint pruned under us
    raise AssertionError("unreachable")
