"""The training loop: data, AdamW with warmup + cosine, compiled steps, eval, logs, checkpoints.

One optimizer step = `grad_accum` micro-batches of (batch_size, context) tokens. Gradients are
averaged over the micro-batches, clipped to a global norm, then AdamW updates the weights. The
update is `mx.compile`d with the model and optimizer state as explicit inputs/outputs, and so is
the forward/backward unless an MoE layer uses `grouped` dispatch (segment lengths read on the
host), which runs eagerly. The loss and gradient norm are checked on
the host before the update, and the updated weights and optimizer state after it
(tinymoe.train.step): a non-finite step is skipped or rolled back, leaving weights and optimizer
state as they were, and counted; too many in a row stop the run (tinymoe.train.monitor). A
checkpoint is never saved with NaN or inf in it (tinymoe.io.checkpoint refuses).

Everything needed to continue exactly is in the checkpoint: weights, optimizer state (incl. its
step count, which drives the learning-rate schedule) and the batch sampler's RNG state. MLX's
global RNG is used only to initialise weights (it cannot be restored), so any randomness inside a
step must come from keys derived from (seed, step). Resuming therefore reproduces the
uninterrupted run's losses bit for bit on CPU.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from tinymoe.config import ModelConfig, TrainConfig, to_dict
from tinymoe.data.batches import BatchSampler
from tinymoe.data.prepare import prepare_data
from tinymoe.data.teacher_cache import open_cache
from tinymoe.errors import TinyMoeError
from tinymoe.jsonutil import dumps
from tinymoe.io import checkpoint, metrics_log
from tinymoe.memory_check import require_train_fits
from tinymoe.nn.lora import apply_finetune, finetune_record, saved_weights
from tinymoe.nn.model import Model, count_params
from tinymoe.nn.precision import cast_model, model_dtype
from tinymoe.precision_check import checkpoint_every, uses_loss_scale
from tinymoe.optim.factory import make_optimizer
from tinymoe.train.evaluate import combine, evaluate
from tinymoe.quick import MAX_STEPS_ENV, eval_batches, stop_step
from tinymoe.train.monitor import HealthMonitor
from tinymoe.train.progress import ProgressBar
from tinymoe.stages import stage_at, to_dicts
from tinymoe.train.schedule import lr_schedule, staged_schedule
from tinymoe.train.stages import set_capacity, stage_configs, stage_sampler, stage_validation, trains_predicate
from tinymoe.train.loss_scale import LossScaler
from tinymoe.train.domains import attach_run_domains, validate_domains
from tinymoe.train.step import Stepper
from tinymoe.data.batches import ShardedSampler
from tinymoe.train.distributed import lost_peer, refuse_unsplittable, shard_experts


class Trainer:
    def __init__(self, model_cfg: ModelConfig, train: TrainConfig, run_dir: Path, *,
                 resume: dict | None = None, progress: bool = True, keep: int = 0,
                 init: dict | None = None, stages: list | None = None, ranks=None):
        """resume: {"manifest", "ckpt", "tokenizer", "weights", "optimizer"} from a checkpoint.
        init: {"weights", "tokenizer"}: a new run (step 0, fresh optimizer) from those weights.
        stages: a stage plan (tinymoe.stages) whose data specs are `train.data` and whose steps
        add up to `train.steps`.
        ranks: the data-parallel group (tinymoe.train.distributed): each rank trains on its rows of
        every batch, rank 0 alone writes; None for a single process."""
        self.train, self.run_dir, self.keep, self.stages = train, Path(run_dir), keep, stages
        self.ranks = ranks
        self.writer = ranks is None or ranks.writer
        if ranks is not None:
            refuse_unsplittable(train, stages)
        mx.random.seed(train.seed)
        self.data = prepare_data(train, resume["tokenizer"] if resume else init["tokenizer"] if init else None,
                                 model_cfg.context, separate=stages is not None)
        # A fine-tune (tinymoe.run.finetune) trains adapters on a frozen, possibly quantized base:
        # its record, stored in each of its checkpoints, rebuilds that model (tinymoe.nn.lora).
        finetune = (resume["manifest"] if resume else init or {}).get("finetune")
        if finetune is None:  # (a base's vocabulary may be padded beyond its tokenizer's: kept)
            model_cfg.vocab_size = self.data.tokenizer.vocab_size
        if finetune is None:  # full training's memory; a fine-tune's is planned by `plan --finetune`
            require_train_fits(model_cfg, train)  # one line instead of a crash inside the allocator
        self.teacher = self._open_teacher(train, model_cfg.vocab_size, stages)
        self.cfg = model_cfg
        self.model = Model(model_cfg, train.dispatch)
        # Domain experts (docs/domains.md): the mapping, the routing masks and the secretary.
        self.domains = attach_run_domains(self.model, train, self.data, stages)
        if finetune is not None:
            apply_finetune(self.model, finetune)
        if init:  # tinymoe train --init: start from a checkpoint's weights (e.g. an upcycled model)
            self.model.update(tree_unflatten(list(init["weights"].items())))
            mx.eval(self.model.parameters())
        # Mixed precision and activation checkpointing (docs/memory.md): a resumed run's saved
        # weights are already in the dtype; the routers stay float32.
        cast_model(self.model, train.dtype)
        self.model.set_checkpointing(checkpoint_every(train.checkpoint_activations, model_cfg.n_layers))
        self.scaler = LossScaler() if uses_loss_scale(train) else None
        schedule = staged_schedule(train, stages) if stages else lr_schedule(train)
        self.optimizer = make_optimizer(train.optimizer, schedule, [train.beta1, train.beta2],
                                        train.weight_decay, train.optimizer_state_dtype, train.dtype)
        self.optimizer.init(self.model.trainable_parameters())
        if self.data.train_tokens.size < model_cfg.context + 1:
            raise TinyMoeError(f"{', '.join(self.data.sources)}: only {self.data.train_tokens.size} training tokens "
                               f"after the validation split; one window needs context+1 = {model_cfg.context + 1}")
        self.stage_index = stage_at(stages, resume["manifest"]["step"] if resume else 0) if stages else None
        if stages:
            self.sampler = stage_sampler(self.data, stages[self.stage_index], self.stage_index, train.batch_size,
                                         model_cfg.context, train.seed)
        else:
            self.sampler = BatchSampler(self.data.train_tokens, train.batch_size, model_cfg.context, train.seed,
                                        self.data.train_mask if train.loss_on == "target" else None,
                                        teacher=self.teacher,
                                        domains=self.data.train_domain_ids if self.domains else None)
        if ranks is not None:  # this rank's rows of the batch one process would draw
            self.sampler = ShardedSampler(self.sampler, ranks.rank, ranks.size)
        self.step, self.tokens_seen = 0, 0
        self.health = HealthMonitor(train.max_bad_steps, train.spike_factor, train.spike_window)
        self.last_checkpoint = None  # the newest checkpoint of this run: kept intact when we stop
        self.data_files = None  # the run's data record (tinymoe.data.record), stored in each manifest
        if resume:
            self._restore(resume)
        self.progress = ProgressBar(train.steps, self.step, progress and self.writer, train.log_every)
        self.full_params = count_params(self.model)
        if ranks is not None:  # same MLX, same data, same start: else the ranks would train apart
            ranks.check_same(self._state_arrays(), "starting weights and optimizer state")
            if ranks.shards_experts:  # --expert-parallel: keep this rank's experts and their state
                shard_experts(self.model, self.optimizer, ranks, train.optimizer)
        self.stepper = self._make_stepper()
        self.compiled = self.stepper.compiled

    def _make_stepper(self) -> Stepper:
        if not self.stages:
            return Stepper(self.model, self.optimizer, self.cfg, self.train,
                           distill=self.teacher.method if self.teacher is not None else None, scaler=self.scaler,
                           ranks=self.ranks, domains=self.domains is not None)
        stage = self.stages[self.stage_index]
        set_capacity(self.model, stage.capacity_factor)
        model_cfg, train = stage_configs(self.cfg, self.train, stage)
        return Stepper(self.model, self.optimizer, model_cfg, train, trains=trains_predicate(stage), scaler=self.scaler)

    def _open_teacher(self, train: TrainConfig, vocab_size: int, stages):
        """The run's teacher cache (tinymoe.data.teacher_cache), checked against its data, or None."""
        if not train.teacher_cache:
            return None
        if stages is not None:
            raise TinyMoeError("--teacher-cache does not combine with --stages (a cache covers one training "
                               "stream; a staged run samples several)")
        cache = open_cache(train.teacher_cache)
        cache.check_run(self.data.tokenizer, self.data.train_tokens, train.val_fraction, vocab_size)
        return cache

    def _enter_stage(self, index: int) -> None:
        """From the stage before: a fresh sampler over the new stage's data and its step function."""
        self.stage_index = index
        stage = self.stages[index]
        self.sampler = stage_sampler(self.data, stage, index, self.train.batch_size, self.cfg.context,
                                     self.train.seed)
        self.stepper = self._make_stepper()
        self.progress.message(self._stage_line())

    def _stage_line(self) -> str:
        stage = self.stages[self.stage_index]
        return (f"step {self.step}: stage {self.stage_index + 1}/{len(self.stages)} '{stage.name}' ({stage.steps} "
                f"steps, train {', '.join(stage.train)}, loss on {stage.loss_on})")

    # -- state -----------------------------------------------------------------------------
    def _restore(self, resume: dict) -> None:
        m = resume["manifest"]
        self.model.update(tree_unflatten(list(resume["weights"].items())))
        opt = {k: v for k, v in resume["optimizer"].items()}
        self.optimizer.state = tree_unflatten(list(opt.items()))
        if self.stages and hasattr(self.optimizer, "_initialized"):
            # mlx's optimizers complete a restored state's tree at their first update, from the
            # gradients they get: a stage training a few groups would leave the rest incomplete.
            self.optimizer.init(self.model.trainable_parameters())
        self.step, self.tokens_seen = m["step"], m.get("tokens_seen", 0)
        saved = (m.get("distill") or {}).get("digest")
        if self.teacher is not None and saved is not None and saved != self.teacher.digest:
            raise TinyMoeError(f"teacher cache {self.teacher.path} changed since this run used it (its content "
                               f"differs from the checkpoint's record); resuming would not continue the same run")
        # A checkpoint saved at a stage's last step holds that stage's sampler: the next stage starts fresh.
        if self.stages is None or m.get("stages", {}).get("sampler_stage") == self.stage_index:
            self.sampler.load_state(m["data"]["sampler"])
        self.health.load_state(m.get("health", {}))
        if self.scaler is not None and "loss_scale" in m:
            self.scaler.load_state(m["loss_scale"])
        self.last_checkpoint = resume["ckpt"]
        mx.eval(self.model.parameters(), self.optimizer.state)

    # -- loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        t = self.train
        try:
            if self.writer:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._trim_metrics()
            metrics_file = open(self.run_dir / "metrics.jsonl" if self.writer else os.devnull, "a")
        except OSError as exc:
            raise TinyMoeError(f"{self.run_dir}: cannot write the run directory: {exc.strerror or exc}") from None
        last, val = {}, {}
        window_start, window_tokens = time.perf_counter(), 0
        if self.stages:
            self.progress.message(self._stage_line())
        try:
            stop_at = stop_step(self.step, t.steps)
            while self.step < stop_at:
                if self.stages and stage_at(self.stages, self.step) != self.stage_index:
                    self._enter_stage(stage_at(self.stages, self.step))
                last = self._step(t.grad_accum)
                self.step += 1
                self.tokens_seen += t.grad_accum * t.batch_size * self.cfg.context
                stop = self._observe(last)
                window_tokens += t.grad_accum * t.batch_size * self.cfg.context
                elapsed = time.perf_counter() - window_start
                tok_s = window_tokens / elapsed if elapsed > 0 else 0.0
                stage = {"stage": self.stages[self.stage_index].name} if self.stages else {}
                self.progress.update(self.step, **stage, loss=last["loss"], lr=last["lr"], **{"tok/s": round(tok_s)})
                if self.step % t.log_every == 0 or self.step == stop_at or last["skipped"] or last.get("spike"):
                    # Skipped and spike steps are always logged; NaN/inf become null (strict JSON).
                    record = {"step": self.step, **stage, **{k: v if not isinstance(v, float) or math.isfinite(v) else None
                                                    for k, v in last.items()},
                              "skipped_steps": self.health.skipped_steps, "tokens_per_s": round(tok_s, 1),
                              "tokens_seen": self.tokens_seen}
                    metrics_file.write(dumps(record) + "\n")
                    metrics_file.flush()
                    window_start, window_tokens = time.perf_counter(), 0
                if stop:
                    raise TinyMoeError(stop)
                if (t.eval_every and self.step % t.eval_every == 0) or self.step == stop_at:
                    # Sharded experts answer only together: then every rank validates (rank 0 writes).
                    val = self.validate() if self.writer or self.ranks.shards_experts else {}
                    if val.get("loss") is not None:
                        metrics_file.write(dumps({"step": self.step, **stage, **{f"val_{k}": v for k, v in val.items()}})
                                           + "\n")
                        metrics_file.flush()
                        self.progress.message(f"step {self.step}: val loss {val['loss']:.4f} "
                                              f"bits/byte {val['bits_per_byte']:.4f}"
                                              + (f", secretary accuracy {val['secretary_accuracy']:.3f}"
                                                 if val.get("secretary_accuracy") is not None else ""))
                # A scheduled save waits for a good step, so a checkpoint never lands inside a bad
                # streak (the final step still saves: its weights are the last good ones).
                if ((t.save_every and self.step % t.save_every == 0) and not last["skipped"]) or self.step == stop_at:
                    path = self.save({"train_loss": last["loss"] if not last["skipped"] else None,
                                      "val_loss": val.get("loss"), "val_bits_per_byte": val.get("bits_per_byte"),
                                      "skipped_steps": self.health.skipped_steps})
                    self.progress.message(f"step {self.step}: saved {path}")
        except OSError as exc:  # metrics.jsonl on a full or vanished disk (checkpoint errors are already ours)
            raise TinyMoeError(f"{exc.filename or self.run_dir}: cannot write: {exc.strerror or exc}") from None
        finally:
            metrics_file.close()
            self.progress.close()
            if self.ranks is not None:
                self.ranks.close()
        if self.step < t.steps and self.progress.enabled:
            print(f"stopped at step {self.step} of {t.steps} ({MAX_STEPS_ENV}={os.environ[MAX_STEPS_ENV]}); "
                  f"continue with: tinymoe train --resume {self.run_dir}", file=sys.stderr)
        return {"step": self.step, "train_loss": last.get("loss"), "val_loss": val.get("loss"),
                "val_bits_per_byte": val.get("bits_per_byte"), "tokens_seen": self.tokens_seen,
                "skipped_steps": self.health.skipped_steps}

    def _step(self, grad_accum: int) -> dict:
        """One optimizer step; in a data-parallel run, a lost peer becomes one line naming the
        intact checkpoint (tinymoe.train.distributed), and the watchdog learns of the progress."""
        if self.ranks is None:
            return self.stepper.step((self.sampler.next_batch for _ in range(grad_accum)), self.step)
        self.ranks.watchdog.start()
        try:
            last = self.stepper.step((self.sampler.next_batch for _ in range(grad_accum)), self.step)
        except RuntimeError as exc:
            if not lost_peer(exc):
                raise
            raise self.ranks.lost(exc, self.step + 1, self.last_checkpoint) from None
        self.ranks.watchdog.beat(self.step + 1)
        return last

    def _state_arrays(self) -> list:
        """Every weight and optimizer-state array, in a fixed order (the ranks compare them)."""
        return [a for _, a in tree_flatten([self.model.parameters(), self.optimizer.state])
                if isinstance(a, mx.array)]

    def _observe(self, last: dict) -> str | None:
        """Count a skipped step or check a loss for a spike; the stop message after too many
        skipped steps in a row (raised by the loop once the step is logged)."""
        h = self.health
        if last.get("overflow"):  # the loss scaler's probe (tinymoe.train.loss_scale), not a bad step
            self.progress.message(f"step {self.step}: float16 gradients overflowed, update skipped; loss scale "
                                  f"now {last['loss_scale']:g}")
            return None
        if not last["skipped"]:
            mean = h.good(last["loss"])
            if mean is not None:
                last["spike"] = True
                self.progress.message(f"step {self.step}: loss spike {last['loss']:.4f} "
                                      f"(over {h.spike_factor:g} x the recent mean {mean:.4f})")
            return None
        stop = h.bad()
        if last.get("rolled_back"):  # finite loss and gradient, but the update broke the weights
            what = (f"loss {last['loss']:.4f}, grad norm {last['grad_norm']:.4f}, lr {last['lr']:g}: the update "
                    f"made weights or optimizer state non-finite, rolled back")
        else:
            what = f"loss {last['loss']}, grad norm {last['grad_norm']}: not finite, update skipped"
        self.progress.message(f"step {self.step}: {what} ({h.consecutive_bad} in a row, {h.skipped_steps} in total)")
        if not stop:
            return None
        kept = (f"the last good checkpoint {self.last_checkpoint} is intact" if self.last_checkpoint
                else "no checkpoint had been saved yet")
        return (f"step {self.step}: {h.consecutive_bad} consecutive steps with a non-finite loss, gradient or "
                f"update (max_bad_steps {h.max_bad_steps}); training stopped and {kept}; try a lower --lr")

    def validate(self) -> dict:
        self.model.train(False)
        try:
            if self.domains is not None:
                return validate_domains(self.model, self.data, self.train, self.cfg.context,
                                        eval_batches(self.train.eval_batches), self.domains)
            if self.stages:  # each of the stage's data on its own, so every one is scored
                splits = stage_validation(self.data, self.stages[self.stage_index])
            else:
                splits = [(self.data.val_tokens, self.data.val_mask if self.train.loss_on == "target" else None)]
            return combine([evaluate(self.model, tokens, self.data.tokenizer.token_byte_lengths(),
                                     self.train.batch_size, self.cfg.context, eval_batches(self.train.eval_batches), mask)
                            for tokens, mask in splits])
        finally:
            self.model.train(True)

    def save(self, metrics: dict) -> Path:
        weights = saved_weights(self.model)  # a fine-tune's: its adapters only (the base is referenced)
        opt_state = dict(tree_flatten(self.optimizer.state))
        if self.ranks is not None:  # every rank: a drifted rank must not go unnoticed into a checkpoint
            try:  # sharded experts put together: the checkpoint is the single-process one
                weights, opt_state = self.ranks.gather_state(weights), self.ranks.gather_state(opt_state)
                self.ranks.check_same([a for a in [*weights.values(), *opt_state.values()] if isinstance(a, mx.array)],
                                      f"weights at step {self.step}")
            except RuntimeError as exc:
                if not lost_peer(exc):
                    raise
                raise self.ranks.lost(exc, self.step, self.last_checkpoint) from None
            if not self.writer:  # rank 0 writes it
                self.last_checkpoint = self.run_dir / "checkpoints" / checkpoint.step_dirname(self.step)
                return self.last_checkpoint
        manifest = {
            "model": to_dict(self.cfg), "train": to_dict(self.train),
            "tokenizer": self.data.tokenizer.to_manifest(), "tokens_seen": self.tokens_seen,
            "params": self.full_params, "dispatch": self.model.dispatch,
            "data": {"sources": self.data.sources, "domains": self.data.domain_names,
                     **({"files": self.data_files} if self.data_files is not None else {}),
                     "train_tokens": int(self.data.train_tokens.size),
                     "val_tokens": int(self.data.val_tokens.size), "sampler": self.sampler.state()},
            "metrics": metrics, "health": self.health.state(),
        }
        manifest["precision"] = {"dtype": model_dtype(self.model), "router_dtype": "float32",
                                 "checkpoint_activations": self.train.checkpoint_activations}
        if self.scaler is not None:
            manifest["loss_scale"] = self.scaler.state()
        if self.stages:
            manifest["stages"] = {"plan": to_dicts(self.stages), "sampler_stage": self.stage_index}
        if self.domains is not None:
            manifest["domains"] = self.domains
        if self.teacher is not None:
            manifest["distill"] = {"cache": str(self.teacher.path), "digest": self.teacher.digest,
                                   "method": self.teacher.method, "k": self.teacher.k,
                                   "teacher": self.teacher.manifest["teacher"]}
        if finetune_record(self.model) is not None:
            manifest["finetune"] = finetune_record(self.model)
        self.last_checkpoint = checkpoint.save(self.run_dir, self.step, weights, opt_state, manifest,
                                               self.data.tokenizer, self.keep)
        return self.last_checkpoint

    def _trim_metrics(self) -> None:
        """On resume, drop log lines past the resumed step (written after that checkpoint), and
        a line torn by the crash that interrupted the run (tinymoe.train.metrics_log)."""
        if self.step > 0:
            metrics_log.trim(self.run_dir / metrics_log.FILE_NAME, self.step)
