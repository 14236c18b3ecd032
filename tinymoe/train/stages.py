"""What a training stage (tinymoe.stages) changes in the trainer: configs, capacity, sampler, validation.

A stage runs on the trainer's model and optimizer with its own step function (its loss mode,
router loss weights and trainable groups, tinymoe.train.step), its own sampler over the streams of
its data specs (seeded from the run's seed and the stage's index, so a stage draws the same
windows however the run got there), and validates on the validation splits of its own data.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np

from tinymoe.data.batches import MixSampler
from tinymoe.errors import TinyMoeError
from tinymoe.nn.moe import moe_layers_of
from tinymoe.stages import Stage, trains


def stage_configs(model_cfg, train, stage: Stage):
    """The model and train config one stage computes with (router options and loss mode)."""
    model_cfg = dataclasses.replace(model_cfg, aux_loss_weight=stage.aux_loss_weight,
                                    z_loss_weight=stage.z_loss_weight, capacity_factor=stage.capacity_factor)
    return model_cfg, dataclasses.replace(train, loss_on=stage.loss_on)


def set_capacity(model, capacity_factor: float) -> None:
    """The training capacity factor of every MoE layer (and of routers that read it themselves)."""
    for layer in moe_layers_of(model):
        layer.capacity_factor = capacity_factor
        if hasattr(layer.router, "capacity_factor"):
            layer.router.capacity_factor = capacity_factor


def trains_predicate(stage: Stage):
    """None when the stage trains every group, else a weight-name predicate."""
    return None if "all" in stage.train else partial(trains, stage)


def stage_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + 7919 * (index + 1)) % (1 << 63)


def stage_sampler(data, stage: Stage, index: int, batch_size: int, context: int, seed: int) -> MixSampler:
    streams = []
    for spec in stage.data:
        stream = data.streams[spec]
        if stream.train_tokens.size < context + 1:
            raise TinyMoeError(f"stage '{stage.name}': {spec} has {stream.train_tokens.size} training tokens after "
                               f"the validation split; one window needs context+1 = {context + 1}")
        streams.append((stream.train_tokens, stream.train_mask))
    return MixSampler(streams, stage.weights, batch_size, context, stage_seed(seed, index))


def stage_validation(data, stage: Stage) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(tokens, target mask or None) of each validation split a stage validates on: its data's."""
    return [(data.streams[spec].val_tokens, data.streams[spec].val_mask if stage.loss_on == "target" else None)
            for spec in stage.data]
