"""What a newcomer meets first: the run plan and time estimate, schedule warnings, errors whose
suggestions work, paths that are not sent to the hub, and the small things in the pictures."""

import io
import json
import os

import pytest
from click.testing import CliRunner

from debug_run import configs, write_corpus
from tinymoe.cli.main import cli
from tinymoe.cli.run_plan import run_plan, schedule_warnings
from tinymoe.config import TrainConfig, load_preset, tomllib
from tinymoe.errors import TinyMoeError
from tinymoe.io import checkpoint
from tinymoe.io.folders import check_output
from tinymoe.interop.hub import looks_like_repo_id, resolve_source
from tinymoe.train.progress import ESTIMATE_AFTER, ProgressBar


def run_cli(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


# ----------------------------------------------------------------------------- hub or local path


def test_a_missing_local_path_is_no_such_directory_not_a_hub_lookup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert not looks_like_repo_id("runs/dense")  # runs/ is here: a mistyped local path
    assert looks_like_repo_id("some-org/some-model")  # no some-org/ folder: a hub id
    for source in ["runs/dense", "./dense", "runs/a/b", "/nowhere/at/all"]:
        with pytest.raises(TinyMoeError, match="no such directory"):
            resolve_source(source)
    result = run_cli("upcycle", "runs/dense", "--moe-experts", 4, "--moe-topk", 2, "--out", "x")
    assert result.exit_code == 2 and "runs/dense: no such directory" in result.output
    assert "hub" not in result.output


# ----------------------------------------------------------------------------- runs without a checkpoint


def _prepared(tmp_path, out, **train):
    from tinymoe.run.lifecycle import new_run

    model, tr = configs(write_corpus(tmp_path), steps=4, **train)
    return new_run(model, tr, out, progress=False)


def test_interrupted_before_the_first_checkpoint_removes_the_new_run(tmp_path):
    out = tmp_path / "run"
    prepared = _prepared(tmp_path, out)

    def interrupted():
        raise KeyboardInterrupt

    prepared.trainer.run = interrupted
    with pytest.raises(KeyboardInterrupt):
        prepared.train()
    assert prepared.discarded and not out.exists()
    # the user's own empty folder is emptied, never removed
    mine = tmp_path / "mine"
    mine.mkdir()
    prepared = _prepared(tmp_path, mine)
    prepared.trainer.run = interrupted
    with pytest.raises(KeyboardInterrupt):
        prepared.train()
    assert mine.is_dir() and list(mine.iterdir()) == []


def test_a_killed_run_without_checkpoints_is_recognised_and_the_suggestion_works(tmp_path):
    out = tmp_path / "run"
    _prepared(tmp_path, out).release()  # as a SIGKILL leaves it: marker, lock, no checkpoint
    with pytest.raises(TinyMoeError, match="stopped before its first checkpoint.*--overwrite"):
        check_output(out, "run", overwrite=False, resume_hint=True)
    with pytest.raises(TinyMoeError, match="stopped before its first checkpoint.*--overwrite"):
        checkpoint.resolve(out)
    corpus = tmp_path / "corpus.txt"
    result = run_cli("train", "--preset", "debug", "--data", corpus, "--steps", 2, "--out", out, "--quiet")
    assert result.exit_code == 2 and "use --overwrite to start it again" in result.output
    result = run_cli("train", "--resume", out, "--quiet")
    assert result.exit_code == 2 and "--overwrite" in result.output
    result = run_cli("train", "--preset", "debug", "--data", corpus, "--steps", 2, "--out", out, "--quiet",
                     "--overwrite")
    assert result.exit_code == 0, result.output
    assert checkpoint.resolve(out).name == "step-0000002"


def test_a_finished_run_as_out_suggests_extend_steps_and_that_works(tmp_path):
    corpus, out = write_corpus(tmp_path), tmp_path / "run"
    args = ["train", "--preset", "debug", "--data", corpus, "--steps", 2, "--out", out, "--quiet"]
    assert run_cli(*args).exit_code == 0
    again = run_cli(*args)
    assert again.exit_code == 2 and f"use --resume {out} --extend-steps N" in again.output
    assert run_cli("train", "--resume", out, "--extend-steps", 1, "--quiet").exit_code == 0
    assert checkpoint.resolve(out).name == "step-0000003"


# ----------------------------------------------------------------------------- plan, estimate, warnings


def test_run_plan_counts_tokens_and_warns_about_a_schedule_stuck_in_warmup():
    train = TrainConfig(steps=40, warmup_steps=50, batch_size=3, grad_accum=2, lr=1e-3)
    lines = run_plan(train, context=64)
    assert f"{40 * 2 * 3 * 64:,} tokens" in lines[0]
    assert any("never reaches its peak" in line for line in lines)
    assert run_plan(train, context=64, start_step=30)[0].count(f"{10 * 2 * 3 * 64:,} tokens") == 1
    assert schedule_warnings(TrainConfig(steps=51, warmup_steps=50)) == []
    assert schedule_warnings(TrainConfig(steps=10, warmup_steps=0)) == []


def test_one_early_estimate_after_the_first_steps():
    stream = io.StringIO()
    bar = ProgressBar(100, 0, True, every=10, stream=stream)
    for step in range(1, 20):
        bar.update(step, loss=1.0)
    lines = [line for line in stream.getvalue().splitlines() if line.startswith("estimate:")]
    assert len(lines) == 1 and f"remaining {100 - 1 - ESTIMATE_AFTER} steps" in lines[0]
    short = io.StringIO()
    bar = ProgressBar(ESTIMATE_AFTER + 2, 0, True, stream=short)
    for step in range(1, ESTIMATE_AFTER + 3):
        bar.update(step)
    assert "estimate:" not in short.getvalue()  # nothing left to estimate


def test_train_help_shows_the_default_presets_values():
    from importlib import resources

    raw = tomllib.loads((resources.files("tinymoe.presets") / "tiny.toml").read_text())
    text = run_cli("train", "--help").output
    flat = " ".join(text.split())  # click wraps help text
    assert f"[tiny: {raw['train']['steps']}]" in flat
    assert f"[tiny: {raw['train']['batch_size']}]" in flat
    assert f"[tiny: {raw['model']['d_model']}]" in flat
    assert "None]" not in flat


def test_train_prints_its_plan_and_warns_before_training(tmp_path):
    corpus = write_corpus(tmp_path)
    result = run_cli("train", "--preset", "debug", "--data", corpus, "--steps", 3, "--warmup-steps", 5,
                     "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    _, train = load_preset("debug")
    assert f"plan: 3 steps x {train.batch_size} sequences" in result.output
    assert "warning: all 3 steps fall inside the 5 warmup steps" in result.output


def test_set_with_a_wrong_type_names_the_flag():
    result = run_cli("train", "--preset", "debug", "--set", "d_model=wide", "--out", "never")
    assert result.exit_code == 2
    assert result.output.strip() == "error: --set d_model=wide: 'd_model' must be an integer, got text 'wide'"


# ----------------------------------------------------------------------------- TINYMOE_MAX_STEPS


def test_max_steps_env_stops_saves_and_resume_continues(tmp_path):
    corpus, out = write_corpus(tmp_path), tmp_path / "r"
    env = {"TINYMOE_MAX_STEPS": "2"}
    result = run_cli("train", "--preset", "debug", "--data", corpus, "--steps", 5, "--out", out, env=env)
    assert result.exit_code == 0, result.output
    assert "stopped at step 2 of 5" in result.output and f"--resume {out}" in result.output
    assert checkpoint.resolve(out).name == "step-0000002"
    assert run_cli("train", "--resume", out, "--quiet", env=env).exit_code == 0
    assert checkpoint.resolve(out).name == "step-0000004"
    assert run_cli("train", "--resume", out, "--quiet", env=env).exit_code == 0
    assert checkpoint.resolve(out).name == "step-0000005"  # never past the run's own length
    bad = run_cli("train", "--preset", "debug", "--data", corpus, "--steps", 5, "--out", tmp_path / "b",
                  env={"TINYMOE_MAX_STEPS": "0"})
    assert bad.exit_code == 2 and "TINYMOE_MAX_STEPS must be a positive integer" in bad.output
    assert not (tmp_path / "b").exists()  # failed before its first checkpoint: removed


def test_quick_mode_caps_evaluation_batches(tmp_path, monkeypatch):
    from tinymoe.quick import QUICK_BATCHES, eval_batches

    corpus, out = write_corpus(tmp_path, repeats=400), tmp_path / "r"
    assert run_cli("train", "--preset", "debug", "--data", corpus, "--steps", 2, "--out", out, "--quiet").exit_code == 0
    full = run_cli("eval", out, "--batch-size", 1, "--json")
    quick = run_cli("eval", out, "--batch-size", 1, "--json", env={"TINYMOE_QUICK": "1"})
    n_full, n_quick = json.loads(full.output)["tokens"], json.loads(quick.output)["tokens"]
    model, _ = load_preset("debug")
    assert n_quick == QUICK_BATCHES * model.context < n_full
    monkeypatch.setenv("TINYMOE_QUICK", "1")
    assert eval_batches(None) == QUICK_BATCHES and eval_batches(1) == 1
    monkeypatch.setenv("TINYMOE_QUICK", "0")
    assert eval_batches(None) is None


# ----------------------------------------------------------------------------- pictures and text


def _captured(monkeypatch):
    from tinymoe.analysis import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    return plots, figures


def test_training_plot_leaves_out_losses_of_weight_zero(monkeypatch, tmp_path):
    plots, figures = _captured(monkeypatch)
    records = [{"step": s, "loss": 3.0, "balance_loss": 2.0, "z_loss": 4.0, "entropy_loss": 1.5, "lr": 1e-3}
               for s in range(1, 4)]
    plots.training_curves(records, tmp_path / "t.png", None, {"balance_loss": 0.01, "z_loss": 0.001,
                                                             "entropy_loss": 0.0})
    labels = figures[0].axes[1].get_legend_handles_labels()[1]
    assert labels == ["balance_loss (x0.01)", "z_loss (x0.001)"]


def test_load_heatmap_colour_bar_is_in_percent_like_its_cells(monkeypatch, tmp_path):
    plots, figures = _captured(monkeypatch)
    loads = [[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]]
    plots.load_heatmap([{"layer": i, "load": row} for i, row in enumerate(loads)], tmp_path / "l.png")
    image = figures[0].axes[0].images[0]
    assert float(image.get_array().max()) == pytest.approx(50.0)
    cells = sorted(t.get_text() for t in figures[0].axes[0].texts)
    assert "50" in cells and "0.5" not in cells


def test_uncoloured_routing_marks_a_newline_on_its_own_line():
    from tinymoe.analysis.routing_view import render_text

    records = [{"text": "a", "experts": [[2]]}, {"text": "\n", "experts": [[3]]},
               {"text": "b\n", "experts": [[1]]}, {"text": "c", "experts": [[0]]}]
    assert render_text(records, 0, color=False) == "a₂↵₃\nb₁\nc₀"


def test_doctor_hint_matches_why_openblas_is_not_used():
    from tinymoe.cli.doctor import blas_hint

    slow = "reference BLAS bundled with mlx[cpu] (slow)"
    assert blas_hint("OpenBLAS (/lib/libopenblas.so.0)", "loaded") is None
    assert "TINYMOE_NO_OPENBLAS" in blas_hint(slow, "disabled by TINYMOE_NO_OPENBLAS")
    assert "install OpenBLAS" not in blas_hint(slow, "disabled by TINYMOE_NO_OPENBLAS")
    assert "install OpenBLAS" in blas_hint(slow, "no OpenBLAS found (Debian/Ubuntu: apt-get ...)")
    assert "TINYMOE_OPENBLAS" in blas_hint(slow, "could not load /x.so: bad ELF")


def test_doctor_names_the_opt_out_when_openblas_is_turned_off():
    import subprocess
    import sys

    env = {**os.environ, "TINYMOE_NO_OPENBLAS": "1"}
    out = subprocess.run([sys.executable, "-m", "tinymoe.cli.main", "doctor"], env=env, capture_output=True,
                         text=True, timeout=120)
    if "reference BLAS" not in out.stdout:
        pytest.skip("this MLX build does not link the reference BLAS")
    assert "TINYMOE_NO_OPENBLAS" in out.stdout.splitlines()[-1] and "install OpenBLAS" not in out.stdout
