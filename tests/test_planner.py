"""The planner's parameter counts against the model's actual counts, and its CLI."""

import dataclasses
import json
import re

import pytest
from click.testing import CliRunner

from tinymoe.cli.main import cli
from tinymoe.config import ModelConfig, load_preset, preset_names
from tinymoe.planner import param_counts, plan

BUILDABLE_PARAMS = 50_000_000  # larger presets are checked through a scaled-down copy


def _actual(cfg):
    from tinymoe.nn.model import Model, count_params

    return count_params(Model(cfg, "dense"))


def _scaled(cfg: ModelConfig) -> ModelConfig:
    """Same shape (layer pattern, heads ratio, experts, top-k, tying, biases), small widths."""
    return dataclasses.replace(cfg, vocab_size=97, d_model=2 * cfg.n_heads * 2, d_ff=24, expert_hidden=8,
                               n_layers=min(cfg.n_layers, 6))


@pytest.mark.parametrize("name", preset_names())
def test_param_counts_equal_the_model(name):
    cfg, _ = load_preset(name)
    if param_counts(cfg).total > BUILDABLE_PARAMS:
        cfg = _scaled(cfg)
    got, want = param_counts(cfg), _actual(cfg)
    assert (got.total, got.active) == (want["total"], want["active"])


@pytest.mark.parametrize("overrides", [
    {"moe_experts": 8, "moe_topk": 2, "moe_every": 2, "moe_first_dense": 1},
    {"moe_experts": 6, "moe_topk": 3, "tie_embeddings": False, "attn_bias": True, "expert_hidden": 40},
    {"n_kv_heads": 1, "moe_experts": 1},
])
def test_param_counts_for_layer_patterns(overrides):
    cfg = dataclasses.replace(load_preset("debug")[0], **overrides)
    got, want = param_counts(cfg), _actual(cfg)
    assert (got.total, got.active) == (want["total"], want["active"])


@pytest.mark.parametrize("router", __import__("tinymoe.router_registry", fromlist=["ROUTERS"]).ROUTERS)
def test_param_counts_for_every_router_with_shared_experts(router):
    cfg = dataclasses.replace(load_preset("debug")[0], moe_experts=6, moe_topk=2, router=router, shared_experts=2,
                              k_max=3)
    got, want = param_counts(cfg), _actual(cfg)
    assert (got.total, got.active) == (want["total"], want["active"])


def test_new_parameter_bearing_config_fields_are_counted():
    """Every ModelConfig field that changes the parameter count must be known to the planner:
    flip each numeric/bool field and compare with the built model."""
    base = dataclasses.replace(load_preset("debug")[0], moe_every=1)
    skip = {"context", "n_heads", "n_kv_heads", "moe_topk"}  # +1 breaks divisibility; covered above
    for f in dataclasses.fields(ModelConfig):
        value = getattr(base, f.name)
        if isinstance(value, bool):
            cfg = dataclasses.replace(base, **{f.name: not value})
        elif isinstance(value, int) and f.name not in skip:
            cfg = dataclasses.replace(base, **{f.name: value + 1})
        else:
            continue
        try:
            want = _actual(cfg)
        except Exception:  # a combination the model rejects
            continue
        got = param_counts(cfg)
        assert (got.total, got.active) == (want["total"], want["active"]), f.name


def test_optimizer_and_offload_change_the_right_parts():
    cfg = load_preset("olmoe-7b")[0]
    full = plan(cfg, batch=1)
    lean = plan(cfg, batch=1, optimizer="sparse-adamw", state_dtype="bfloat16", expert_state_fraction=0.5)
    assert full["bytes"]["optimizer"] == 2 * 4 * full["params"]["total"]
    assert lean["bytes"]["optimizer"] < full["bytes"]["optimizer"] / 2
    assert lean["bytes"]["weights"] == full["bytes"]["weights"]
    few = plan(cfg, mode="sample", resident_experts=8)
    assert few["bytes"]["weights"] < plan(cfg, mode="sample")["bytes"]["weights"]


def test_plan_cli_json_and_bad_input():
    runner = CliRunner()
    out = runner.invoke(cli, ["plan", "--preset", "olmoe-7b", "--mode", "sample", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert 6.5e9 < data["params"]["total"] < 7.5e9 and 1.0e9 < data["params"]["active"] < 1.5e9
    assert data["fits"] is True
    # moe-1b trains with its preset's sparse-adamw + bfloat16 state, and not with AdamW.
    text = runner.invoke(cli, ["plan", "--preset", "moe-1b"])
    assert text.exit_code == 0 and "sparse-adamw" in text.output and "\n  fits in" in text.output
    adamw = runner.invoke(cli, ["plan", "--preset", "moe-1b", "--optimizer", "adamw",
                                "--optimizer-state-dtype", "float32"])
    assert "does NOT fit" in adamw.output
    bad = runner.invoke(cli, ["plan", "--preset", "debug", "--expert-state-fraction", "2"])
    assert bad.exit_code == 2 and "error:" in bad.output


@pytest.mark.parametrize("overrides", [
    {},
    {"router": "noisy", "shared_experts": 2, "tie_embeddings": False, "attn_bias": True, "moe_first_dense": 1},
    {"router": "smart", "moe_experts": 6, "expert_hidden": 24},
    {"router": "sigmoid-bias"},  # its bias is frozen: no state
])
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_adafactor_state_bytes_equal_the_optimizer(overrides, state_dtype):
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from tinymoe.optim.adafactor import Adafactor
    from tinymoe.nn.model import Model

    cfg = dataclasses.replace(load_preset("debug")[0], **overrides)
    model = Model(cfg, "dense")
    opt = Adafactor(1e-3, state_dtype=state_dtype)
    params = model.trainable_parameters()
    opt.init(params)
    grads = tree_map(lambda p: mx.random.normal(p.shape), params)  # no zero slices: every expert active
    opt.apply_gradients(grads, params)
    statistics = {k: v for k, v in opt.state.items() if k.rsplit(".", 1)[-1] in ("vr", "vc", "v")}
    owners = {re.sub(r"(\.expert\d+)?\.(vr|vc|v)$", "", k) for k in statistics}
    assert owners == {k for k, _ in tree_flatten(params)}  # every trainable weight, nothing else
    want = sum(v.nbytes for v in statistics.values())
    assert plan(cfg, optimizer="adafactor", state_dtype=state_dtype)["bytes"]["optimizer"] == want
    assert plan(cfg, optimizer="adafactor", expert_state_fraction=0.5)["bytes"]["optimizer"] < want * (
        2 if state_dtype == "bfloat16" else 1)


def test_plan_cli_adafactor():
    runner = CliRunner()
    out = runner.invoke(cli, ["plan", "--preset", "olmoe-7b", "--optimizer", "adafactor", "--json"])
    assert out.exit_code == 0, out.output
    lean = json.loads(out.output)["bytes"]["optimizer"]
    full = json.loads(runner.invoke(cli, ["plan", "--preset", "olmoe-7b", "--json"]).output)["bytes"]["optimizer"]
    assert lean < full / 100  # rows + cols against two full moments of 7B weights
    assert "adafactor" in runner.invoke(cli, ["plan", "--preset", "debug", "--optimizer", "adafactor"]).output
