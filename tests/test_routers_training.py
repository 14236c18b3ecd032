"""Routers in training: balancing un-collapses a collapsed router, router state and noise survive
an interrupted run bit for bit, and every router works from the command line end to end."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from click.testing import CliRunner

from tinymoe.cli.main import cli
from tinymoe.config import TrainConfig, load_preset
from tinymoe.nn.moe import MoELayer
from tinymoe.io.loader import load_training_state as load_resume_state
from tinymoe.train.trainer import Trainer


def collapsed_run(router: str, aux_weight: float, steps: int = 120, **options) -> float:
    """Train one MoE layer (E=8, K=2) on a regression task, starting with a router whose logits
    put every token on experts 0 and 1 (a constant input feature with a large router weight);
    return the final load CV (std/mean of the share of slots per expert)."""
    mx.random.seed(0)
    D, E, K, T = 16, 8, 2, 256
    rng = np.random.default_rng(0)
    x = rng.normal(size=(T, D)).astype(np.float32)
    x[:, 0] = 1.0
    y = mx.array(np.tanh(x @ (rng.normal(size=(D, D)).astype(np.float32) / 4)))
    x = mx.array(x)
    layer = MoELayer(D, E, K, 8, router=router, **options)
    w = np.array(layer.router.weight) * 0.3
    w[0, 0], w[1, 0] = 4.0, 3.5
    layer.router.weight = mx.array(w)
    opt = optim.Adam(learning_rate=0.03)

    def loss_fn(x, y):
        out, stats = layer(x)
        return mx.mean((out - y) ** 2) + aux_weight * stats["balance_loss"], stats["load"]

    step = nn.value_and_grad(layer, loss_fn)
    for _ in range(steps):
        (_, load), grads = step(x, y)
        opt.update(layer, grads)
        if hasattr(layer.router, "after_step"):
            layer.router.after_step(load)
        mx.eval(layer.parameters(), opt.state)
    layer.train(False)
    load = np.array(layer(x)[1]["load"], dtype=np.float64)
    return float(load.std() / load.mean())


def test_load_balancing_loss_and_aux_free_bias_undo_a_collapsed_router():
    collapsed = np.sqrt(8 / 2 - 1)  # two experts with half the slots each
    without = collapsed_run("topk", 0.0)
    with_aux = collapsed_run("topk", 0.1)
    assert without == pytest.approx(collapsed, rel=0.02)  # the task alone never revives experts 2..7
    assert with_aux < 0.5
    without_bias = collapsed_run("sigmoid-bias", 0.0, bias_rate=0.0)
    with_bias = collapsed_run("sigmoid-bias", 0.0, bias_rate=0.02)
    assert without_bias > 1.5
    assert with_bias < 0.5


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "prose").mkdir(parents=True)
    (root / "code").mkdir()
    (root / "prose" / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    (root / "code" / "b.py").write_text("def f(x):\n    return x * 2 + 1\n\n" * 60)
    return root


def _configs(corpus, steps, router, dispatch, **model):
    cfg, tr = load_preset("debug")
    cfg = type(cfg)(**{**cfg.__dict__, "router": router, **model})
    tr = TrainConfig(**{**tr.__dict__, "steps": steps, "data": [str(corpus)], "eval_every": 0, "log_every": 1,
                        "save_every": steps // 2, "dispatch": dispatch})
    return cfg, tr


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# cpu: bitwise equality between two runs. On a GPU, MLX's scatter-add (the embedding's
# gradient, among others) sums with atomics, so the last bits of a run can vary.
@pytest.mark.cpu
@pytest.mark.parametrize("router, dispatch, model", [
    ("sigmoid-bias", "dense", {"bias_rate": 0.01}),  # frozen router state with the compiled step
    ("noisy", "grouped", {"capacity_factor": 1.0}),  # per-step keys, eager step
])
def test_resume_equals_straight_run(tmp_path, corpus, router, dispatch, model):
    N = 8
    straight = tmp_path / "straight"
    Trainer(*_configs(corpus, N, router, dispatch, **model), straight, progress=False, keep=1).run()
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000008")
    state = load_resume_state(resumed / "checkpoints" / "step-0000004")
    Trainer(*_configs(corpus, N, router, dispatch, **model), resumed, resume=state, progress=False).run()
    a, b = ([r for r in _records(d) if "loss" in r] for d in (straight, resumed))
    assert len(a) == N
    assert [(r["step"], r["loss"], r["load"]) for r in a] == [(r["step"], r["loss"], r["load"]) for r in b]
    wa, wb = load_resume_state(straight)["weights"], load_resume_state(resumed)["weights"]
    assert wa.keys() == wb.keys()
    for name in wa:
        assert np.array_equal(np.array(wa[name]), np.array(wb[name])), name
    if router == "sigmoid-bias":
        bias = np.array(wa["blocks.0.moe.router.selection_bias"])
        assert np.abs(bias).max() > 0  # it moved, in multiples of the rate
        steps = bias / 0.01
        assert np.allclose(steps, np.round(steps), atol=1e-3) and np.abs(steps).max() <= N
        opt = load_resume_state(straight)["optimizer"]
        assert not any("selection_bias" in k for k in opt)  # frozen: the optimizer never sees it
    else:
        assert all(0 < d < 1 for r in a for d in r["drop_rate"])  # capacity 1 drops a few slots
        assert all(r["mean_k"][0] < 2 for r in a)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("router, flags", [
    ("sigmoid-bias", ["--bias-rate", "0.01", "--router-groups", 2, "--router-group-topk", 1,
                      "--shared-experts", 1, "--capacity-factor", 1.25, "--eval-capacity-factor", 2]),
    ("dynamic", ["--k-min", 1, "--k-max", 3, "--dynamic-threshold", 0.6, "--entropy-weight", 0.01]),
    ("expert-choice", ["--capacity-factor", 1.0]),
    ("smart", ["--jitter-eps", 0.02, "--router-order", "topk-softmax"]),
    ("topk", ["--router-order", "topk-softmax", "--z-loss-weight", 0.01]),
    ("switch", ["--moe-topk", 1, "--jitter-eps", 0.05, "--capacity-factor", 1.25]),
    ("noisy", ["--noise-scale", 0.5, "--no-router-norm"]),
    ("jitter", ["--jitter-eps", 0.05, "--moe-experts", 8, "--moe-topk", 4, "--expert-hidden", 16]),
])
def test_cli_train_eval_inspect_sample(tmp_path, corpus, router, flags):
    out = tmp_path / "run"
    r = run("train", "--preset", "debug", "--data", corpus, "--steps", 4, "--eval-every", 4, "--router", router,
            *flags, "--out", out, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    manifest = json.loads(next((out / "checkpoints").iterdir()).joinpath("manifest.json").read_text())
    assert manifest["model"]["router"] == router
    record = [x for x in _records(out) if "loss" in x][-1]
    assert {"entropy_loss", "drop_rate", "mean_k", "load"} <= set(record) and len(record["drop_rate"]) == 2
    if router == "dynamic":
        assert all(1 <= k <= 3 for k in record["mean_k"])
    e = run("eval", out, "--max-batches", 2, "--json")
    assert e.exit_code == 0, e.output
    i = run("inspect", out, "--max-batches", 2, "--json")
    assert i.exit_code == 0, i.output
    assert all(abs(sum(layer["load"]) - 1) < 1e-3 for layer in json.loads(i.output)["layers"])
    s = run("sample", out, "--max-tokens", 4, "--seed", 0, "--json")
    if router == "expert-choice":
        assert s.exit_code == 2 and "error: router 'expert-choice' is not causal" in s.output
    else:
        assert s.exit_code == 0, s.output


def test_cli_rejects_an_unknown_router_and_misplaced_options(tmp_path):
    r = run("train", "--preset", "debug", "--router", "nope", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "error: unknown router 'nope' (choose from: topk, switch" in r.output
    r = run("train", "--preset", "debug", "--k-max", 3, "--out", tmp_path / "y")
    assert r.exit_code == 2 and "k_max applies to router dynamic, not 'topk'" in r.output


def test_compiled_step_draws_noise_from_the_step_key():
    from tinymoe.nn.model import Model
    from tinymoe.train.step import Stepper

    cfg, tr = load_preset("debug")
    cfg = type(cfg)(**{**cfg.__dict__, "router": "noisy", "noise_scale": 3.0})
    batch = np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)

    def first_loss(step):
        mx.random.seed(0)
        model = Model(cfg, "dense")  # compilable: the key is an input of the compiled step
        opt = optim.AdamW(learning_rate=1e-3)
        opt.init(model.trainable_parameters())
        stepper = Stepper(model, opt, cfg, tr)
        assert stepper.compiled and stepper.needs_key
        return stepper.step([lambda: (batch, np.roll(batch, -1, axis=1))], step)["total_loss"]

    assert first_loss(0) == first_loss(0)
    assert first_loss(0) != first_loss(1)
