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
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from tinymoe.config import ModelConfig, TrainConfig, to_dict
from tinymoe.data.batches import BatchSampler
from tinymoe.data.prepare import prepare_data
from tinymoe.errors import TinyMoeError
from tinymoe.jsonutil import dumps
from tinymoe.io import checkpoint, metrics_log
from tinymoe.memory_check import require_train_fits
from tinymoe.nn.model import Model, count_params
from tinymoe.optim.factory import make_optimizer
from tinymoe.train.evaluate import evaluate
from tinymoe.train.monitor import HealthMonitor
from tinymoe.train.progress import ProgressBar
from tinymoe.train.schedule import lr_schedule
from tinymoe.train.step import Stepper


class Trainer:
    def __init__(self, model_cfg: ModelConfig, train: TrainConfig, run_dir: Path, *,
                 resume: dict | None = None, progress: bool = True, keep: int = 0,
                 init: dict | None = None):
        """resume: {"manifest", "ckpt", "tokenizer", "weights", "optimizer"} from a checkpoint.
        init: {"weights", "tokenizer"}: a new run (step 0, fresh optimizer) from those weights."""
        self.train, self.run_dir, self.keep = train, Path(run_dir), keep
        mx.random.seed(train.seed)
        self.data = prepare_data(train, resume["tokenizer"] if resume else init["tokenizer"] if init else None)
        model_cfg.vocab_size = self.data.tokenizer.vocab_size
        require_train_fits(model_cfg, train)  # one line instead of a crash inside the allocator
        self.cfg = model_cfg
        self.model = Model(model_cfg, train.dispatch)
        if init:  # tinymoe train --init: start from a checkpoint's weights (e.g. an upcycled model)
            self.model.update(tree_unflatten(list(init["weights"].items())))
            mx.eval(self.model.parameters())
        self.optimizer = make_optimizer(train.optimizer, lr_schedule(train), [train.beta1, train.beta2],
                                        train.weight_decay, train.optimizer_state_dtype)
        self.optimizer.init(self.model.trainable_parameters())
        if self.data.train_tokens.size < model_cfg.context + 1:
            raise TinyMoeError(f"{', '.join(self.data.sources)}: only {self.data.train_tokens.size} training tokens "
                               f"after the validation split; one window needs context+1 = {model_cfg.context + 1}")
        self.sampler = BatchSampler(self.data.train_tokens, train.batch_size, model_cfg.context, train.seed)
        self.step, self.tokens_seen = 0, 0
        self.health = HealthMonitor(train.max_bad_steps, train.spike_factor, train.spike_window)
        self.last_checkpoint = None  # the newest checkpoint of this run: kept intact when we stop
        self.data_files = None  # the run's data record (tinymoe.data.record), stored in each manifest
        if resume:
            self._restore(resume)
        self.progress = ProgressBar(train.steps, self.step, progress, train.log_every)
        self.stepper = Stepper(self.model, self.optimizer, model_cfg, train)
        self.compiled = self.stepper.compiled

    # -- state -----------------------------------------------------------------------------
    def _restore(self, resume: dict) -> None:
        m = resume["manifest"]
        self.model.update(tree_unflatten(list(resume["weights"].items())))
        opt = {k: v for k, v in resume["optimizer"].items()}
        self.optimizer.state = tree_unflatten(list(opt.items()))
        self.step, self.tokens_seen = m["step"], m.get("tokens_seen", 0)
        self.sampler.load_state(m["data"]["sampler"])
        self.health.load_state(m.get("health", {}))
        self.last_checkpoint = resume["ckpt"]
        mx.eval(self.model.parameters(), self.optimizer.state)

    # -- loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        t = self.train
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._trim_metrics()
            metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        except OSError as exc:
            raise TinyMoeError(f"{self.run_dir}: cannot write the run directory: {exc.strerror or exc}") from None
        last, val = {}, {}
        window_start, window_tokens = time.perf_counter(), 0
        try:
            while self.step < t.steps:
                last = self.stepper.step((self.sampler.next_batch for _ in range(t.grad_accum)), self.step)
                self.step += 1
                self.tokens_seen += t.grad_accum * t.batch_size * self.cfg.context
                stop = self._observe(last)
                window_tokens += t.grad_accum * t.batch_size * self.cfg.context
                elapsed = time.perf_counter() - window_start
                tok_s = window_tokens / elapsed if elapsed > 0 else 0.0
                self.progress.update(self.step, loss=last["loss"], lr=last["lr"], **{"tok/s": round(tok_s)})
                if self.step % t.log_every == 0 or self.step == t.steps or last["skipped"] or last.get("spike"):
                    # Skipped and spike steps are always logged; NaN/inf become null (strict JSON).
                    record = {"step": self.step, **{k: v if not isinstance(v, float) or math.isfinite(v) else None
                                                    for k, v in last.items()},
                              "skipped_steps": self.health.skipped_steps, "tokens_per_s": round(tok_s, 1),
                              "tokens_seen": self.tokens_seen}
                    metrics_file.write(dumps(record) + "\n")
                    metrics_file.flush()
                    window_start, window_tokens = time.perf_counter(), 0
                if stop:
                    raise TinyMoeError(stop)
                if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps:
                    val = self.validate()
                    if val["loss"] is not None:
                        metrics_file.write(dumps({"step": self.step, **{f"val_{k}": v for k, v in val.items()}}) + "\n")
                        metrics_file.flush()
                        self.progress.message(f"step {self.step}: val loss {val['loss']:.4f} "
                                              f"bits/byte {val['bits_per_byte']:.4f}")
                # A scheduled save waits for a good step, so a checkpoint never lands inside a bad
                # streak (the final step still saves: its weights are the last good ones).
                if ((t.save_every and self.step % t.save_every == 0) and not last["skipped"]) or self.step == t.steps:
                    path = self.save({"train_loss": last["loss"] if not last["skipped"] else None,
                                      "val_loss": val.get("loss"), "val_bits_per_byte": val.get("bits_per_byte"),
                                      "skipped_steps": self.health.skipped_steps})
                    self.progress.message(f"step {self.step}: saved {path}")
        except OSError as exc:  # metrics.jsonl on a full or vanished disk (checkpoint errors are already ours)
            raise TinyMoeError(f"{exc.filename or self.run_dir}: cannot write: {exc.strerror or exc}") from None
        finally:
            metrics_file.close()
            self.progress.close()
        return {"step": self.step, "train_loss": last.get("loss"), "val_loss": val.get("loss"),
                "val_bits_per_byte": val.get("bits_per_byte"), "tokens_seen": self.tokens_seen,
                "skipped_steps": self.health.skipped_steps}

    def _observe(self, last: dict) -> str | None:
        """Count a skipped step or check a loss for a spike; the stop message after too many
        skipped steps in a row (raised by the loop once the step is logged)."""
        h = self.health
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
            return evaluate(self.model, self.data.val_tokens, self.data.tokenizer.token_byte_lengths(),
                            self.train.batch_size, self.cfg.context, self.train.eval_batches)
        finally:
            self.model.train(True)

    def save(self, metrics: dict) -> Path:
        manifest = {
            "model": to_dict(self.cfg), "train": to_dict(self.train),
            "tokenizer": self.data.tokenizer.to_manifest(), "tokens_seen": self.tokens_seen,
            "params": count_params(self.model), "dispatch": self.model.dispatch,
            "data": {"sources": self.data.sources, "domains": self.data.domain_names,
                     **({"files": self.data_files} if self.data_files is not None else {}),
                     "train_tokens": int(self.data.train_tokens.size),
                     "val_tokens": int(self.data.val_tokens.size), "sampler": self.sampler.state()},
            "metrics": metrics, "health": self.health.state(),
        }
        weights = dict(tree_flatten(self.model.parameters()))
        opt_state = dict(tree_flatten(self.optimizer.state))
        self.last_checkpoint = checkpoint.save(self.run_dir, self.step, weights, opt_state, manifest,
                                               self.data.tokenizer, self.keep)
        return self.last_checkpoint

    def _trim_metrics(self) -> None:
        """On resume, drop log lines past the resumed step (written after that checkpoint), and
        a line torn by the crash that interrupted the run (tinymoe.train.metrics_log)."""
        if self.step > 0:
            metrics_log.trim(self.run_dir / metrics_log.FILE_NAME, self.step)
