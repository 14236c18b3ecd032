"""The numerical guard: an update that makes weights or optimizer state non-finite is rolled back
exactly and counted as a skipped step; a non-finite state is never saved; the logged learning
rate is the one the step applied.

The guard is tested below the CLI, whose settings check refuses non-finite hyperparameters up
front: here the optimizer or TrainConfig is built directly, as a library caller (or a schedule
that overflows) could.
"""

import math

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tinymoe.config import TrainConfig, load_preset
from tinymoe.errors import CheckpointError
from tinymoe.io import checkpoint
from tinymoe.io.validate import validate_checkpoint
from tinymoe.nn.model import Model
from tinymoe.optim.adafactor import Adafactor
from tinymoe.optim.sparse_adamw import SparseAdamW
from tinymoe.train.step import Stepper
from tinymoe.train.trainer import Trainer
from debug_run import configs, write_corpus

INF, NAN = float("inf"), float("nan")


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


def snapshot(model, optimizer):
    """Every weight and optimizer array as raw bytes (bitwise comparison, NaN-safe)."""
    out = {}
    for k, v in tree_flatten([model.parameters(), optimizer.state]):
        v = v.view(mx.uint16) if v.dtype == mx.bfloat16 else v
        out[k] = np.array(v).tobytes()
    return out


def batch_source(seed=0):
    rng = np.random.default_rng(seed)

    def batch():
        x = rng.integers(0, 256, (2, 16)).astype(np.int32)
        return x, np.roll(x, -1, axis=1)

    return batch


def inf_from_step_1(step):
    """A schedule that is fine for the first update and infinite afterwards."""
    return mx.where(mx.array(step) >= 1, mx.array(INF), mx.array(1e-2))


OPTIMIZERS = {
    "adamw": lambda lr, wd: optim.AdamW(learning_rate=lr, weight_decay=wd),
    "sparse-adamw": lambda lr, wd: SparseAdamW(lr, weight_decay=wd),
    "adafactor": lambda lr, wd: Adafactor(lr, weight_decay=wd),
}


@pytest.mark.parametrize("dispatch", ["gather", "grouped"])  # compiled and eager forward/backward
@pytest.mark.parametrize("kind", list(OPTIMIZERS))  # compiled update (adamw) and eager (the lean ones)
@pytest.mark.parametrize("fault", ["lr=inf", "weight_decay=nan"])
def test_an_update_that_breaks_the_weights_is_rolled_back_bitwise(debug_cfg, dispatch, kind, fault):
    # Before: the loss and gradient were finite, so the update ran and every weight became NaN.
    mx.random.seed(0)
    model = Model(debug_cfg, dispatch)
    lr, wd = (inf_from_step_1, 0.01) if fault == "lr=inf" else (1e-2, NAN)
    opt = OPTIMIZERS[kind](lr, wd)
    opt.init(model.trainable_parameters())
    _, train = load_preset("debug")
    stepper = Stepper(model, opt, debug_cfg, train)
    batch = batch_source()
    if fault == "lr=inf":
        assert not stepper.step([batch])["skipped"]  # a real update first: non-trivial state
    before = snapshot(model, opt)
    out = stepper.step([batch])
    assert out["skipped"] and out["rolled_back"]
    assert math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])
    after = snapshot(model, opt)
    assert before.keys() == after.keys()
    for name in before:
        assert before[name] == after[name], name  # weights, moments and the step count
    if fault == "weight_decay=nan":  # the guard keeps catching it, step after step
        assert stepper.step([batch])["rolled_back"] and snapshot(model, opt) == before


def test_a_good_step_is_not_rolled_back(debug_cfg):
    mx.random.seed(0)
    model = Model(debug_cfg, "gather")
    opt = optim.AdamW(learning_rate=1e-2)
    opt.init(model.trainable_parameters())
    stepper = Stepper(model, opt, debug_cfg, load_preset("debug")[1])
    before = snapshot(model, opt)
    out = stepper.step([batch_source()])
    assert not out["skipped"] and "rolled_back" not in out
    assert snapshot(model, opt)["0.embed.weight"] != before["0.embed.weight"]


def saved_weights(run):
    found = {}
    for ckpt in sorted((run / "checkpoints").iterdir()):
        manifest = checkpoint.read_manifest(ckpt)
        found[ckpt.name] = checkpoint.load_tensors(ckpt, manifest)
    return found


def test_a_run_with_nan_weight_decay_never_saves_nan_weights(tmp_path, corpus, capsys):
    # Before: every step "succeeded", the weights were all NaN, and they were saved as the latest.
    model_cfg, tr = configs(corpus, steps=3, save_every=1, max_bad_steps=10, weight_decay=NAN)
    trainer = Trainer(model_cfg, tr, tmp_path / "run", progress=True)
    initial = {k: np.array(v) for k, v in tree_flatten(trainer.model.parameters())}
    summary = trainer.run()
    assert summary["skipped_steps"] == 3
    assert "made weights or optimizer state non-finite, rolled back (3 in a row, 3 in total)" in capsys.readouterr().err
    for name, tensors in saved_weights(tmp_path / "run").items():
        for key, arr in tensors.items():
            assert np.isfinite(np.array(arr.astype(mx.float32))).all(), (name, key)
    # (validate still objects to the saved train config: its weight_decay is not a number)
    assert not any("NaN or inf" in p for p in validate_checkpoint(tmp_path / "run")["problems"])
    for name, arr in tree_flatten(trainer.model.parameters()):
        assert np.array_equal(np.array(arr), initial[name]), name


def test_too_many_rolled_back_steps_stop_the_run(tmp_path, corpus):
    from tinymoe.errors import TinyMoeError

    model_cfg, tr = configs(corpus, steps=10, max_bad_steps=2, weight_decay=NAN)
    with pytest.raises(TinyMoeError, match=r"^step 2: 2 consecutive steps with a non-finite loss, gradient or update"):
        Trainer(model_cfg, tr, tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_non_finite_state_is_never_saved(tmp_path, corpus):
    model_cfg, tr = configs(corpus, steps=2)
    trainer = Trainer(model_cfg, tr, tmp_path / "run", progress=False)
    trainer.run()
    latest = (tmp_path / "run" / "latest").read_text()
    w = trainer.model.blocks[0].attn.wq.weight
    trainer.model.blocks[0].attn.wq.weight = mx.where(mx.arange(w.shape[1]) == 3, mx.array(INF), w)
    trainer.step = 3
    with pytest.raises(CheckpointError) as info:
        trainer.save({})
    message = str(info.value)
    assert "\n" not in message and "step-0000003: refusing to save: weight 'blocks.0.attn.wq.weight' holds NaN or inf" \
        in message
    assert (tmp_path / "run" / "latest").read_text() == latest
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000002"]
    with pytest.raises(CheckpointError, match="optimizer state 'learning_rate' holds NaN"):
        checkpoint.save(tmp_path / "other", 1, {"w": np.ones(2, np.float32)},
                        {"learning_rate": np.array(NAN, np.float32)}, {"model": {}, "tokenizer": {}})


def expected_lr(tr: TrainConfig, s: int) -> float:
    """The warmup + cosine schedule at update s, worked out independently of tinymoe.train.schedule."""
    if s < tr.warmup_steps:
        return tr.lr * (s + 1) / tr.warmup_steps
    t = min(1.0, (s - tr.warmup_steps) / max(1, tr.steps - tr.warmup_steps))
    end = tr.lr * tr.min_lr_ratio
    return end + (tr.lr - end) * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("optimizer", ["adamw", "sparse-adamw", "adafactor"])
def test_the_logged_learning_rate_is_the_one_applied(tmp_path, corpus, optimizer):
    # Before: the rate was read before the update, which is when the optimizer still holds the
    # previous step's: every logged rate was one step late (lr(0) logged for steps 1 and 2).
    import json

    model_cfg, tr = configs(corpus, steps=8, warmup_steps=4, lr=1e-2, optimizer=optimizer)
    Trainer(model_cfg, tr, tmp_path / "run", progress=False).run()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in logged if "lr" in r}
    assert sorted(logged) == list(range(1, 9))
    for step, lr in logged.items():  # the record of step N is written after update N-1 (0-based)
        assert lr == pytest.approx(expected_lr(tr, step - 1), rel=1e-6), step


def test_a_skipped_step_logs_the_rate_it_would_have_applied(debug_cfg):
    _, train = load_preset("debug")
    train = TrainConfig(**{**train.__dict__, "warmup_steps": 4, "lr": 1e-2})
    from tinymoe.train.schedule import lr_schedule

    mx.random.seed(0)
    model = Model(debug_cfg, "gather")
    opt = optim.AdamW(learning_rate=lr_schedule(train))
    opt.init(model.trainable_parameters())
    stepper = Stepper(model, opt, debug_cfg, train)
    assert stepper.step([batch_source()])["lr"] == pytest.approx(expected_lr(train, 0))
    real = stepper._grad
    stepper._grad = lambda x, y: (lambda v, g: ((v[0] * NAN, *v[1:]), g))(*real(x, y))
    out = stepper.step([batch_source()])
    assert out["skipped"] and out["lr"] == pytest.approx(expected_lr(train, 1))
