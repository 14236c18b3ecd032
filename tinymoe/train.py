"""The training loop: data, AdamW with warmup + cosine, compiled steps, eval, logs, checkpoints.

One optimizer step = `grad_accum` micro-batches of (batch_size, context) tokens. Gradients are
averaged over the micro-batches, clipped to a global norm, then AdamW updates the weights. The
update is `mx.compile`d with the model and optimizer state as explicit inputs/outputs, and so is
the forward/backward unless an MoE layer uses `grouped` dispatch (segment lengths read on the
host), which runs eagerly. The loss and gradient norm are checked on
the host before the update: a non-finite step is skipped, leaving weights and optimizer state
untouched, and counted; too many in a row stop the run (tinymoe.monitor).

Everything needed to continue exactly is in the checkpoint: weights, optimizer state (incl. its
step count, which drives the learning-rate schedule) and the batch sampler's RNG state. MLX's
global RNG is used only to initialise weights (it cannot be restored), so any randomness inside a
step must come from keys derived from (seed, step). Resuming therefore reproduces the
uninterrupted run's losses bit for bit on CPU.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from tinymoe import checkpoint
from tinymoe.config import ModelConfig, TrainConfig, to_dict
from tinymoe.data import BatchSampler, bundled_corpus_dir, read_documents, split_train_val, tokenize_documents
from tinymoe.dispatch import COMPILABLE
from tinymoe.errors import TinyMoeError
from tinymoe.evaluate import evaluate
from tinymoe.model import Model, count_params
from tinymoe.moe import has_router_state, needs_key, update_router_state
from tinymoe.monitor import HealthMonitor
from tinymoe.optimizers import make_optimizer
from tinymoe.progress import ProgressBar
from tinymoe.router_config import effective_entropy_weight
from tinymoe.tokenizer import ByteTokenizer, parse_tokenizer_spec, train_sentencepiece


def cache_dir() -> Path:
    return Path(os.environ.get("TINYMOE_CACHE", Path.home() / ".cache" / "tinymoe"))


@dataclass
class RunData:
    tokenizer: object
    train_tokens: np.ndarray  # (N_train,)
    val_tokens: np.ndarray  # (N_val,)
    domain_names: list
    sources: list
    val_domain_ids: np.ndarray | None = None  # (N_val,) index into domain_names, for routing analysis


def prepare_data(train: TrainConfig, tokenizer=None) -> RunData:
    """Read, tokenize (cached) and split the training text; train a tokenizer when asked."""
    sources = train.data or [str(bundled_corpus_dir())]
    docs = read_documents(sources)
    if tokenizer is None:
        kind, vocab = parse_tokenizer_spec(train.tokenizer)
        tokenizer = ByteTokenizer() if kind == "bytes" else train_sentencepiece([d.text for d in docs], vocab)
    data = tokenize_documents(docs, tokenizer, cache_dir() / "tokens")
    tr, va = split_train_val(data, train.val_fraction)
    return RunData(tokenizer, np.asarray(tr.tokens), np.asarray(va.tokens), data.domain_names, sources,
                   np.asarray(va.domain_ids))


def lr_schedule(train: TrainConfig):
    """Linear warmup to `lr` over `warmup_steps` (lr * (s+1) / warmup at step s), then cosine
    decay to lr * min_lr_ratio at the last step. Written out rather than joined from MLX's
    schedules so that any warmup length, 1 included, works."""
    base, end, warmup = train.lr, train.lr * train.min_lr_ratio, train.warmup_steps
    decay_steps = max(1, train.steps - warmup)

    def schedule(step):
        s = mx.array(step).astype(mx.float32)
        warm = base * (s + 1) / max(1, warmup)
        t = mx.clip((s - warmup) / decay_steps, 0.0, 1.0)
        cosine = end + (base - end) * 0.5 * (1 + mx.cos(math.pi * t))
        return mx.where(s < warmup, warm, cosine)

    return schedule


def _stack_layers(values: list) -> mx.array:
    """One per-layer statistic, (L,) or (L, E); (0,) for a model without MoE layers."""
    return mx.stack(values) if values else mx.zeros((0,))


class Stepper:
    """One optimizer step: grad_accum micro-batches, averaged grads, clip, the optimizer's update."""

    def __init__(self, model: Model, optimizer, model_cfg: ModelConfig, train: TrainConfig,
                 compile: bool | None = None):
        """compile: None compiles whenever the dispatch backend allows it; False never does."""
        self.model, self.optimizer = model, optimizer
        w_balance, w_z, clip = model_cfg.aux_loss_weight, model_cfg.z_loss_weight, train.grad_clip
        w_entropy = effective_entropy_weight(model_cfg)
        # Noisy/jittered routers get an explicit key per micro-batch (an input of the compiled step).
        self.seed, self.needs_key, self.router_state = train.seed, needs_key(model), has_router_state(model)

        def loss_fn(x, y, key=None):
            logits, aux = model(x, key=key)
            ce = nn.losses.cross_entropy(logits, y, reduction="mean")
            total = ce + w_balance * aux["balance_loss"] + w_z * aux["z_loss"]
            if w_entropy:  # the entropy bonus (tinymoe.routers.router_losses)
                total = total + w_entropy * aux["entropy_loss"]
            # Per-layer stats stay lists (empty for a dense model) and are stacked outside: two
            # distinct empty arrays among a compiled value_and_grad's outputs crash mx.compile (0.32).
            return total, ce, aux["balance_loss"], aux["z_loss"], aux["load"], aux["entropy_loss"], \
                aux["drop_rate"], aux["mean_k"]

        grad_fn = nn.value_and_grad(model, loss_fn)

        def apply(grads):
            grads, norm = optim.clip_grad_norm(grads, clip) if clip > 0 else (grads, global_norm(grads))
            optimizer.update(model, grads)
            return norm

        # The forward/backward can be traced unless an MoE layer reads its segment sizes on the host
        # (`grouped`); the update and the norm can be traced whatever the dispatch.
        traceable = model.dispatch in COMPILABLE or not model.moe_layers()
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

    def step(self, next_batches, step: int | None = None) -> dict:
        """Run one step over the (inputs, targets) micro-batches that `next_batches` yields
        (callables returning numpy arrays); returns host-side metrics. `step` (default: the
        optimizer's update count) and the seed give the step's random key."""
        grads, sums, n = None, None, 0
        if self.needs_key:
            if step is None:  # mlx's optimizers count in an array, ours (sparse-adamw, adafactor) in an int
                step = int(getattr(self.optimizer.step, "item", lambda: self.optimizer.step)())
            key = step_key(self.seed, step)
        for next_batch in next_batches:
            x, y = next_batch()
            if self.needs_key:
                key, sub = mx.random.split(key)
                values, g = self._grad(mx.array(x), mx.array(y), sub)
            else:
                values, g = self._grad(mx.array(x), mx.array(y))
            values = tuple(_stack_layers(v) if isinstance(v, list) else v for v in values)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            sums = values if sums is None else tuple(a + b for a, b in zip(sums, values))
            n += 1
        if n > 1:
            grads = tree_map(lambda g: g / n, grads)
            sums = tuple(v / n for v in sums)
        lr = self.optimizer.learning_rate.item()  # the rate this update uses (read before the update)
        # Checked on the host before the update: a non-finite step must leave the weights and the
        # optimizer state (moments, step count) exactly as they were, so `apply` never runs.
        norm = self._norm(grads)
        mx.eval(grads, norm, *sums)
        finite = all(math.isfinite(v.item()) for v in (sums[0], sums[1], norm))
        total, ce, balance, z, load, entropy, drop, mean_k = sums
        if finite:
            norm = self._apply(grads)
            if self.router_state:  # e.g. the sigmoid-bias router's balancing bias, from this step's load
                update_router_state(self.model, load)
            mx.eval(self.model.parameters(), self.optimizer.state, norm)
        return {"loss": ce.item(), "total_loss": total.item(), "balance_loss": balance.item(),
                "z_loss": z.item(), "entropy_loss": entropy.item(), "grad_norm": norm.item(), "lr": lr,
                "load": np.array(load).round(5).tolist(), "drop_rate": np.array(drop).round(5).tolist(),
                "mean_k": np.array(mean_k).round(4).tolist(), "skipped": not finite}


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
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    window_start, window_tokens = time.perf_counter(), 0
                if stop:
                    raise TinyMoeError(stop)
                if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.steps:
                    val = self.validate()
                    if val["loss"] is not None:
                        metrics_file.write(json.dumps({"step": self.step, **{f"val_{k}": v for k, v in val.items()}}) + "\n")
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
        self.progress.message(f"step {self.step}: loss {last['loss']}, grad norm {last['grad_norm']}: not finite, "
                              f"update skipped ({h.consecutive_bad} in a row, {h.skipped_steps} in total)")
        if not stop:
            return None
        kept = (f"the last good checkpoint {self.last_checkpoint} is intact" if self.last_checkpoint
                else "no checkpoint had been saved yet")
        return (f"step {self.step}: {h.consecutive_bad} consecutive steps with a non-finite loss or gradient "
                f"(max_bad_steps {h.max_bad_steps}); training stopped and {kept}; try a lower --lr")

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
        """On resume, drop log lines past the resumed step (written after that checkpoint)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists() or self.step == 0:
            return
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step]
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def step_key(seed: int, step: int) -> mx.array:
    """The random key of one training step: a function of (seed, step) only, so a resumed run
    draws the same router noise as an uninterrupted one."""
    return mx.random.key((seed * 1_000_003 + step) % (1 << 63))


def global_norm(grads) -> mx.array:
    return mx.sqrt(sum(mx.sum(mx.square(g)) for _, g in tree_flatten(grads)))


def load_resume_state(path) -> dict:
    """Everything `Trainer(resume=...)` needs, read and checked from a checkpoint."""
    from tinymoe.loader import load_training_state

    return load_training_state(path)

