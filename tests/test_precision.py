"""Mixed precision and activation checkpointing.

bfloat16/float16 steps against the float32 step from the same weights; routers float32 under
every dtype; stochastic rounding against neighbours worked out with numpy; checkpointed
gradients against plain ones for every dispatch backend; exact resume in bfloat16 and float16;
the loss scaler's overflow skip; the refusals; the planner's dtype, checkpointing and --fit.
"""

import dataclasses
import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from debug_run import configs, one_error_line, write_corpus
from tinymoe.cli.main import cli
from tinymoe.config import TrainConfig, apply_overrides, load_preset, validate
from tinymoe.io.loader import load_training_state
from tinymoe.nn.model import Model
from tinymoe.nn.precision import DTYPES, cast_model
from tinymoe.optim.factory import make_optimizer
from tinymoe.optim.rounding import stochastic_round
from tinymoe.planner import plan
from tinymoe.router_registry import ROUTERS
from tinymoe.train.loss_scale import LossScaler
from tinymoe.train.step import Stepper

BATCHES = np.random.default_rng(0).integers(0, 256, size=(4, 4, 33)).astype(np.int32)


def fresh_model(cfg, dispatch="dense", dtype="float32", seed=0):
    mx.random.seed(seed)
    model = Model(cfg, dispatch)
    cast_model(model, dtype)
    mx.eval(model.parameters())
    return model


def batch_fn(i):
    return lambda: (BATCHES[i, :, :-1], BATCHES[i, :, 1:])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("router", ROUTERS)
def test_routers_stay_float32_under_every_dtype(debug_cfg, router, dtype):
    cfg = apply_overrides(debug_cfg, {"router": router}, "test")
    model = fresh_model(cfg, dtype=dtype)
    for name, a in tree_flatten(model.parameters()):
        expected = mx.float32 if ".moe.router." in name else DTYPES[dtype]
        assert a.dtype == expected, (name, a.dtype)
    records = []
    logits, aux = model(mx.array(BATCHES[0, :, :-1]), routing=records, key=mx.random.key(1))
    assert logits.dtype == DTYPES[dtype]  # the rest of the model does run in the dtype
    assert records and all(r[k].dtype == mx.float32 for r in records for k in ("gates", "probs"))
    for name in ("balance_loss", "z_loss", "entropy_loss"):
        assert aux[name].dtype == mx.float32, name


def _neighbours(x32, dtype):
    """The representable values of `dtype` just below and above each float32, by numpy."""
    if dtype == mx.bfloat16:  # bfloat16 is float32's top 16 bits: truncation goes toward zero
        bits = x32.view(np.uint32)
        toward_zero = (bits & 0xFFFF0000).view(np.float32)
        away = ((bits & 0xFFFF0000) + 0x10000).view(np.float32)
        return np.minimum(toward_zero, away), np.maximum(toward_zero, away)
    near = x32.astype(np.float16)
    low = np.where(near.astype(np.float32) <= x32, near, np.nextafter(near, np.float16(-np.inf)))
    high = np.where(near.astype(np.float32) >= x32, near, np.nextafter(near, np.float16(np.inf)))
    return low.astype(np.float32), high.astype(np.float32)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_stochastic_rounding_picks_a_neighbour_without_bias(dtype):
    rng = np.random.default_rng(1)
    x32 = (rng.standard_normal(64) * 10.0 ** rng.integers(-3, 3, 64)).astype(np.float32)
    low, high = _neighbours(x32, dtype)
    draws = np.stack([np.array(stochastic_round(mx.array(x32), dtype, mx.random.key(i)).astype(mx.float32))
                      for i in range(400)])
    assert np.all((draws == low) | (draws == high))
    # E[result] = x: the share rounded up is (x - low) / (high - low), within 5 binomial sigmas
    p = np.where(high > low, (x32 - low) / np.where(high > low, high - low, 1), 0)
    share_up = np.mean(draws == high, axis=0) * (high > low)
    assert np.all(np.abs(share_up - p) <= 5 * np.sqrt(p * (1 - p) / 400) + 1e-6)
    exact = np.array(mx.array(low).astype(dtype).astype(mx.float32))  # representable: unchanged
    assert np.array_equal(np.array(stochastic_round(mx.array(exact), dtype, mx.random.key(9)).astype(mx.float32)),
                          exact)


def _train_steps(cfg, dtype, steps=4, scaler=None):
    model = fresh_model(cfg, dtype=dtype)
    _, train = load_preset("debug")
    train = dataclasses.replace(train, dtype=dtype)
    opt = make_optimizer("adamw", 3e-3, [0.9, 0.95], 0.1, "float32", dtype)
    opt.init(model.trainable_parameters())
    stepper = Stepper(model, opt, cfg, train, scaler=scaler)
    outs = [stepper.step([batch_fn(i % 4)], i) for i in range(steps)]
    return model, outs


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 0.03), ("float16", 0.005)])
def test_low_precision_steps_track_the_float32_steps(debug_cfg, dtype, tol):
    _, ref = _train_steps(debug_cfg, "float32")
    scaler = LossScaler() if dtype == "float16" else None
    model, low = _train_steps(debug_cfg, dtype, scaler=scaler)
    # Same initial weights up to the cast, same batches: losses within tol (relative), every step
    # taken, grad norms within 10%.
    for a, b in zip(ref, low):
        assert not b["skipped"]
        assert abs(a["loss"] - b["loss"]) <= tol * a["loss"], (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 0.1 * a["grad_norm"]
    assert model.embed.weight.dtype == DTYPES[dtype]
    assert model.blocks[0].moe.router.weight.dtype == mx.float32


def test_float16_overflow_skips_the_step_and_halves_the_scale(debug_cfg):
    scaler = LossScaler(scale=2.0**60)  # every scaled gradient overflows float16
    model = fresh_model(debug_cfg, dtype="float16")
    before = {n: np.array(a.astype(mx.float32)) for n, a in tree_flatten(model.parameters())}
    _, train = load_preset("debug")
    opt = make_optimizer("adamw", 3e-3, [0.9, 0.95], 0.1, "float32", "float16")
    opt.init(model.trainable_parameters())
    out = Stepper(model, opt, debug_cfg, dataclasses.replace(train, dtype="float16"), scaler=scaler).step(
        [batch_fn(0)], 0)
    assert out["skipped"] and out["overflow"] and np.isfinite(out["loss"]) and scaler.scale == 2.0**59
    for n, a in tree_flatten(model.parameters()):
        assert np.array_equal(np.array(a.astype(mx.float32)), before[n]), n
    assert int(opt.step.item()) == 0  # the optimizer did not count the skipped step


def _grads(model, tokens):
    def loss(x, y):
        logits, aux = model(x, key=mx.random.key(3))
        return nn.losses.cross_entropy(logits.astype(mx.float32), y, reduction="mean") + 0.01 * aux["balance_loss"]
    return nn.value_and_grad(model, loss)(mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]))


@pytest.mark.parametrize("router", ["topk", "noisy"])
@pytest.mark.parametrize("dispatch", ["dense", "gather", "grouped"])
def test_checkpointed_gradients_equal_plain_ones(debug_cfg, dispatch, router):
    cfg = apply_overrides(debug_cfg, {"n_layers": 4, "moe_every": 2, "router": router}, "test")  # dense + MoE blocks
    plain_model = fresh_model(cfg, dispatch)
    plain_loss, plain = _grads(plain_model, BATCHES[1])
    for every in (1, 2, 4):
        model = fresh_model(cfg, dispatch)
        model.set_checkpointing(every)
        loss, grads = _grads(model, BATCHES[1])
        assert np.allclose(loss.item(), plain_loss.item(), rtol=1e-6)
        flat, ref = dict(tree_flatten(grads)), dict(tree_flatten(plain))
        assert flat.keys() == ref.keys()
        for name in ref:
            assert np.allclose(np.array(flat[name]), np.array(ref[name]), rtol=1e-4, atol=1e-6), (every, name)


def test_checkpointing_composes_with_the_compiled_step(debug_cfg):
    weights = []
    for every in (0, 1):
        cfg = debug_cfg
        model = fresh_model(cfg, "gather")
        model.set_checkpointing(every)
        _, train = load_preset("debug")
        opt = make_optimizer("adamw", 3e-3, [0.9, 0.95], 0.1)
        opt.init(model.trainable_parameters())
        stepper = Stepper(model, opt, cfg, train)
        assert stepper.compiled
        for i in range(2):
            stepper.step([batch_fn(i)], i)
        weights.append(dict(tree_flatten(model.parameters())))
    for name in weights[0]:
        assert np.allclose(np.array(weights[0][name]), np.array(weights[1][name]), rtol=1e-5, atol=1e-6), name


@pytest.mark.cpu
@pytest.mark.parametrize("dtype, extra", [("bfloat16", {"checkpoint_activations": "every-layer"}),
                                          ("float16", {"optimizer": "sparse-adamw"})])
def test_low_precision_resume_is_exact(tmp_path, dtype, extra):
    from tinymoe.train.trainer import Trainer

    corpus = write_corpus(tmp_path)
    settings = {"steps": 4, "save_every": 2, "dtype": dtype, **extra}
    straight = tmp_path / "straight"
    Trainer(*configs(corpus, **settings), straight, progress=False, keep=1).run()
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000004")
    state = load_training_state(resumed / "checkpoints" / "step-0000002")
    Trainer(*configs(corpus, **settings), resumed, resume=state, progress=False).run()
    a, b = load_training_state(straight), load_training_state(resumed)
    assert a["manifest"]["precision"]["dtype"] == dtype
    assert str(a["weights"]["embed.weight"].dtype) == f"mlx.core.{dtype}"
    assert str(a["weights"]["blocks.0.moe.router.weight"].dtype) == "mlx.core.float32"
    assert a["manifest"].get("loss_scale") == b["manifest"].get("loss_scale")
    assert (dtype == "float16") == ("loss_scale" in a["manifest"])
    for part in ("weights", "optimizer"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            x, y = a[part][name], b[part][name]
            assert x.dtype == y.dtype and mx.array_equal(x, y).item(), (part, name)
    lines = lambda run: [json.loads(s)["loss"] for s in (run / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                         if '"loss"' in s]
    assert lines(straight) == lines(resumed) and len(lines(straight)) == 4


@pytest.mark.parametrize("args, fragments", [
    (["--dtype", "float16", "--loss-scale", "none"], ["float16 needs loss scaling"]),
    (["--checkpoint-activations", "every-3"], ["every-3", "only 2 layers"]),
    (["--checkpoint-activations", "sometimes"], ["unknown checkpoint_activations"]),
    (["--dtype", "bfloat16", "--optimizer-state-dtype", "bfloat16"], ["adamw keeps float32 moments"]),
])
def test_refusals_are_one_line(tmp_path, args, fragments):
    corpus = write_corpus(tmp_path)
    result = CliRunner().invoke(cli, ["train", "--preset", "debug", "--data", str(corpus), "--out",
                                      str(tmp_path / "run"), "--quiet", *args])
    one_error_line(result, *fragments)
    assert not (tmp_path / "run").exists()


def test_plan_refuses_checkpointing_beyond_the_depth():
    result = CliRunner().invoke(cli, ["plan", "--preset", "debug", "--checkpoint-activations", "every-5"])
    one_error_line(result, "only 2 layers")


def test_planner_prices_dtype_and_checkpointing():
    cfg, train = load_preset("small")
    base = plan(cfg, batch=16)
    bf16 = plan(cfg, batch=16, param_dtype="bfloat16")
    ckpt = plan(cfg, batch=16, param_dtype="bfloat16", checkpoint_every=1)
    every2 = plan(cfg, batch=16, param_dtype="bfloat16", checkpoint_every=2)
    assert bf16["bytes"]["weights"] * 2 == base["bytes"]["weights"]
    assert bf16["bytes"]["optimizer"] == base["bytes"]["optimizer"]  # float32 moments either way
    acts = [r["bytes"]["activations"] for r in (base, bf16, every2, ckpt)]
    assert acts == sorted(acts, reverse=True) and acts[-1] < acts[1] / 3


def test_fit_finds_the_widest_model_that_fits():
    from tinymoe.fit_plan import largest_that_fits, scaled

    cfg, _ = load_preset("tiny")
    cfg = apply_overrides(cfg, {"moe_experts": 16, "moe_topk": 2}, "test")
    kw = {"batch": 16, "param_dtype": "bfloat16", "checkpoint_every": 1, "usable_fraction": 0.75}
    answers = [largest_that_fits(cfg, gib, **kw) for gib in (48, 64, 128)]
    widths = [a["config"].d_model for a in answers]
    assert widths == sorted(widths) and widths[0] < widths[-1]
    for gib, a in zip((48, 64, 128), answers):
        validate(a["config"])
        assert plan(a["config"], memory_gib=gib, **kw)["fits"]
        wider = scaled(cfg, a["config"].d_model + cfg.head_dim)
        assert not plan(wider, memory_gib=gib, **kw)["fits"]
    result = CliRunner().invoke(cli, ["plan", "--fit", "48", "--moe-experts", "16", "--moe-topk", "2", "--dtype",
                                      "bfloat16", "--checkpoint-activations", "every-layer", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["model"]["d_model"] == widths[0]


def test_old_train_configs_default_to_float32():
    from tinymoe.config import from_dict, to_dict

    # a manifest's train section written before these settings existed
    saved = {k: v for k, v in to_dict(TrainConfig()).items() if k not in ("dtype", "loss_scale", "checkpoint_activations")}
    train = from_dict(TrainConfig, saved, "manifest.json")
    assert (train.dtype, train.checkpoint_activations) == ("float32", "none")
