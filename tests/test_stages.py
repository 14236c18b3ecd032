"""Training stages: the plan's checks, frozen groups left bit-identical, transitions at the right
step with each stage's learning rate, exact resume inside and between stages, and the rules for a
stage file changed on resume."""

import json
import math
import re

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from tinymoe.cli.main import cli
from tinymoe.config import load_preset
from tinymoe.errors import TinyMoeError
from tinymoe.io.loader import load_training_state
from tinymoe.nn.model import Model
from tinymoe.run.lifecycle import new_run, resume_run
from tinymoe.stages import group_of, load_stages

FOX = "the quick brown fox jumps over the lazy dog. "


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "prose.txt").write_text(FOX * 120)
    qa = [{"prompt": f"Add {i % 9} and {i % 5}.", "completion": str(i % 9 + i % 5)} for i in range(200)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    return tmp_path


def stage_file(folder, first_train='["router"]', second_steps=3, extra=""):
    path = folder / "stages.toml"
    path.write_text(f'''
[[stage]]
name = "observe"
steps = 3
data = ["{folder / 'prose.txt'}"]
train = {first_train}
warmup = 1
[[stage]]
name = "act"
steps = {second_steps}
data = ["{folder / 'prose.txt'}", "{folder / 'qa.jsonl'}"]
weights = [1, 3]
lr_scale = 0.5
warmup = 1
loss_on = "target"
aux_loss_weight = 0.05
{extra}''')
    return path


def configs(**train):
    model, tr = load_preset("debug")
    return model, tr.__class__(**{**tr.__dict__, "eval_every": 0, "log_every": 1, **train})


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_weight_is_in_exactly_one_group():
    cfg, _ = load_preset("debug")
    cfg.shared_experts, cfg.tie_embeddings, cfg.moe_first_dense = 1, False, 1
    names = [n for n, _ in tree_flatten(Model(cfg).parameters())]
    groups = {n: group_of(n) for n in names}
    assert groups["blocks.1.moe.router.weight"] == "router"
    assert groups["blocks.1.moe.experts.w_up"] == "experts"
    assert groups["blocks.1.moe.shared.w_up.weight"] == "shared"
    assert groups["blocks.0.ffn.w_up.weight"] == "ffn" and groups["blocks.1.ffn_norm.weight"] == "ffn"
    assert groups["blocks.0.attn.wq.weight"] == "attention" and groups["blocks.0.attn_norm.weight"] == "attention"
    assert groups["embed.weight"] == groups["lm_head.weight"] == groups["norm.weight"] == "embeddings"


@pytest.mark.parametrize("optimizer", ["adamw", "sparse-adamw", "adafactor"])
def test_frozen_groups_are_bit_identical_after_a_stage(files, optimizer):
    run = files / "run"
    prepared = new_run(*configs(optimizer=optimizer, save_every=3, weight_decay=0.5), run, progress=False, keep=5,
                       stages_file=str(stage_file(files)))
    before = {n: np.array(a) for n, a in tree_flatten(prepared.trainer.model.parameters())}
    opt_before = {n: np.array(a) for n, a in tree_flatten(prepared.trainer.optimizer.state)}
    prepared.train()
    after = load_training_state(run / "checkpoints" / "step-0000003")
    changed = {n for n, a in after["weights"].items() if not np.array_equal(np.array(a), before[n])}
    assert changed == {n for n in before if group_of(n) == "router"}  # the router moved, nothing else
    state = {n: np.array(a) for n, a in after["optimizer"].items()}
    for name, value in opt_before.items():  # no state of a frozen weight changed
        param = name.rsplit(".", 1)[0]
        if param in before and group_of(param) != "router":
            assert np.array_equal(state[name], value), name
    if optimizer != "adamw":  # lazy state: no expert ever received a gradient, so none has state
        assert not [n for n in state if re.search(r"\.moe\.experts\.\w+\.expert\d+\.", n)]
    final = load_training_state(run)["weights"]
    assert not np.array_equal(np.array(final["embed.weight"]), before["embed.weight"])  # stage 2 trains all


def staged_lr(step, lr, min_ratio):
    """The rate of global step `step` (0-based) for the plan of `stage_file`, worked out by hand."""
    first, steps, scale, local = (0, 3, 1.0, step) if step < 3 else (3, 3, 0.5, step - 3)
    base = lr * scale
    if local < 1:
        return base * (local + 1) / 1
    t = min(1.0, (local - 1) / (steps - 1))
    return base * min_ratio + (base - base * min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def test_stages_change_at_the_right_step(files):
    run = files / "run"
    model_cfg, train_cfg = configs()
    prepared = new_run(model_cfg, train_cfg, run, progress=False, stages_file=str(stage_file(files)))
    assert prepared.trainer.train.steps == 6
    prepared.train()
    rows = [r for r in records(run) if "loss" in r]
    assert [(r["step"], r["stage"]) for r in rows] == [(1, "observe"), (2, "observe"), (3, "observe"),
                                                        (4, "act"), (5, "act"), (6, "act")]
    for r in rows:
        assert r["lr"] == pytest.approx(staged_lr(r["step"] - 1, train_cfg.lr, train_cfg.min_lr_ratio), rel=1e-5)
    val = [r for r in records(run) if "val_loss" in r]
    assert val[-1]["stage"] == "act" and val[-1]["val_loss_on"] == "target"
    out = CliRunner().invoke(cli, ["inspect", str(run), "--summary-only", "--json"])
    history = json.loads(out.output)["stages"]
    assert [(h["name"], h["first_step"], h["last_step"], h["status"]) for h in history] == [
        ("observe", 1, 3, "done"), ("act", 4, 6, "done")]


@pytest.mark.parametrize("resume_at", [2, 3, 4])  # inside stage 1, at the boundary, inside stage 2
def test_resume_inside_and_between_stages_is_exact(files, resume_at):
    straight = files / "straight"
    stages = str(stage_file(files))
    new_run(*configs(save_every=1), straight, progress=False, keep=10, stages_file=stages).train()
    branch = files / "branch"
    resume_run(straight / "checkpoints" / f"step-{resume_at:07d}", branch, progress=False).train()
    a = {r["step"]: r["loss"] for r in records(straight) if "loss" in r}
    b = {r["step"]: r["loss"] for r in records(branch) if "loss" in r}
    assert [b[s] for s in range(resume_at + 1, 7)] == [a[s] for s in range(resume_at + 1, 7)]
    wa, wb = load_training_state(straight)["weights"], load_training_state(branch)["weights"]
    assert all(mx.array_equal(wa[n], wb[n]).item() for n in wa)


def test_a_changed_stage_file_on_resume(files):
    run = files / "run"
    new_run(*configs(save_every=2), run, progress=False, keep=10, stages_file=str(stage_file(files))).train()
    step2 = run / "checkpoints" / "step-0000002"
    # a stage that has begun changed: refused
    with pytest.raises(TinyMoeError, match="stage 1 \\(observe\\) has begun or finished and its 'train' changed"):
        resume_run(step2, files / "b1", progress=False, stages_file=str(stage_file(files, '["all"]')))
    # only a later stage changed: continues, with the new length
    prepared = resume_run(step2, files / "b2", progress=False, stages_file=str(stage_file(files, second_steps=5)))
    assert prepared.trainer.train.steps == 8
    prepared.train()
    assert max(r["step"] for r in records(files / "b2")) == 8
    # in the second stage, the second stage may no longer change
    with pytest.raises(TinyMoeError, match="'steps' changed \\(3 -> 4\\)"):
        resume_run(run / "checkpoints" / "step-0000004", files / "b3", progress=False,
                   stages_file=str(stage_file(files, second_steps=4)))


@pytest.mark.parametrize("body, words", [
    ('[[stage]]\nname = "a"\ndata = ["X"]\n', "no 'steps'"),
    ('[[stage]]\nname = "a"\nsteps = 0\ndata = ["X"]\n', "'steps' must be positive"),
    ('[[stage]]\nname = "a"\nsteps = 5\n', "no 'data'"),
    ('[[stage]]\nname = "a"\nsteps = 5\ndata = []\n', "no 'data'"),
    ('[[stage]]\nname = "a"\nsteps = 5\ndata = ["X", "X"]\nweights = [1.0]\n', "1 weights for 2 data entries"),
    ('[[stage]]\nname = "a"\nsteps = 5\ndata = ["X"]\ntrain = ["routers"]\n', "unknown parameter group 'routers'"),
    ('[[stage]]\nname = "a"\nsteps = 5\ndata = ["X"]\nloss_on = "prompt"\n', "'loss_on' must be one of all, target"),
    ('[[stage]]\nname = "a"\nsteps = 5\ndata = ["X"]\nlearning_rate = 1\n', "unknown setting 'learning_rate'"),
    ('[[stage]]\nname = "a"\nsteps = 5\ndata = ["X"]\nwarmup = 9\n', "'warmup' must be in [0, steps = 5]"),
    ('[stage]\nname = "a"\n', "no [[stage]] tables"),
    ('title = "x"\n', "unknown section 'title'"),
    ('[[stage]\n', "invalid TOML"),
])
def test_bad_stage_files_are_one_line_errors(files, body, words):
    path = files / "bad.toml"
    path.write_text(body.replace('"X"', json.dumps(str(files / "prose.txt"))))
    with pytest.raises(TinyMoeError, match="bad.toml"):
        load_stages(str(path), *configs())
    result = CliRunner().invoke(cli, ["train", "--preset", "debug", "--stages", str(path), "--out",
                                      str(files / "run")])
    assert result.exit_code == 2 and words in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error: ")
    assert not (files / "run").exists()


def test_stages_refuse_data_and_steps_flags(files):
    stages = str(stage_file(files))
    for extra in (["--data", str(files / "prose.txt")], ["--steps", "9"]):
        result = CliRunner().invoke(cli, ["train", "--preset", "debug", "--stages", stages, "--out",
                                          str(files / "run"), *extra])
        assert result.exit_code == 2 and result.output.startswith("error: --stages ")
    missing = CliRunner().invoke(cli, ["train", "--preset", "debug", "--stages", str(files / "nope.toml"),
                                       "--out", str(files / "run")])
    assert missing.exit_code == 2 and "stage file not found" in missing.output
