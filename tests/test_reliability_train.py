"""Numerical faults in training: non-finite steps are skipped exactly, counted, and stop the run
after too many in a row with the last good checkpoint intact; loss spikes are flagged.

Faults are injected where they arise: the gradient function's outputs (loss values and/or
gradients) are multiplied by NaN or inf for chosen steps, so everything downstream is real.
"""

import json
import math

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_map

from tinymoe.io import checkpoint
from tinymoe.cli.main import cli
from tinymoe.config import load_preset
from tinymoe.errors import TinyMoeError
from tinymoe.nn.model import Model
from tinymoe.train.monitor import HealthMonitor
from tinymoe.io.loader import load_training_state as load_resume_state
from tinymoe.train.step import Stepper
from tinymoe.train.trainer import Trainer
from tinymoe.io.validate import validate_checkpoint
from debug_run import configs, write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


def poison(stepper, when, loss=True, grads=True, value=float("nan")):
    """Make the gradient function's loss and/or gradients non-finite whenever `when()` is true."""
    real = stepper._grad

    def grad(x, y):
        values, g = real(x, y)
        if when():
            bad = mx.array(value)
            if loss:
                values = tuple(v * bad for v in values[:4]) + tuple(values[4:])
            if grads:
                g = tree_map(lambda a: a * bad, g)
        return values, g

    stepper._grad = grad


def snapshot(model, optimizer):
    return {k: np.array(v) for k, v in tree_flatten([model.parameters(), optimizer.state])}


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dispatch", ["grouped", "gather"])  # eager and compiled steps
@pytest.mark.parametrize("loss, grads, value", [(True, True, float("nan")), (False, True, float("inf")),
                                                (True, False, float("nan"))])
def test_skipped_step_leaves_weights_and_optimizer_bitwise_unchanged(debug_cfg, dispatch, loss, grads, value):
    mx.random.seed(0)
    model = Model(debug_cfg, dispatch)
    opt = optim.AdamW(learning_rate=1e-2)
    opt.init(model.trainable_parameters())
    _, train = load_preset("debug")
    stepper = Stepper(model, opt, debug_cfg, train)
    rng = np.random.default_rng(0)

    def batch():
        x = rng.integers(0, 256, (2, 16)).astype(np.int32)
        return x, np.roll(x, -1, axis=1)

    flag = {"bad": False}
    poison(stepper, lambda: flag["bad"], loss, grads, value)
    assert not stepper.step([batch])["skipped"]  # a real step first: non-trivial optimizer state
    before = snapshot(model, opt)
    flag["bad"] = True
    metrics = stepper.step([batch, batch])
    assert metrics["skipped"]
    assert not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]))
    after = snapshot(model, opt)
    assert before.keys() == after.keys()
    for name in before:
        assert np.array_equal(before[name], after[name]), name  # moments and step count too
    flag["bad"] = False
    assert not stepper.step([batch])["skipped"]
    changed = snapshot(model, opt)
    assert not np.array_equal(changed["0.embed.weight"], before["0.embed.weight"])


def test_isolated_bad_step_is_skipped_counted_and_logged(tmp_path, corpus, capsys):
    model_cfg, tr = configs(corpus, steps=6, log_every=5)
    trainer = Trainer(model_cfg, tr, tmp_path / "run", progress=True)
    poison(trainer.stepper, lambda: trainer.step + 1 == 3)
    summary = trainer.run()
    assert summary["step"] == 6 and summary["skipped_steps"] == 1
    by_step = {r["step"]: r for r in records(tmp_path / "run") if "loss" in r}
    assert sorted(by_step) == [3, 5, 6]  # the skipped step is logged although log_every is 5
    assert by_step[3]["skipped"] and by_step[3]["loss"] is None and by_step[3]["skipped_steps"] == 1
    assert not by_step[6]["skipped"] and by_step[6]["skipped_steps"] == 1 and math.isfinite(by_step[6]["loss"])
    manifest = checkpoint.read_manifest(checkpoint.resolve(tmp_path / "run"))
    assert manifest["metrics"]["skipped_steps"] == 1 and manifest["health"]["consecutive_bad"] == 0
    assert "step 3: loss nan, grad norm nan: not finite, update skipped (1 in a row, 1 in total)" in capsys.readouterr().err


def test_too_many_bad_steps_stop_with_the_last_good_checkpoint_intact(tmp_path, corpus):
    model_cfg, tr = configs(corpus, steps=10, save_every=2, max_bad_steps=3)
    run = tmp_path / "run"
    trainer = Trainer(model_cfg, tr, run, progress=False)
    poison(trainer.stepper, lambda: trainer.step + 1 >= 3)
    with pytest.raises(TinyMoeError) as info:
        trainer.run()
    message = str(info.value)
    assert "\n" not in message and message.startswith("step 5: 3 consecutive steps with a non-finite")
    assert "step-0000002 is intact" in message
    # Step 4 was a scheduled save inside the bad streak: not taken.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]
    assert validate_checkpoint(run)["valid"]
    saved = load_resume_state(run)["weights"]
    for name, arr in tree_flatten(trainer.model.parameters()):  # no update since step 2
        assert np.array_equal(np.array(saved[name]), np.array(arr)), name
    skipped = [r for r in records(run) if r.get("skipped")]
    assert [r["step"] for r in skipped] == [3, 4, 5] and skipped[-1]["skipped_steps"] == 3


def test_max_bad_steps_flag_through_the_cli(tmp_path, corpus, monkeypatch):
    real_init = Stepper.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        poison(self, lambda: True)

    monkeypatch.setattr(Stepper, "__init__", init)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--preset", "debug", "--data", str(corpus), "--steps", "6",
                                      "--max-bad-steps", "2", "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines == ["error: step 2: 2 consecutive steps with a non-finite loss, gradient or update (max_bad_steps 2); "
                     f"training stopped and no checkpoint had been saved yet; try a lower --lr ({out} was removed: "
                     f"nothing had been saved)"]
    assert not out.exists()


def test_loss_spike_is_flagged(tmp_path, corpus, capsys):
    model_cfg, tr = configs(corpus, steps=12, log_every=4)
    trainer = Trainer(model_cfg, tr, tmp_path / "run", progress=True)
    # Ten times the loss at step 9 (gradients untouched): far above 3x the recent mean.
    poison(trainer.stepper, lambda: trainer.step + 1 == 9, loss=True, grads=False, value=10.0)
    trainer.run()
    logged = {r["step"]: r for r in records(tmp_path / "run") if "loss" in r}
    assert sorted(logged) == [4, 8, 9, 12]  # the spike is logged off the log_every grid
    assert logged[9].get("spike") is True and not logged[9]["skipped"]
    assert not any(r.get("spike") for s, r in logged.items() if s != 9)
    err = capsys.readouterr().err
    assert "step 9: loss spike" in err and "3 x the recent mean" in err


def test_health_monitor_by_hand():
    h = HealthMonitor(max_bad_steps=2, spike_factor=2.0, spike_window=3)
    # Window 3 caps the history needed before judging at 3 losses.
    assert [h.good(v) for v in (4.0, 4.0, 9.0)] == [None, None, None]
    assert h.good(12.0) == pytest.approx(17 / 3)  # 12 > 2 x mean(4, 4, 9) = 11.33: a spike
    assert h.good(17.0) == pytest.approx(25 / 3)  # 17 > 2 x mean(4, 9, 12) = 16.67: a spike
    assert h.good(20.0) is None  # 20 < 2 x mean(9, 12, 17) = 25.33
    saved = json.loads(json.dumps(h.state()))
    assert saved == {"skipped_steps": 0, "consecutive_bad": 0, "recent_losses": [12.0, 17.0, 20.0]}
    assert h.bad() is False and h.bad() is True  # the second in a row reaches max_bad_steps
    h.good(1.0)
    assert h.consecutive_bad == 0 and h.skipped_steps == 2
    again = HealthMonitor(max_bad_steps=2, spike_factor=2.0, spike_window=3)
    again.load_state(saved)
    assert again.good(99.0) == pytest.approx(49 / 3)  # judged against the restored window
    off = HealthMonitor(spike_factor=0.0)
    assert all(off.good(v) is None for v in (1.0,) * 10 + (1000.0,))
    with pytest.raises(TinyMoeError, match="malformed"):
        again.load_state({"recent_losses": "many"})
