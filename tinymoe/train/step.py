"""One optimizer step: micro-batches, averaged gradients, clipping, the update; compiled where possible.

Two numerical guards keep a step from damaging the run. The loss and gradient norm are checked on
the host before the update: a non-finite one skips the update. A finite gradient can still give
non-finite weights (an infinite or NaN learning rate or weight decay, an overflowing moment), so
the updated weights and optimizer state are checked too, by one isfinite reduction evaluated
together with the update itself (no extra host sync); when it fails, the step is rolled back:
MLX arrays are immutable, so keeping the trees of the previous arrays is enough to put every
weight, moment and step count back bit for bit. Both kinds are reported as skipped steps. The
price of an exact rollback is memory: the previous weights and optimizer state stay alive until
the update has been evaluated, so the eager optimizers (sparse-adamw, adafactor), whose update
could otherwise reuse the old moments' buffers, peak with one more copy of their state
(measured: +172 MiB for 197 MiB of sparse-adamw state); the compiled adamw update held both
copies already.

The logged learning rate is the one the step's update applied: optimizers compute the scheduled
rate inside their update (mlx's optimizers store schedule(step) there), so `learning_rate` read
before the update still holds the previous step's rate.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from tinymoe.config import ModelConfig, TrainConfig
from tinymoe.nn.dispatch import COMPILABLE
from tinymoe.nn.model import Model
from tinymoe.nn.domain import SECRETARY_LOSS_SCALE, secretary_terms
from tinymoe.nn.moe import has_router_state, needs_key, update_router_state
from tinymoe.router_registry import effective_entropy_weight
from tinymoe.train.distill import kd_loss


def _stack_layers(values: list) -> mx.array:
    """One per-layer statistic, (L,) or (L, E); (0,) for a model without MoE layers."""
    return mx.stack(values) if values else mx.zeros((0,))


class Stepper:
    """One optimizer step: grad_accum micro-batches, averaged grads, clip, the optimizer's update."""

    def __init__(self, model: Model, optimizer, model_cfg: ModelConfig, train: TrainConfig,
                 compile: bool | None = None, trains=None, distill: str | None = None, scaler=None,
                 ranks=None, domains: bool = False):
        """compile: None compiles whenever the dispatch backend allows it; False never does.
        trains: None trains every weight; else a predicate on weight names (a training stage's
        groups, tinymoe.stages.trains): the others get no update, no weight decay, no optimizer
        state change. train.loss_on "target" weights the LM loss by each batch's target mask.
        distill: the teacher cache's method (tinymoe.train.distill); batches then carry the
        teacher's predictions and the LM loss is (1 - w) CE + w KD, w = train.distill_weight.
        scaler: a tinymoe.train.loss_scale.LossScaler (float16): the loss is multiplied by its
        scale for the backward pass and the gradients divided by it, in float32.
        ranks: the data-parallel group (tinymoe.train.distributed) whose average gradient and
        statistics the step applies; None for a single process.
        domains: batches end with the inputs' domain ids (a run with domain experts,
        tinymoe.nn.domain): the loss adds train.domain_weight x the router supervision loss, and
        the secretary's cross entropy when the model has one (its input is stop-gradient, so that
        term trains the secretary alone)."""
        self.model, self.optimizer, self.trains, self.ranks = model, optimizer, trains, ranks
        self.masked = train.loss_on == "target"
        self.distill = distill
        w_kd, temperature = train.distill_weight, train.distill_temperature
        self.router_trains = trains is None or any(trains(n) for n, _ in tree_flatten(model.trainable_parameters())
                                                   if ".moe.router." in n)
        w_balance, w_z, clip = model_cfg.aux_loss_weight, model_cfg.z_loss_weight, train.grad_clip
        w_entropy = effective_entropy_weight(model_cfg)
        w_domain, self.domains = train.domain_weight, domains
        has_secretary = domains and "secretary" in model
        # Noisy/jittered routers get an explicit key per micro-batch (an input of the compiled step).
        self.seed, self.needs_key, self.router_state = train.seed, needs_key(model), has_router_state(model)

        def body(x, y, m, key, teacher=None, d=None):
            logits, aux = model(x, key=key, domains_BL=d)
            if logits.dtype != mx.float32:  # mixed precision: the loss in float32 (tinymoe.nn.precision)
                logits = logits.astype(mx.float32)
            if m is None:
                ce = nn.losses.cross_entropy(logits, y, reduction="mean")
            else:  # the mean over target tokens only (a batch without any contributes 0)
                ce = mx.sum(nn.losses.cross_entropy(logits, y, reduction="none") * m) / mx.maximum(mx.sum(m), 1.0)
            lm = ce
            if teacher is not None:  # teacher = (ids, log-probabilities, rest) at each input position
                kd = kd_loss(logits, *teacher, distill, temperature, m)
                lm = (1.0 - w_kd) * ce + w_kd * kd
            total = lm + w_balance * aux["balance_loss"] + w_z * aux["z_loss"]
            if w_entropy:  # the entropy bonus (tinymoe.nn.routers.router_losses)
                total = total + w_entropy * aux["entropy_loss"]
            # Per-layer stats stay lists (empty for a dense model) and are stacked outside: two
            # distinct empty arrays among a compiled value_and_grad's outputs crash mx.compile (0.32).
            out = (total, ce, aux["balance_loss"], aux["z_loss"], aux["load"], aux["entropy_loss"],
                   aux["drop_rate"], aux["mean_k"])
            if d is not None:  # (domain loss, secretary loss, rows it got right, rows labelled)
                total = total + w_domain * aux["domain_loss"]
                zero = mx.array(0.0)
                secretary = secretary_terms(model, x, d) if has_secretary else (zero, zero, zero)
                total = total + SECRETARY_LOSS_SCALE * secretary[0]
                return (total, *out[1:], aux["domain_loss"], *secretary)
            return out + (kd,) if teacher is not None else out

        if domains and self.masked:
            def loss_fn(x, y, m, d, key=None):
                return body(x, y, m, key, None, d)
        elif domains:
            def loss_fn(x, y, d, key=None):
                return body(x, y, None, key, None, d)
        elif distill:
            masked = self.masked

            def loss_fn(x, y, m, t_ids, t_logp, t_rest, key=None):
                return body(x, y, m if masked else None, key, (t_ids, t_logp, t_rest))
        elif self.masked:
            def loss_fn(x, y, m, key=None):
                return body(x, y, m, key)
        else:
            def loss_fn(x, y, key=None):
                return body(x, y, None, key)

        self.scaler = scaler
        if scaler is not None:  # the scale is the last input: a new scale needs no new trace
            unscaled_fn = loss_fn

            def loss_fn(*args):
                out = unscaled_fn(*args[:-1])
                return (out[0] * args[-1],) + tuple(out[1:])

        grad_fn = nn.value_and_grad(model, loss_fn)
        # Experts sharded over ranks: the norm spans every rank's experts, so step() clips by it.
        self.sharded = ranks is not None and ranks.shards_experts
        self.clip = clip
        if self.sharded:
            clip = 0.0

        def apply(grads):
            grads, norm = optim.clip_grad_norm(grads, clip) if clip > 0 else (grads, global_norm(grads))
            optimizer.update(model, grads)
            return norm

        # The forward/backward can be traced unless an MoE layer reads its segment sizes on the host
        # (`grouped`); the update and the norm can be traced whatever the dispatch.
        # (Sharded experts pick their slots on the host too.)
        traceable = (model.dispatch in COMPILABLE or not model.moe_layers()) and not self.sharded
        self.compiled = traceable and compile is not False
        # value_and_grad swaps traced arrays into the model, so its state is an output too.
        self._grad = mx.compile(grad_fn, inputs=[model.state], outputs=[model.state]) if self.compiled else grad_fn
        # sparse-adamw picks the active experts on the host: its update runs eagerly.
        if compile is not False and getattr(optimizer, "compilable", True):
            state = [model.state, optimizer.state]
            self._apply = mx.compile(apply, inputs=state, outputs=state)
        else:
            self._apply = apply
        self._norm = global_norm if compile is False else mx.compile(global_norm)
        # The lazy optimizers' state grows as experts are first used: compiling the check for
        # them would retrace whenever it does.
        self._all_finite = mx.compile(all_finite) if compile is not False and getattr(
            optimizer, "compilable", True) else all_finite
        if self.sharded:
            self._norm = ranks.norm

    def step(self, next_batches, step: int | None = None) -> dict:
        """Run one step over the (inputs, targets) micro-batches that `next_batches` yields
        (callables returning numpy arrays); returns host-side metrics. `step` (default: the
        optimizer's update count) and the seed give the step's random key."""
        grads, sums, n = None, None, 0
        if self.needs_key:
            if step is None:  # mlx's optimizers count in an array, ours (sparse-adamw, adafactor) in an int
                step = int(getattr(self.optimizer.step, "item", lambda: self.optimizer.step)())
            key = step_key(self.seed, step)
            if self.ranks is not None:  # each rank its own router noise, still a function of (seed, step)
                key = mx.random.split(key, self.ranks.size)[self.ranks.rank]
        for next_batch in next_batches:
            if grads is not None:
                # Evaluate the running sum before the next micro-batch: left lazy, the whole step
                # is one graph and every micro-batch's activations are alive at once (measured:
                # 4 x 4 sequences peaked above 8 x 1), which is what accumulation is meant to avoid.
                mx.eval(grads, sums)
            batch = next_batch()  # (inputs, targets) or (inputs, targets, target mask)
            domains = batch[-1] if self.domains else None  # the inputs' domain ids, last
            batch = batch[:-1] if self.domains else batch
            args = [mx.array(batch[0]), mx.array(batch[1])]
            if self.distill:  # (inputs, targets, mask, teacher ids, log-probabilities, rest)
                args += [mx.array(a) for a in batch[2:6]]
            elif self.masked:
                args.append(mx.array(batch[2]) if len(batch) > 2 else mx.ones(batch[1].shape, mx.float32))
            if domains is not None:
                args.append(mx.array(domains))
            if self.needs_key:
                key, sub = mx.random.split(key)
                args.append(sub)
            if self.scaler is not None:
                scale = mx.array(self.scaler.scale, mx.float32)
                values, g = self._grad(*args, scale)
                values = (values[0] / scale,) + tuple(values[1:])
                g = tree_map(lambda a: a.astype(mx.float32) / scale, g)
            else:
                values, g = self._grad(*args)
            if self.trains is not None:  # frozen groups: no gradient reaches the optimizer
                g = tree_unflatten([(n, a) for n, a in tree_flatten(g) if self.trains(n)])
            values = tuple(_stack_layers(v) if isinstance(v, list) else v for v in values)
            # Low-precision gradients are summed in float32 (the update upcasts them anyway).
            grads = g if grads is None else tree_map(lambda a, b: a.astype(mx.float32) + b, grads, g)
            sums = values if sums is None else tuple(a + b for a, b in zip(sums, values))
            n += 1
        if n > 1:
            grads = tree_map(lambda g: g / n, grads)
            sums = tuple(v / n for v in sums)
        if self.ranks is not None:  # the ranks' average, identical on all: every rank decides and updates alike
            grads, sums = self.ranks.average(grads, sums)
        # Checked on the host before the update: a non-finite step must leave the weights and the
        # optimizer state (moments, step count) exactly as they were, so `apply` never runs.
        norm = self._norm(grads)
        mx.eval(grads, norm, *sums)
        finite = all(math.isfinite(v.item()) for v in (sums[0], sums[1], norm))
        total, ce, balance, z, load, entropy, drop, mean_k = sums[:8]
        rolled_back = overflow = False
        if self.scaler is not None:
            if finite:
                self.scaler.good()
            elif math.isfinite(sums[0].item()) and math.isfinite(sums[1].item()):
                overflow = self.scaler.overflowed()  # False at the smallest scale: a bad step then
        if finite:
            before = self.model.parameters(), snapshot_optimizer(self.optimizer)
            if self.sharded:  # clipped by the group's norm, which stays the logged one
                self._apply(self.ranks.clip(grads, norm, self.clip))
            else:
                norm = self._apply(grads)
            if self.router_state and self.router_trains:  # e.g. the sigmoid-bias router's balancing bias
                update_router_state(self.model, load)
            lr = self.optimizer.learning_rate  # set by the update: the rate it applied
            params, state = self.model.parameters(), self.optimizer.state
            ok = self._all_finite(float_leaves([params, state]))
            if self.sharded:  # one rank's broken expert rolls every rank back
                ok = self.ranks.all_true(ok)
            mx.eval(params, state, norm, lr, ok)
            if not ok.item():  # the update made a weight or a moment NaN/inf: undo it exactly
                self.model.update(before[0])
                restore_optimizer(self.optimizer, before[1])
                rolled_back, finite = True, False
        else:
            lr = upcoming_rate(self.optimizer)  # what the update would have applied
        out = {"loss": ce.item(), "total_loss": total.item(), "balance_loss": balance.item(),
               "z_loss": z.item(), "entropy_loss": entropy.item(), "grad_norm": norm.item(), "lr": lr.item(),
               "load": np.array(load).round(5).tolist(), "drop_rate": np.array(drop).round(5).tolist(),
               "mean_k": np.array(mean_k).round(4).tolist(), "skipped": not finite}
        if self.distill:  # "loss" stays the cross entropy, comparable with runs without a teacher
            out["kd_loss"] = sums[8].item()
        if self.domains:
            out["domain_loss"] = sums[8].item()
            if "secretary" in self.model:
                out["secretary_loss"] = sums[9].item()
                out["secretary_accuracy"] = sums[10].item() / sums[11].item() if sums[11].item() else None
        if rolled_back:
            out["rolled_back"] = True
        if self.scaler is not None:
            out["loss_scale"] = self.scaler.scale
            if overflow:
                out["overflow"] = True
        return out


def step_key(seed: int, step: int) -> mx.array:
    """The random key of one training step: a function of (seed, step) only, so a resumed run
    draws the same router noise as an uninterrupted one."""
    return mx.random.key((seed * 1_000_003 + step) % (1 << 63))


def float_leaves(tree) -> list:
    """The floating-point arrays of a tree (integer step counts cannot be non-finite)."""
    return [a for _, a in tree_flatten(tree) if mx.issubdtype(a.dtype, mx.floating)]


def all_finite(arrays: list) -> mx.array:
    """One boolean: every element of every array is finite."""
    if not arrays:
        return mx.array(True)
    return mx.all(mx.stack([mx.all(mx.isfinite(a)) for a in arrays]))


def snapshot_optimizer(optimizer):
    """What `restore_optimizer` needs to undo an update: the lean optimizers copy their own
    bookkeeping; for mlx's, a copy of the state tree's containers (the arrays are immutable)."""
    if hasattr(optimizer, "snapshot"):
        return optimizer.snapshot()
    return tree_map(lambda a: a, optimizer.state)


def restore_optimizer(optimizer, saved) -> None:
    if hasattr(optimizer, "restore"):
        optimizer.restore(saved)
        return
    # In place: a compiled update holds this very dict as its input/output state.
    _assign(optimizer.state, saved)


def _assign(live, saved) -> None:
    for key in (live.keys() if isinstance(live, dict) else range(len(live))):
        if isinstance(live[key], (dict, list)):
            _assign(live[key], saved[key])
        else:
            live[key] = saved[key]


def upcoming_rate(optimizer) -> mx.array:
    """The learning rate the optimizer's next update would apply: its schedule at its step
    count (ours keep the schedule as `schedule`, mlx's in `_schedulers`), else the fixed rate."""
    schedule = getattr(optimizer, "schedule", None) or getattr(optimizer, "_schedulers", {}).get("learning_rate")
    return mx.array(schedule(optimizer.step)) if schedule is not None else optimizer.learning_rate


def global_norm(grads) -> mx.array:
    return mx.sqrt(sum(mx.sum(mx.square(g)) for _, g in tree_flatten(grads)))
