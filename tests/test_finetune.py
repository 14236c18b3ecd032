"""Fine-tuning with low-rank adapters: exactness at zero, what trains, dispatch equivalence, fused
export against mlx-lm, exact resume, router drift, the planner, and bad input.

Models are the small Hugging Face models tests/test_interop.py writes for each imported
architecture, imported as tinymoe does (`load_hf`), plus debug-size tinymoe runs for the CLI.
"""

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from debug_run import invoke as run, ok  # noqa: E402
from test_interop import build_hf_dir, tokens_for  # noqa: E402

ARCHS = {"mixtral": ("mixtral", 0), "qwen2_moe+shared": ("qwen2_moe", 1), "ernie4_5_moe+shared": ("ernie4_5_moe", 2),
         "glm4_moe": ("glm4_moe", 1)}
ALL_TARGETS = {"mixtral": ["attention", "experts", "router"],
               "qwen2_moe+shared": ["attention", "experts", "shared", "router"],
               "ernie4_5_moe+shared": ["attention", "experts", "shared", "ffn", "router"],
               "glm4_moe": ["attention", "experts", "shared", "ffn", "router"]}


def imported(tmp_path, case):
    from tinymoe.interop.import_hf import load_hf

    arch, shared = ARCHS[case]
    loaded = load_hf(build_hf_dir(tmp_path / case, arch, shared=shared, moe_ff=64))
    return loaded["cfg"], loaded["weights"]


def build(cfg, weights, dispatch="dense", bits=0):
    from tinymoe.nn.model import Model
    from tinymoe.nn.quantize import quantize_model

    model = Model(cfg, dispatch)
    model.update(tree_unflatten(list(weights.items())))
    if bits:
        quantize_model(model, bits, 32)
    model.train(False)
    return model


def randomize_adapters(model, seed=5, scale=0.05):
    rng = np.random.default_rng(seed)
    params = tree_flatten(model.trainable_parameters())
    model.update(tree_unflatten([(k, mx.array((rng.standard_normal(v.shape) * scale).astype(np.float32)))
                                 for k, v in params]))


# ----------------------------------------------------------------------------- the adapted model


@pytest.mark.parametrize("bits", [0, 4])
@pytest.mark.parametrize("case", list(ARCHS))
def test_fresh_adapters_leave_every_logit_unchanged(tmp_path, case, bits):
    from tinymoe.nn.lora import attach

    cfg, weights = imported(tmp_path, case)
    tokens = tokens_for(cfg.vocab_size)
    for dispatch in ("dense", "gather", "grouped"):
        model = build(cfg, weights, dispatch, bits)
        before = model(tokens)[0]
        attach(model, 4, 8.0, ALL_TARGETS[case])
        after = model(tokens)[0]
        assert mx.array_equal(before, after), (case, dispatch)  # B = 0: exactly the base, bit for bit


@pytest.mark.parametrize("case", list(ARCHS))
def test_adapted_experts_equal_the_merged_reference_forward_and_backward(tmp_path, case):
    """Sparse backends (low-rank gather_mm over the routed rows) against `dense`, which runs the
    merged weights W + s B A on every expert: the loss and every adapter gradient agree."""
    from tinymoe.nn.lora import attach

    cfg, weights = imported(tmp_path, case)
    tokens = tokens_for(cfg.vocab_size)
    results = {}
    for dispatch in ("dense", "gather", "grouped"):
        model = build(cfg, weights, dispatch)
        model.train(True)
        attach(model, 4, 8.0, ALL_TARGETS[case])
        randomize_adapters(model)

        def loss(x, y):
            logits, aux = model(x)
            return nn.losses.cross_entropy(logits, y, reduction="mean") + 0.01 * aux["balance_loss"]

        value, grads = nn.value_and_grad(model, loss)(tokens[:, :-1], tokens[:, 1:])
        results[dispatch] = (value.item(), dict(tree_flatten(grads)))
    ref_value, ref = results["dense"]
    assert any("experts.w_up_lora_b" in k for k in ref)
    for dispatch in ("gather", "grouped"):
        value, grads = results[dispatch]
        assert abs(value - ref_value) < 1e-5
        assert set(grads) == set(ref)
        worst = max(float(mx.max(mx.abs(grads[k] - ref[k])).item()) for k in ref)
        assert worst < 1e-4, (dispatch, worst)


@pytest.mark.parametrize("router_mode", ["lora", "full", "frozen"])
def test_only_adapters_and_the_chosen_router_change(tmp_path, router_mode):
    import dataclasses

    from tinymoe.config import TrainConfig
    from tinymoe.nn.lora import attach, saved_names
    from tinymoe.optim.factory import make_optimizer
    from tinymoe.train.step import Stepper

    cfg, weights = imported(tmp_path, "qwen2_moe+shared")
    model = build(cfg, weights, "grouped", bits=4)
    model.train(True)
    targets = ["attention", "experts", "shared"] + (["router"] if router_mode == "lora" else [])
    attach(model, 4, 8.0, targets, router_mode)
    before = dict(tree_flatten(model.parameters()))
    train = dataclasses.replace(TrainConfig(), lr=1e-2, warmup_steps=0, steps=3)
    opt = make_optimizer("adamw", 1e-2, [0.9, 0.95], 0.0, "float32")
    opt.init(model.trainable_parameters())
    stepper = Stepper(model, opt, cfg, train)
    rng = np.random.default_rng(0)
    for step in range(3):
        batch = rng.integers(0, cfg.vocab_size, size=(2, 17))
        stepper.step([lambda: (batch[:, :-1], batch[:, 1:])], step)
    after = dict(tree_flatten(model.parameters()))
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    changed = {k for k in before if not mx.array_equal(before[k], after[k])}
    assert changed == trainable  # every adapter moved, nothing else did
    routers = {k for k in before if ".moe.router." in k}
    if router_mode == "full":
        assert {k for k in routers if k.endswith(".weight")} <= changed
    else:
        assert not (routers - {k for k in routers if "lora" in k}) & changed
    assert saved_names(model) >= trainable


def test_fused_model_and_drift(tmp_path):
    from tinymoe.analysis.drift import routing_drift
    from tinymoe.nn.lora import attach, fused_model

    cfg, weights = imported(tmp_path, "mixtral")
    tokens = tokens_for(cfg.vocab_size)
    base = build(cfg, weights, "grouped")
    tuned = build(cfg, weights, "grouped")
    attach(tuned, 4, 8.0, ALL_TARGETS["mixtral"])
    same = routing_drift(tuned, base, np.array(tokens).reshape(-1), 2, 16)
    assert all(layer["topk_changed"] == 0 and layer["max_load_change"] == 0 for layer in same["layers"])
    randomize_adapters(tuned)
    fused = fused_model(tuned)
    assert not any("lora" in k for k, _ in tree_flatten(fused.parameters()))
    assert float(mx.max(mx.abs(fused(tokens)[0] - tuned(tokens)[0])).item()) < 1e-4
    randomize_adapters(tuned, scale=0.5)  # large enough to move the routers
    moved = routing_drift(tuned, base, np.array(tokens).reshape(-1), 2, 16)
    assert any(layer["topk_changed"] > 0 for layer in moved["layers"])
    for layer in moved["layers"]:
        assert abs(sum(layer["tuned_load"]) - 1) < 1e-4 and abs(sum(layer["load_change"])) < 1e-4


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """An imported Qwen2-MoE (with a shared expert and q/k/v biases) as a tinymoe run."""
    root = tmp_path_factory.mktemp("ft")
    src = build_hf_dir(root / "hf", "qwen2_moe", shared=1, moe_ff=64)
    ok("import", src, "--out", root / "base")
    return root / "base"


def _finetune(base, out, *extra):
    return ok("finetune", base, "--data", "tinymoe/corpus/prose", "--lora-rank", 4, "--context", 32,
              "--batch-size", 2, "--lr", 1e-2, "--warmup-steps", 1, "--eval-every", 0, "--quiet", "--json",
              "--out", out, *extra)


def test_finetune_export_fuse_loads_in_mlx_lm_with_equal_logits(base_run, tmp_path):
    mlx_lm = pytest.importorskip("mlx_lm")
    from tinymoe.io.loader import load_model

    _finetune(base_run, tmp_path / "ft", "--steps", 3, "--lora-targets", "attention,experts,shared,router")
    manifest = json.loads(next((tmp_path / "ft" / "checkpoints").glob("step-*/manifest.json")).read_text())
    assert manifest["finetune"]["base"]["digest"] and all("lora" in k or ".router." in k for k in manifest["tensors"]
                                                           if not k.startswith("optimizer."))
    report = json.loads(ok("export", tmp_path / "ft", "--fuse", "--out", tmp_path / "hf", "--json").output)
    assert report["architecture"] == "qwen2_moe" and report["mlx_lm_max_abs_logit_diff"] < 1e-4
    tuned = load_model(tmp_path / "ft")[0]
    theirs, _ = mlx_lm.load(str(tmp_path / "hf"))
    tokens = tokens_for(tuned.cfg.vocab_size)
    tuned.train(False)
    assert float(mx.max(mx.abs(tuned(tokens)[0] - theirs(tokens))).item()) < 1e-4
    base = load_model(base_run)[0]
    base.train(False)
    assert float(mx.max(mx.abs(base(tokens)[0] - tuned(tokens)[0])).item()) > 1e-3  # the adapters did something


def test_qlora_resume_is_exact(base_run, tmp_path, monkeypatch):
    from tinymoe.io.loader import load_model

    ok("quantize", base_run, "--bits", 4, "--group-size", 32, "--out", tmp_path / "q4")
    _finetune(tmp_path / "q4", tmp_path / "whole", "--steps", 4)
    monkeypatch.setenv("TINYMOE_MAX_STEPS", "2")
    _finetune(tmp_path / "q4", tmp_path / "split", "--steps", 4)
    monkeypatch.delenv("TINYMOE_MAX_STEPS")
    ok("finetune", "--resume", tmp_path / "split", "--quiet")
    whole, split = (dict(tree_flatten(load_model(tmp_path / r)[0].parameters())) for r in ("whole", "split"))
    assert set(whole) == set(split) and all(mx.array_equal(whole[k], split[k]) for k in whole)
    log = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r][-1] == 4 and all("load" in r for r in log if "loss" in r)
    report = json.loads(ok("inspect", tmp_path / "split", "--json", "--max-batches", 2).output)
    assert report["finetune"]["rank"] == 4 and len(report["drift"]["layers"]) == len(report["layers"])


def test_bad_input_exits_2_with_one_line(base_run, tmp_path):
    _finetune(base_run, tmp_path / "ft", "--steps", 1)
    other = tmp_path / "other"
    ok("train", "--preset", "debug", "--moe-experts", 4, "--moe-topk", 2, "--steps", 1, "--quiet", "--out", other)
    cases = [
        ("finetune", base_run, "--lora-targets", "attention,mlp", "--out", tmp_path / "a"),
        ("finetune", base_run, "--lora-rank", 64, "--out", tmp_path / "b"),
        ("finetune", base_run, "--lora-targets", "experts", "--lora-rank", 8, "--full-router", "--out", tmp_path / "c",
         "--lora-alpha", 0),
        ("finetune", other, "--lora-targets", "shared", "--out", tmp_path / "d"),
        ("finetune", tmp_path / "ft", "--out", tmp_path / "e"),  # adapters on adapters
        ("export", tmp_path / "ft", "--out", tmp_path / "f"),  # adapters need --fuse
        ("export", tmp_path / "ft", "--fuse", "--base", other, "--out", tmp_path / "g"),  # another base
        ("export", other, "--fuse", "--out", tmp_path / "h"),
    ]
    for args in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.output)
    assert "another base model" in run(*cases[6]).output
    assert not any((tmp_path / n).exists() for n in "abcdefgh")


# ----------------------------------------------------------------------------- the planner


@pytest.mark.parametrize("case", list(ARCHS))
def test_planner_counts_match_the_built_model(tmp_path, case):
    from tinymoe.finetune_plan import adapter_params, counts, shape_from_config, shape_from_hf
    from tinymoe.nn.lora import attach
    from tinymoe.nn.model import count_params

    cfg, weights = imported(tmp_path, case)
    model = build(cfg, weights)
    shape = shape_from_config(cfg)
    assert counts(shape)["total"] == count_params(model)["total"]
    assert counts(shape)["active"] == count_params(model)["active"]
    attach(model, 4, 8.0, ALL_TARGETS[case])
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    assert adapter_params(shape, 4, ALL_TARGETS[case]) == trainable
    if case == "mixtral":  # the HF config alone gives the same shape's count
        hf = json.loads((tmp_path / case / "config.json").read_text())
        assert counts(shape_from_hf(hf))["total"] == count_params(build(cfg, weights))["total"]


def test_plan_command_on_published_configs_and_checkpoints(base_run):
    rows = json.loads(ok("plan", "--published", "--json").output)
    assert [r["model"] for r in rows] == ["olmoe-1b-7b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "mixtral-8x7b"]
    for r in rows:  # quantizing and adapters can only shrink what must be held
        assert r["sample_4bit"]["gib"] < r["sample_float32"]["gib"] and r["qlora_4bit"]["gib"] < r["lora_float32"]["gib"]
    plan = json.loads(ok("plan", "--from", base_run, "--finetune", "lora", "--lora-rank", 4, "--json").output)
    assert plan["params"]["adapters"] > 0 and plan["bytes"]["activations"] > 0
    assert run("plan", "--from", base_run, "--finetune", "lora", "--lora-targets", "nope").exit_code == 2


def test_finetune_plan_tracks_the_measured_peak_where_activations_dominate(tmp_path):
    """The calibrated activation term (finetune_plan.ACTIVATION_CALIBRATION) against MLX's peak on
    a model whose activations outweigh its weights; without the factor the plan is ~2x low."""
    import mlx.core as mx

    from tinymoe.finetune_plan import ACTIVATION_CALIBRATION, plan_finetune, shape_from_config
    from tinymoe.io.reader import open_checkpoint
    from tinymoe.run.finetune import new_finetune

    ok("train", "--preset", "tiny", "--moe-experts", 8, "--moe-topk", 2, "--steps", 1, "--batch-size", 1,
       "--context", 128, "--set", "eval_batches=1", "--quiet", "--out", tmp_path / "base")
    batch, context = 8, 128
    prepared = new_finetune(tmp_path / "base", tmp_path / "ft", rank=8, alpha=16,
                            targets=["attention", "experts", "router"], model_over={"context": context},
                            train_over={"steps": 2, "batch_size": batch, "eval_every": 0, "eval_batches": 1},
                            progress=False)
    mx.eval(prepared.trainer.model.parameters())
    mx.reset_peak_memory()
    prepared.train()
    peak = mx.get_peak_memory()
    cfg = open_checkpoint(tmp_path / "base", "auto").cfg
    cfg.context = context
    plan = plan_finetune(shape_from_config(cfg), rank=8, batch=batch, context=context)
    assert abs(plan["total_bytes"] - peak) / peak < 0.2, (plan["total_bytes"], peak)
    uncalibrated = plan["total_bytes"] - plan["bytes"]["activations"] * (1 - 1 / ACTIVATION_CALIBRATION)
    assert uncalibrated < 0.75 * peak  # the factor is needed, not decoration
