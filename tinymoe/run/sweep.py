"""Running a sweep: its planned runs, one after the other, as ordinary run folders under one folder.

The sweep folder carries the marker `tinymoe.json` of kind `sweep` holding the plan
(tinymoe.run.sweep_plan) and, per run, the wall time this command measured. Each run is a normal
run folder (`OUT/NAME`) made by tinymoe.run.lifecycle, so `train --resume`, `eval`, `inspect` and
`compare` read it like any run. Running the same command again continues where it stopped: a run
whose latest checkpoint is at its last step is skipped, a run with checkpoints is resumed from its
latest (a killed run loses at most `save_every` steps; the sweep saves at every validation when the
preset saves only at the end), and a run folder left without any checkpoint is started again
(it holds nothing but tinymoe's own marker and log). A rerun with other settings is refused: a
sweep folder means one plan. The same command started twice shares the work: a run whose lock
another process holds is left to it (the second command's summary says so).

The ETA of the whole sweep extrapolates this command's measured seconds per unit of training
compute (6 x active parameters x tokens, tinymoe.planner) to the compute left.
"""

from __future__ import annotations

import time
from pathlib import Path

from tinymoe.errors import TinyMoeError
from tinymoe.io.folders import check_output, has_checkpoints, read_marker, write_marker
from tinymoe.planner import param_counts
from tinymoe.run.sweep_plan import PlannedRun, configs, full_overrides

SWEEP_KIND = "sweep"


def open_sweep(out: Path, planned: dict, runs: list[PlannedRun]) -> dict:
    """The sweep folder's record: created for a new sweep, checked against `planned` for an old one."""
    out = Path(out)
    marker = read_marker(out)
    if marker is not None and marker["kind"] == SWEEP_KIND:
        if marker.get("plan") != planned:
            changed = sorted(k for k in planned if marker.get("plan", {}).get(k) != planned[k])
            raise TinyMoeError(f"{out} holds a sweep planned with other settings ({', '.join(changed)} differ); "
                               f"rerun it with its own settings or choose another --out")
        return marker
    check_output(out, SWEEP_KIND, False)  # absent or empty, else one line naming what is there
    out.mkdir(parents=True, exist_ok=True)
    return write_marker(out, SWEEP_KIND, plan=planned, runs=[r.to_dict() for r in runs], wall_s={})


def sweep_runs(folder: Path) -> tuple[dict, list[PlannedRun]]:
    """(the marker, its runs) of a sweep folder; one line when it is not one."""
    marker = read_marker(Path(folder))
    if marker is None or marker["kind"] != SWEEP_KIND:
        raise TinyMoeError(f"{folder} is not a sweep folder (made by tinymoe sweep)")
    return marker, [PlannedRun(**r) for r in marker.get("runs", [])]


def run_state(run_dir: Path, steps: int) -> str:
    """'finished', 'resume', 'restart' (a run folder without a checkpoint) or 'new'."""
    if not run_dir.exists():
        return "new"
    marker = read_marker(run_dir)
    if marker is None or marker["kind"] != "run":
        check_output(run_dir, "run", False)  # empty: fine; anything else: refused by name
        return "new"
    if not has_checkpoints(run_dir):
        return "restart"
    from tinymoe.io import checkpoint

    try:  # the checkpoint `--resume` would continue from
        latest = checkpoint.step_of(checkpoint.resolve(run_dir))
    except TinyMoeError:
        return "resume"  # the reader will name what is wrong
    return "finished" if latest >= steps else "resume"


def busy(run_dir: Path) -> bool:
    """Whether another process holds the run's writer lock (two `sweep` commands on one folder
    share its runs: each leaves a run the other is training to it)."""
    from tinymoe.run.lock import LOCK_FILE, RunLock

    if not (Path(run_dir) / LOCK_FILE).is_file():
        return False
    try:
        RunLock(run_dir).acquire().release()
    except TinyMoeError:
        return True
    return False


def compute_units(preset: str, fixed: dict, run: PlannedRun, steps: int | None) -> tuple[float, int]:
    """(training FLOPs estimate of the whole run, its steps)."""
    model_cfg, train_cfg = configs(preset, full_overrides(run, fixed, steps))
    tokens = train_cfg.steps * train_cfg.batch_size * train_cfg.grad_accum * model_cfg.context
    return 6.0 * param_counts(model_cfg).active * tokens, train_cfg.steps


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class SweepRunner:
    """Runs a planned sweep; `say` receives progress lines (the run in flight, the sweep's ETA)."""

    def __init__(self, out: Path, preset: str, fixed: dict, steps: int | None, runs: list[PlannedRun],
                 say=lambda line: None, progress: bool = True):
        self.out, self.preset, self.fixed, self.steps, self.runs = Path(out), preset, fixed, steps, runs
        self.say, self.progress = say, progress
        self.done_units, self.done_s = 0.0, 0.0

    def _eta(self, remaining_units: float) -> str:
        if self.done_units <= 0:
            return "ETA after the first run"
        return f"sweep ETA {format_seconds(remaining_units * self.done_s / self.done_units)}"

    def run(self) -> list[dict]:
        from tinymoe.io import checkpoint

        units = [compute_units(self.preset, self.fixed, r, self.steps) for r in self.runs]
        results = []
        for i, (run, (flops, steps)) in enumerate(zip(self.runs, units)):
            run_dir = self.out / run.name
            if busy(run_dir):
                self.say(f"sweep [{i + 1}/{len(self.runs)}] {run.name}: being trained by another process, left to it")
                results.append({"name": run.name, "state": "busy", "run_dir": str(run_dir)})
                continue
            state = run_state(run_dir, steps)
            left = sum(u for u, _ in units[i:])
            if state == "finished":
                self.say(f"sweep [{i + 1}/{len(self.runs)}] {run.name}: finished, skipped")
                results.append({"name": run.name, "state": "skipped", "run_dir": str(run_dir)})
                continue
            start_step = max(0, checkpoint.step_of(checkpoint.resolve(run_dir))) if state == "resume" else 0
            self.say(f"sweep [{i + 1}/{len(self.runs)}] {run.name}: "
                     f"{'resuming at step ' + str(start_step) if state == 'resume' else 'starting'}"
                     f" ({steps} steps); {self._eta(left - flops * start_step / steps)}")
            began = time.perf_counter()
            try:
                summary = self._train(run, run_dir, state)
            except TinyMoeError:
                if not busy(run_dir):
                    raise
                # another process of the same sweep took this run a moment before us
                self.say(f"sweep [{i + 1}/{len(self.runs)}] {run.name}: being trained by another process, left to it")
                results.append({"name": run.name, "state": "busy", "run_dir": str(run_dir)})
                continue
            elapsed = time.perf_counter() - began
            trained = max(0, summary["step"] - start_step)
            self.done_units += flops * trained / steps
            self.done_s += elapsed
            self._record_wall(run.name, elapsed)
            results.append({"name": run.name, "state": state, "run_dir": str(run_dir), **summary})
            if summary["step"] < steps:  # a shortened invocation (TINYMOE_MAX_STEPS): go on to the next
                continue
        return results

    def _train(self, run: PlannedRun, run_dir: Path, state: str) -> dict:
        from tinymoe.run.lifecycle import new_run, resume_run

        if state == "resume":
            prepared = resume_run(run_dir, progress=self.progress)
        else:
            model_cfg, train_cfg = configs(self.preset, full_overrides(run, self.fixed, self.steps))
            if train_cfg.save_every == 0 and train_cfg.eval_every:
                # a killed run then resumes from its last validation instead of starting over
                import dataclasses

                train_cfg = dataclasses.replace(train_cfg, save_every=train_cfg.eval_every)
            prepared = new_run(model_cfg, train_cfg, run_dir, overwrite=state == "restart", progress=self.progress)
        return prepared.train()

    def _record_wall(self, name: str, seconds: float) -> None:
        marker = read_marker(self.out) or {}
        wall = dict(marker.get("wall_s") or {})
        wall[name] = round(float(wall.get(name, 0.0)) + seconds, 3)
        fields = {k: v for k, v in marker.items() if k not in ("created_by", "kind", "format", "tinymoe_version")}
        fields["wall_s"] = wall
        fields.pop("created", None)
        write_marker(self.out, SWEEP_KIND, **fields)
