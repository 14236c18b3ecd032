"""sparse-adamw against mlx's AdamW: equal when every expert is active, lazy state otherwise."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from tinymoe.config import TrainConfig, load_preset
from tinymoe.nn.model import Model
from tinymoe.optim.factory import make_optimizer
from tinymoe.optim.sparse_adamw import SparseAdamW
from tinymoe.io.loader import load_training_state as load_resume_state
from tinymoe.train.schedule import lr_schedule
from tinymoe.train.trainer import Trainer

E = 4


def _params():
    mx.random.seed(1)
    return {"blocks": [{"moe": {"experts": {"w_up": mx.random.normal((E, 6, 5))}},
                        "attn": {"weight": mx.random.normal((5, 5))}}],
            "norm": {"weight": mx.ones((5,))}}


def _bits(tree) -> dict:
    return {k: np.array(v).tobytes() for k, v in tree_flatten(tree)}


@pytest.mark.parametrize("bias_correction", [False, True])
def test_equals_adamw_bitwise_when_every_expert_is_active(bias_correction):
    schedule = lr_schedule(TrainConfig(steps=10, lr=1e-2, warmup_steps=3))
    ref = optim.AdamW(learning_rate=schedule, betas=[0.9, 0.95], weight_decay=0.1, bias_correction=bias_correction)
    lean = SparseAdamW(schedule, betas=(0.9, 0.95), weight_decay=0.1, bias_correction=bias_correction)
    a, b = _params(), _params()
    ref.init(a)
    lean.init(b)
    for step in range(6):
        grads = tree_map(lambda p: mx.random.normal(p.shape), a)  # no zero slices: all experts active
        assert lean.learning_rate.item() == ref.learning_rate.item()
        a = ref.apply_gradients(grads, a)
        b = tree_unflatten(list(lean.apply_gradients(grads, b).items()))
        mx.eval(a, b)
        assert _bits(a) == _bits(b), f"step {step}"  # bit for bit, not a tolerance
    assert len(lean.experts["blocks.0.moe.experts.w_up"]) == E


def test_idle_expert_gets_no_state_no_decay_no_update():
    lean = SparseAdamW(1e-2, weight_decay=0.1)
    p = _params()
    lean.init(p)
    assert lean.experts["blocks.0.moe.experts.w_up"] == {}  # nothing before any gradient
    g = tree_map(lambda x: mx.random.normal(x.shape), p)
    w = g["blocks"][0]["moe"]["experts"]["w_up"]
    g["blocks"][0]["moe"]["experts"]["w_up"] = w * (mx.arange(E) != 2)[:, None, None]  # expert 2 idle
    new = lean.apply_gradients(g, p)
    assert sorted(lean.experts["blocks.0.moe.experts.w_up"]) == [0, 1, 3]
    old_w, new_w = np.array(p["blocks"][0]["moe"]["experts"]["w_up"]), np.array(new["blocks.0.moe.experts.w_up"])
    assert np.array_equal(old_w[2], new_w[2]) and not np.array_equal(old_w[0], new_w[0])
    # AdamW, by contrast, decays the idle expert's weights.
    ref = optim.AdamW(learning_rate=1e-2, weight_decay=0.1)
    decayed = np.array(ref.apply_gradients(g, p)["blocks"][0]["moe"]["experts"]["w_up"])
    assert not np.array_equal(old_w[2], decayed[2])


@pytest.mark.parametrize("kind", ["sparse-adamw", "adafactor"])
def test_no_state_for_experts_never_routed_to_in_a_real_model(kind):
    cfg = load_preset("debug")[0]
    cfg.moe_experts, cfg.moe_topk = 8, 1
    mx.random.seed(0)
    model = Model(cfg, "grouped")
    x = mx.random.randint(0, 256, (1, 3))  # 3 tokens, top-1: at most 3 of 8 experts per layer
    y = mx.random.randint(0, 256, (1, 3))

    def loss_fn(x, y):
        logits, aux = model(x)
        return nn.losses.cross_entropy(logits, y, reduction="mean") + aux["balance_loss"], aux["load"]

    (_, loads), grads = nn.value_and_grad(model, loss_fn)(x, y)
    lean = make_optimizer(kind, 1e-3, (0.9, 0.999), 0.01, state_dtype="bfloat16")
    lean.init(model.trainable_parameters())
    lean.update(model, grads)
    for column, layer in enumerate(model.moe_layers()):
        routed = sorted(int(e) for e in np.flatnonzero(np.array(loads[column])))
        for proj in ("w_gate", "w_up", "w_down"):
            states = lean.experts[f"blocks.{layer}.moe.experts.{proj}"]
            assert sorted(states) == routed and len(routed) <= 3
            assert all(a.dtype == mx.bfloat16 for s in states.values() for k, a in s.items() if k != "t")


def _losses(run_dir):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


# cpu: bitwise equality between two runs. On a GPU, MLX's scatter-add (the embedding's
# gradient, among others) sums with atomics, so the last bits of a run can vary.
@pytest.mark.cpu
@pytest.mark.parametrize("kind", ["sparse-adamw", "adafactor"])
def test_lean_optimizer_trains_and_resumes_exactly(tmp_path, kind):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 80)
    model_cfg, tr = load_preset("debug")
    settings = {**tr.__dict__, "steps": 6, "data": [str(corpus)], "eval_every": 0, "log_every": 1,
                "save_every": 3, "optimizer": kind, "optimizer_state_dtype": "bfloat16"}
    straight = tmp_path / "straight"
    Trainer(model_cfg, TrainConfig(**settings), straight, progress=False, keep=1).run()
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000006")
    state = load_resume_state(resumed / "checkpoints" / "step-0000003")
    assert any(".expert" in k for k in state["optimizer"])
    Trainer(load_preset("debug")[0], TrainConfig(**settings), resumed, resume=state, progress=False).run()
    assert _losses(resumed) == _losses(straight)
    first, last = _losses(straight)[0][1], _losses(straight)[-1][1]
    assert last < first
