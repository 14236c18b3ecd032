"""Training: a model can overfit one batch; interrupted + resumed runs equal straight runs."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from tinymoe.config import ModelConfig, TrainConfig, load_preset
from tinymoe.nn.model import Model
from tinymoe.io.loader import load_training_state as load_resume_state
from tinymoe.train.schedule import lr_schedule
from tinymoe.train.trainer import Trainer


@pytest.fixture
def corpus(tmp_path):
    """Two small domains, enough tokens for debug-sized windows."""
    root = tmp_path / "corpus"
    (root / "prose").mkdir(parents=True)
    (root / "code").mkdir()
    (root / "prose" / "a.txt").write_text(("the quick brown fox jumps over the lazy dog. " * 60))
    (root / "code" / "b.py").write_text(("def f(x):\n    return x * 2 + 1\n\n" * 60))
    return root


@pytest.mark.parametrize("experts", [1, 4])
def test_overfits_one_batch(debug_cfg, experts):
    debug_cfg.moe_experts = experts
    mx.random.seed(0)
    model = Model(debug_cfg, "dense")
    opt = optim.Adam(learning_rate=3e-3)
    x = mx.random.randint(0, 256, (4, 32))
    y = mx.random.randint(0, 256, (4, 32))

    def loss_fn(x, y):
        return nn.losses.cross_entropy(model(x)[0], y, reduction="mean")

    step = nn.value_and_grad(model, loss_fn)
    first = None
    for _ in range(150):
        loss, grads = step(x, y)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        first = loss.item() if first is None else first
    assert first > 5.0  # ~ln(256) at init
    assert loss.item() < 0.2 * first


def test_lr_schedule_warmup_then_cosine():
    t = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    s = lr_schedule(t)
    lrs = [s(mx.array(i)).item() for i in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b - 1e-7 for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 99 / 100)), rel=1e-4)
    for warmup in (0, 1):  # edge cases: no warmup, one warmup step
        s = lr_schedule(TrainConfig(steps=5, lr=1.0, warmup_steps=warmup, min_lr_ratio=0.0))
        assert s(mx.array(0)).item() == pytest.approx(1.0)
        assert s(mx.array(5)).item() == pytest.approx(0.0, abs=1e-7)


def _configs(corpus, steps, **train):
    model, tr = load_preset("debug")
    tr = TrainConfig(**{**tr.__dict__, "steps": steps, "data": [str(corpus)], "eval_every": 0,
                        "log_every": 1, **train})
    return model, tr


def _losses(run_dir):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


# cpu: bitwise equality between two runs. On a GPU, MLX's scatter-add (the embedding's
# gradient, among others) sums with atomics, so the last bits of a run can vary.
@pytest.mark.cpu
@pytest.mark.parametrize("dispatch, grad_accum", [("grouped", 1), ("gather", 2)])
def test_resume_equals_straight_run(tmp_path, corpus, dispatch, grad_accum):
    N = 8
    model_cfg, tr = _configs(corpus, N, dispatch=dispatch, grad_accum=grad_accum, save_every=N // 2)
    straight = tmp_path / "straight"
    Trainer(model_cfg, tr, straight, progress=False, keep=1).run()
    assert (straight / "checkpoints" / "step-0000004").is_dir()
    # Resume a copy from the half-way checkpoint.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000008")
    state = load_resume_state(resumed / "checkpoints" / "step-0000004")
    model_cfg2, tr2 = _configs(corpus, N, dispatch=dispatch, grad_accum=grad_accum, save_every=N // 2)
    Trainer(model_cfg2, tr2, resumed, resume=state, progress=False).run()
    assert _losses(resumed) == _losses(straight)  # exact, step by step (metrics trimmed on resume)
    a = load_resume_state(straight)["weights"]
    b = load_resume_state(resumed)["weights"]
    for name in a:
        assert np.array_equal(np.array(a[name]), np.array(b[name])), name


def test_training_lowers_validation_loss(tmp_path, corpus):
    model_cfg, tr = _configs(corpus, 30, eval_every=30)
    summary = Trainer(model_cfg, tr, tmp_path / "run", progress=False).run()
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert train_losses[-1] < train_losses[0] - 1.0
    assert summary["val_loss"] < 4.5  # from ~ln(256) = 5.5 at init
    assert all(len(r["load"]) == 2 and len(r["load"][0]) == 4 for r in records if "load" in r)


@pytest.mark.parametrize("experts, dispatch", [(1, "grouped"), (1, "dense"), (4, "gather")])
def test_compiled_step_equals_eager_step(debug_cfg, experts, dispatch):
    """A model without MoE layers compiles whatever the dispatch (`grouped` is the CPU default);
    compiled and eager steps give the same losses. Two distinct empty per-layer statistics among
    the compiled outputs used to crash mx.compile for dense models."""
    from tinymoe.train.step import Stepper

    debug_cfg.moe_experts = experts
    _, train = load_preset("debug")
    losses = {}
    for compile in (None, False):
        mx.random.seed(0)
        model = Model(debug_cfg, dispatch)
        opt = optim.AdamW(learning_rate=1e-2)
        opt.init(model.trainable_parameters())
        stepper = Stepper(model, opt, debug_cfg, train, compile=compile)
        assert stepper.compiled == (compile is None)
        rng = np.random.default_rng(0)

        def batch():
            x = rng.integers(0, 256, (2, 16)).astype(np.int32)
            return x, np.roll(x, -1, axis=1)

        losses[compile] = [stepper.step([batch])["loss"] for _ in range(3)]
    assert losses[None][0] > losses[None][-1]  # it trains
    assert np.allclose(losses[None], losses[False], rtol=1e-5, atol=1e-6)
