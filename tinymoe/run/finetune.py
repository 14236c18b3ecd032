"""A fine-tuning run: low-rank adapters trained on a frozen base checkpoint, in a run folder.

`new_finetune` loads the base (float or quantized, checked like every read), records it by path
and digest (tinymoe.io.base_ref), and starts an ordinary run (tinymoe.run.lifecycle.new_run) whose
trainer builds the adapted model from that record (tinymoe.nn.lora): the same data formats,
balance and z-losses, router statistics, metrics.jsonl, progress, checkpoints and NaN guard as
`tinymoe train`. Its checkpoints hold the adapters (and a fully trained router) and the optimizer
state of those only; `--resume` continues one exactly like any run (the base is read again and
its digest checked).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tinymoe.config import TrainConfig, apply_overrides
from tinymoe.errors import TinyMoeError
from tinymoe.finetune_plan import FINETUNE_CONTEXT

# A fine-tune's training settings where `tinymoe finetune` gives no flag: short, a small learning
# rate (the base already knows the language), no weight decay on adapters that start at zero.
FINETUNE_DEFAULTS = {"steps": 200, "batch_size": 4, "lr": 2e-4, "warmup_steps": 10, "weight_decay": 0.0,
                     "eval_every": 50, "eval_batches": 10, "log_every": 10}


def finetune_train_config(train_over: dict) -> TrainConfig:
    return apply_overrides(dataclasses.replace(TrainConfig(), **FINETUNE_DEFAULTS), train_over, "flag")


def new_finetune(base: str | Path, out: str | Path, *, rank: int, alpha: float, targets: list,
                 router_mode: str = "frozen", model_over: dict | None = None, train_over: dict | None = None,
                 overwrite: bool = False, keep: int | None = None, progress: bool = True):
    """A PreparedRun fine-tuning the checkpoint (or run's latest) `base` into the run folder `out`."""
    from mlx.utils import tree_flatten

    from tinymoe.io.base_ref import base_reference
    from tinymoe.io.folders import check_output
    from tinymoe.io.reader import open_checkpoint
    from tinymoe.nn.lora import apply_finetune, check_lora
    from tinymoe.nn.model import Model
    from tinymoe.run.lifecycle import new_run

    if "router" in targets:
        router_mode = "lora"
    check_lora(rank, alpha, targets, router_mode)
    check_output(Path(out), "run", overwrite, base, resume_hint=True)  # refuse before the slow part
    reader = open_checkpoint(base, "auto")
    if "finetune" in reader.manifest:
        raise TinyMoeError(f"{reader.ckpt} holds adapters already; fine-tune its base, or export it with --fuse, "
                           f"import that and fine-tune the result")
    record = {"method": "lora", "rank": rank, "alpha": float(alpha), "targets": list(targets), "router": router_mode,
              "base": base_reference(reader.ckpt, reader.manifest)}
    model_over = dict(model_over or {})
    if "context" not in model_over and reader.cfg.context > FINETUNE_CONTEXT:
        model_over["context"] = FINETUNE_CONTEXT  # windows of a published model's full context rarely fit
    model_cfg = apply_overrides(reader.cfg, model_over, "flag")
    apply_finetune(Model(model_cfg), record)  # a rank too large for a width: refused before any loading
    model, _, tokenizer, _ = reader.load_model()
    weights = dict(tree_flatten(model.parameters()))
    train_cfg = finetune_train_config(train_over or {})
    return new_run(model_cfg, train_cfg, out, overwrite=overwrite, keep=keep, progress=progress,
                   init={"weights": weights, "tokenizer": tokenizer, "finetune": record})
