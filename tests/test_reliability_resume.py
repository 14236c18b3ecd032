"""Exact resume beyond the basics of test_train.py, and refusals to resume with changed settings.

N steps straight must equal N/2 + resume + N/2 bit for bit on CPU: losses, final weights and
optimizer state, with a sentencepiece tokenizer and gradient accumulation, and across a skipped
(non-finite) step, whose count must survive the resume.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_map

from tinymoe.cli.main import cli
from tinymoe.config import TrainConfig, load_preset
from tinymoe.data.corpus import bundled_corpus_dir
from tinymoe.io.loader import load_training_state as load_resume_state
from tinymoe.train.trainer import Trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~24 KB of real prose and code: enough for a small sentencepiece vocabulary, quick to train."""
    root = tmp_path_factory.mktemp("corpus")
    src = bundled_corpus_dir()
    (root / "prose").mkdir()
    (root / "code").mkdir()
    (root / "prose" / "a.txt").write_text((src / "prose" / "shakespeare.txt").read_text()[:14000])
    (root / "code" / "b.py").write_text((src / "code" / "textwrap.py.txt").read_text()[:10000])
    return root


def configs(corpus, steps, **train):
    model, tr = load_preset("debug")
    return model, TrainConfig(**{**tr.__dict__, "steps": steps, "data": [str(corpus)], "eval_every": 0,
                                 "log_every": 1, "save_every": steps // 2, **train})


def losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["skipped_steps"]) for r in rows if "loss" in r]


def straight_and_resumed(tmp_path, corpus, n, poison_at=(), **train):
    """Run n steps straight, then resume a copy from its n/2 checkpoint; both run dirs."""
    straight = tmp_path / "straight"
    trainer = Trainer(*configs(corpus, n, **train), straight, progress=False, keep=1)
    if poison_at:
        real = trainer.stepper._grad

        def grad(x, y):
            values, g = real(x, y)
            if trainer.step + 1 in poison_at:
                g = tree_map(lambda a: a * mx.array(float("nan")), g)
            return values, g

        trainer.stepper._grad = grad
    trainer.run()
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{n:07d}")
    state = load_resume_state(resumed / "checkpoints" / f"step-{n // 2:07d}")
    Trainer(*configs(corpus, n, **train), resumed, resume=state, progress=False).run()
    return straight, resumed


def assert_same_final_state(a, b):
    sa, sb = load_resume_state(a), load_resume_state(b)
    for part in ("weights", "optimizer"):
        assert sa[part].keys() == sb[part].keys()
        for name in sa[part]:
            assert np.array_equal(np.array(sa[part][name]), np.array(sb[part][name])), (part, name)
    assert sa["manifest"]["health"] == sb["manifest"]["health"]
    assert sa["manifest"]["data"]["sampler"] == sb["manifest"]["data"]["sampler"]
    return sa


# cpu: bitwise equality between two runs. On a GPU, MLX's scatter-add (the embedding's
# gradient, among others) sums with atomics, so the last bits of a run can vary.
@pytest.mark.cpu
def test_resume_with_sentencepiece_and_grad_accum_is_exact(tmp_path, corpus):
    straight, resumed = straight_and_resumed(tmp_path, corpus, 6, tokenizer="sp:400", grad_accum=2)
    assert losses(resumed) == losses(straight) and len(losses(straight)) == 6
    final = assert_same_final_state(straight, resumed)
    assert final["manifest"]["tokenizer"]["kind"] == "sp" and final["tokenizer"].vocab_size == 400
    # The resumed run kept the checkpoint's tokenizer rather than training a new one.
    ckpt = lambda run: run / "checkpoints" / "step-0000006" / "tokenizer.model"  # noqa: E731
    assert ckpt(straight).read_bytes() == ckpt(resumed).read_bytes()


# cpu: bitwise equality between two runs. On a GPU, MLX's scatter-add (the embedding's
# gradient, among others) sums with atomics, so the last bits of a run can vary.
@pytest.mark.cpu
def test_resume_across_a_skipped_step_is_exact(tmp_path, corpus):
    straight, resumed = straight_and_resumed(tmp_path, corpus, 6, poison_at={2}, dispatch="gather")
    rows = losses(straight)
    assert rows == losses(resumed)
    assert [s for s, _, k in rows if k] == [2, 3, 4, 5, 6]  # counted from step 2 on, also after resume
    final = assert_same_final_state(straight, resumed)
    assert final["manifest"]["metrics"]["skipped_steps"] == 1


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("resume") / "run"
    result = CliRunner().invoke(cli, ["train", "--preset", "debug", "--data", str(corpus), "--steps", "2",
                                      "--eval-every", "0", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("flags, setting", [
    (["--moe-topk", "1"], "moe_topk"),  # model flags
    (["--d-model", "64"], "d_model"),
    (["--set", "rope_theta=50000.0"], "rope_theta"),  # a model setting without its own flag
    (["--no-router-norm"], "router_norm"),
    (["--lr", "0.1"], "lr"),  # train settings that change what is computed
    (["--batch-size", "2"], "batch_size"),
    (["--grad-accum", "2"], "grad_accum"),
    (["--seed", "7"], "seed"),
    (["--tokenizer", "sp:300"], "tokenizer"),
    (["--set", "weight_decay=0.5"], "weight_decay"),
    (["--data", "{other}"], "data"),
])
def test_resume_refuses_changed_settings_naming_them(run, tmp_path, flags, setting):
    other = tmp_path / "other.txt"
    other.write_text("other text " * 100)
    args = ["train", "--resume", str(run), "--extend-steps", "2", *[f.format(other=other) for f in flags]]
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot change '{setting}' when resuming"), lines
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing trained or written


def test_resume_accepts_settings_that_do_not_change_the_computation(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    result = CliRunner().invoke(cli, ["train", "--resume", str(copy), "--extend-steps", "1", "--max-bad-steps", "9",
                                      "--log-every", "1", "--moe-topk", "2", "--quiet", "--json"])
    assert result.exit_code == 0, result.output  # --moe-topk equal to the checkpoint's is no change
    assert json.loads(result.output)["step"] == 3
    manifest = json.loads((copy / "checkpoints" / "step-0000003" / "manifest.json").read_text())
    assert manifest["train"]["max_bad_steps"] == 9 and manifest["train"]["steps"] == 3
