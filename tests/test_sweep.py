"""tinymoe sweep: the plan (twin matching against counts of built models), a sweep killed mid-way
and resumed (finished runs untouched, the killed run continued to the same result as a sweep
never interrupted), and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinymoe.config import ModelConfig
from tinymoe.errors import TinyMoeError
from tinymoe.planner import param_counts
from tinymoe.router_registry import router_params
from tinymoe.run.sweep_plan import configs, plan_sweep

GRID = ["--grid", "moe_experts=1,4", "--grid", "moe_topk=1,2"]
SWEEP = ["sweep", "--preset", "debug", *GRID, "--steps", "8", "--set", "eval_every=2", "--set", "log_every=2",
         "--quiet", "--out"]


def _by_name(runs):
    return {r.name: r for r in runs}


def _routers(cfg: ModelConfig) -> int:
    return sum(cfg.layer_is_moe(i) for i in range(cfg.n_layers)) * router_params(cfg)


def test_twins_have_the_active_parameters_of_their_moe_point():
    """Each MoE point's twin is dense with the MoE point's active parameter count (routers aside,
    which a dense model has no counterpart of); counted on built models, not with the planner."""
    from tinymoe.nn.model import Model, count_params

    runs = plan_sweep("debug", {"moe_experts": [4, 8], "moe_topk": [1, 2]}, {}, 1, "active-params")
    points = [r for r in runs if r.role == "point"]
    twins = {p: r for r in runs if r.role == "twin" for p in r.twin_of}
    assert len(points) == 4 and set(twins) == {p.name for p in points}
    for point in points:
        moe_cfg, _ = configs("debug", point.overrides)
        twin_cfg, _ = configs("debug", twins[point.name].overrides)
        assert moe_cfg.is_moe and not twin_cfg.is_moe
        moe, twin = count_params(Model(moe_cfg)), count_params(Model(twin_cfg))
        assert twin["total"] == twin["active"] == moe["active"] - _routers(moe_cfg)
    # top-1 points with experts as wide as the dense FFN share one twin (4 x 1 and 8 x 1), likewise top-2
    assert len({r.name for r in twins.values()}) == 2


def test_total_params_matching_is_the_nearest_width():
    runs = plan_sweep("tiny", {"moe_experts": [8], "moe_topk": [2]}, {}, 1, "total-params")
    point, twin = runs
    moe_cfg, _ = configs("tiny", point.overrides)
    twin_cfg, _ = configs("tiny", twin.overrides)
    target = param_counts(moe_cfg).total - _routers(moe_cfg)
    per_unit = 3 * twin_cfg.d_model * twin_cfg.n_layers  # parameters per unit of d_ff
    assert abs(param_counts(twin_cfg).total - target) <= per_unit // 2


def test_dense_points_drop_moe_settings_and_are_not_repeated():
    runs = plan_sweep("debug", {"moe_experts": [1, 4], "moe_topk": [1, 2]}, {}, 2, "none")
    names = [r.name for r in runs]
    assert names == ["moe_experts-1_seed-0", "moe_experts-4_moe_topk-1_seed-0", "moe_experts-4_moe_topk-2_seed-0",
                     "moe_experts-1_seed-1", "moe_experts-4_moe_topk-1_seed-1", "moe_experts-4_moe_topk-2_seed-1"]
    assert [r.seed for r in runs] == [0, 0, 0, 1, 1, 1]
    assert configs("debug", runs[0].overrides)[0].moe_topk == 1  # the preset's top-2 dropped


def test_zipped_keys_and_bad_grids():
    runs = plan_sweep("debug", {"moe_experts,moe_topk": [[4, 1], [4, 2]]}, {}, 1, "none")
    assert [r.overrides for r in runs] == [{"moe_experts": 4, "moe_topk": 1}, {"moe_experts": 4, "moe_topk": 2}]
    for grid, fixed, message in [({"moe_expert": [1]}, {}, "unknown setting 'moe_expert'"),
                                 ({"seed": [1, 2]}, {}, "--seeds"),
                                 ({"moe_topk": [1]}, {"moe_topk": 2}, "both in --grid and --set"),
                                 ({"moe_experts,moe_topk": [[4]]}, {}, "2 parts"),
                                 ({"moe_topk": [5]}, {}, "exceeds")]:
        with pytest.raises(TinyMoeError, match=message):
            plan_sweep("debug", grid, fixed, 1, "none")


_KILLER = """
import os, signal, sys
from tinymoe.train import trainer as T
save = T.Trainer.save
victim, at_step = sys.argv[1], int(sys.argv[2])
def killing_save(self, metrics):
    path = save(self, metrics)
    if self.run_dir.name == victim and self.step == at_step:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no lock release: a real kill
    return path
T.Trainer.save = killing_save
from tinymoe.cli.main import main
sys.argv = ["tinymoe", *sys.argv[3:]]
main()
"""


def _tinymoe(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "tinymoe.cli.main", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "NO_COLOR": "1", **(env or {})})


def _final(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints" / "step-0000008" / "manifest.json").read_text())["metrics"]


def test_a_killed_sweep_resumes_without_redoing_finished_runs(tmp_path):
    killed = subprocess.run([sys.executable, "-c", _KILLER, "moe_experts-4_moe_topk-1", "4", *SWEEP, "s"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    first = tmp_path / "s" / "moe_experts-1"
    killed_run = tmp_path / "s" / "moe_experts-4_moe_topk-1"
    assert (killed_run / "latest").read_text().strip() == "step-0000004"
    assert not (tmp_path / "s" / "moe_experts-4_moe_topk-2").exists()
    before = {p.name: p.stat().st_mtime_ns for p in (first / "checkpoints").iterdir()}
    log_before = (first / "metrics.jsonl").read_bytes()

    again = _tinymoe(*SWEEP, "s", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "moe_experts-1: finished, skipped" in again.stderr
    assert "moe_experts-4_moe_topk-1: resuming at step 4" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (first / "checkpoints").iterdir()} == before
    assert (first / "metrics.jsonl").read_bytes() == log_before

    reference = _tinymoe(*SWEEP, "ref", cwd=tmp_path)  # the same sweep, never interrupted
    assert reference.returncode == 0, reference.stderr
    names = sorted(p.name for p in (tmp_path / "ref").iterdir() if p.is_dir())
    assert names == sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir())
    assert len(names) == 4  # 3 grid points (one dense) + the top-2 point's twin
    for name in names:  # resuming is exact on CPU: the resumed sweep ends where the reference does
        assert _final(tmp_path / "s" / name) == _final(tmp_path / "ref" / name), name

    changed = _tinymoe(*SWEEP[:-2], "--steps", "9", "--quiet", "--out", "s", cwd=tmp_path)
    assert changed.returncode == 2 and changed.stderr.startswith("error: ") and "other settings" in changed.stderr


def test_sweep_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    r = _tinymoe(*SWEEP, "mine", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a folder tinymoe created" in r.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_validation_series_reads_tokens_and_time_at_each_validation(tmp_path):
    from tinymoe.analysis.sweep_plots import validation_series

    lines = [{"step": 10, "loss": 3.0, "tokens_per_s": 100.0, "tokens_seen": 1000},
             {"step": 20, "loss": 2.5, "tokens_per_s": 50.0, "tokens_seen": 2000},
             {"step": 20, "val_loss": 2.4, "val_bits_per_byte": 3.5},
             {"step": 30, "loss": 2.2, "tokens_per_s": 100.0, "tokens_seen": 3000},
             {"step": 30, "val_loss": 2.1, "val_bits_per_byte": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    # 1000 tokens at 100/s, then 1000 at 50/s, then 1000 at 100/s
    assert validation_series(tmp_path) == {"tokens": [2000, 3000], "seconds": [30.0, 40.0],
                                           "bits_per_byte": [3.5, 3.0]}


def test_compare_and_plot_read_a_sweep(tmp_path):
    done = _tinymoe("sweep", "--preset", "debug", "--grid", "moe_experts=1,4", "--steps", "4", "--set", "eval_every=2",
                    "--seeds", "2", "--match", "none", "--quiet", "--out", "s", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = _tinymoe("compare", "s", "--json", "--replicates", "20", "--max-windows", "16", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    groups = json.loads(out.stdout)["groups"]
    # 2 configurations x 2 seeds: one row each
    assert [sorted(g["runs"]) for g in groups] == [["moe_experts-1_seed-0", "moe_experts-1_seed-1"],
                                                   ["moe_experts-4_seed-0", "moe_experts-4_seed-1"]]
    pytest.importorskip("matplotlib")
    drawn = _tinymoe("plot", "s", "--json", cwd=tmp_path)
    assert drawn.returncode == 0, drawn.stderr
    path = Path(tmp_path / json.loads(drawn.stdout)["written"][0])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_another_process_trains_is_left_to_it(tmp_path):
    """Two sweep commands on one folder share the runs: a run whose lock is held is skipped."""
    from tinymoe.run.lock import RunLock

    args = ["sweep", "--preset", "debug", "--grid", "moe_experts=1,4", "--steps", "2", "--match", "none", "--quiet",
            "--out", "s"]
    started = _tinymoe(*args, cwd=tmp_path, env={"TINYMOE_MAX_STEPS": "1"})  # both runs stop at step 1
    assert started.returncode == 0, started.stderr
    with RunLock(tmp_path / "s" / "moe_experts-1"):  # as a trainer in another process would
        first = _tinymoe(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "moe_experts-1: being trained by another process, left to it" in first.stderr
    assert (tmp_path / "s" / "moe_experts-4" / "latest").read_text().strip() == "step-0000002"
    assert (tmp_path / "s" / "moe_experts-1" / "latest").read_text().strip() == "step-0000001"
    second = _tinymoe(*args, cwd=tmp_path)  # the lock released: the run is trained now
    assert second.returncode == 0, second.stderr
    assert "moe_experts-4: finished, skipped" in second.stderr
    assert (tmp_path / "s" / "moe_experts-1" / "latest").read_text().strip() == "step-0000002"
