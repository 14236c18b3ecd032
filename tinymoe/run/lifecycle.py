"""New, resumed and initialised runs: every decision about a run folder, in one place.

A run folder is created by `new_run` (or `init_run`, a new run from a checkpoint's weights) with
the marker `tinymoe.json` (tinymoe.io.folders), which also stores the run's own settings: how many
older checkpoints to keep, the planned number of steps, the data specs and the record of the data
files (tinymoe.data.record). `resume_run` continues a run from its latest checkpoint, or branches
it into a new folder from any checkpoint. Every function checks all of its inputs (config, data,
checkpoint) and builds the trainer *before* it deletes or writes anything, and returns a
`PreparedRun` holding the folder's writer lock (tinymoe.run.lock).

What resume refuses, each with one line: a setting that changes what is computed (only
`RESUME_MAY_CHANGE` may differ; the schedule length changes only with `extend_steps`), data
files whose contents changed since the run started (unless `allow_data_change`), a manifest whose
data disagrees with the run's own record (an edited manifest), continuing from a checkpoint older
than the run's latest in the same folder (that would replace newer checkpoints: branch with
`out` instead), and writing into a folder that is not a run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from tinymoe.config import ModelConfig, TrainConfig, apply_overrides, from_dict, validate
from tinymoe.data.corpus import bundled_corpus_dir
from tinymoe.data.record import absolute_spec, data_record, record_change
from tinymoe.errors import TinyMoeError
from tinymoe.io import checkpoint, metrics_log
from tinymoe.io.folders import MARKER, check_output, has_checkpoints, read_marker, remove_marked, write_marker
from tinymoe.run.lock import RunLock
from tinymoe.stages import all_specs, from_dicts, load_stages, plan_change, stage_at, total_steps

# Settings that do not change what is computed, so a resumed run may change them.
RESUME_MAY_CHANGE = {"eval_every", "save_every", "log_every", "dispatch", "eval_batches", "max_bad_steps",
                     "spike_factor", "spike_window"}


@dataclass
class PreparedRun:
    """A trainer ready to run in `run_dir`, whose writer lock it holds until `train` returns."""

    trainer: object
    run_dir: Path
    lock: RunLock
    note: str | None = None  # one line worth telling the user (e.g. data not verifiable)
    # A folder this call created (a new run or a branch): removed again when training fails or is
    # interrupted before its first checkpoint, so no run is left that cannot be resumed.
    created: bool = False
    existed_empty: bool = False  # the user's own empty folder: emptied, never removed
    discarded: bool = False

    def train(self) -> dict:
        try:
            return self.trainer.run()
        except BaseException:
            self._discard_unsaved()
            raise
        finally:
            self.lock.release()

    def _discard_unsaved(self) -> None:
        if not self.created or has_checkpoints(self.run_dir):
            return
        try:
            remove_marked(self.run_dir, "run")
            if self.existed_empty:
                self.run_dir.mkdir(exist_ok=True)
        except (TinyMoeError, OSError):
            return  # left as it is: resume and --out recognise a run without checkpoints
        self.discarded = True

    def release(self) -> None:
        self.lock.release()


def _data_specs(train: TrainConfig) -> list[str]:
    return list(train.data) or [str(bundled_corpus_dir())]


def _absolute_paths(train: TrainConfig) -> TrainConfig:
    """Data specs and the teacher cache as absolute paths: a run finds them from any folder."""
    cache = os.path.abspath(os.path.expanduser(train.teacher_cache)) if train.teacher_cache else ""
    return dataclasses.replace(train, data=[absolute_spec(s) for s in train.data], teacher_cache=cache)


def _store_settings(run_dir: Path, keep: int, train: TrainConfig, files: list | None) -> None:
    write_marker(run_dir, "run", keep=keep, steps=train.steps, data=list(train.data), data_files=files)


def _make_trainer(model_cfg, train_cfg, run_dir, **kwargs):
    from tinymoe.train.trainer import Trainer  # imports MLX: only once a run is really prepared

    return Trainer(model_cfg, train_cfg, run_dir, **kwargs)


def _fresh_folder(out: Path, replace: bool) -> RunLock:
    """Replace an earlier run in `out` (after everything was checked) and lock the new folder."""
    if replace:
        with RunLock(out):  # never delete a run that is being trained right now
            remove_marked(out, "run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TinyMoeError(f"{out}: cannot write the run directory: {exc.strerror or exc}") from None
    return RunLock(out).acquire()


def _with_plan(train_cfg: TrainConfig, plan: list) -> tuple[TrainConfig, list]:
    """A run in stages: data specs made absolute; the run's data is every stage's, its length theirs."""
    plan = [dataclasses.replace(s, data=[absolute_spec(d) for d in s.data]) for s in plan]
    return dataclasses.replace(train_cfg, data=all_specs(plan), steps=total_steps(plan)), plan


def new_run(model_cfg: ModelConfig, train_cfg: TrainConfig, out: str | Path, *, overwrite: bool = False,
            keep: int | None = None, progress: bool = True, init: dict | None = None,
            stages_file: str | None = None, ranks=None) -> PreparedRun:
    """A new run in folder `out` (created; an earlier run there is replaced only with overwrite);
    in the stages of `stages_file` (tinymoe.stages) when given. ranks: a data-parallel group
    (tinymoe.train.distributed); its other ranks check and build alike but leave the folder to rank 0."""
    out = Path(out)
    keep = 0 if keep is None else keep
    if ranks is not None and not ranks.writer:
        train_cfg = _absolute_paths(train_cfg)
        validate(model_cfg, train_cfg)
        return _follower(_make_trainer(model_cfg, train_cfg, out, progress=False, keep=keep, init=init,
                                       ranks=ranks), out)
    replace = check_output(out, "run", overwrite, resume_hint=True)  # refuse early; deletes nothing
    existed_empty = out.is_dir() and not replace
    train_cfg = _absolute_paths(train_cfg)
    validate(model_cfg, train_cfg)
    plan = None
    if stages_file:
        train_cfg, plan = _with_plan(train_cfg, load_stages(stages_file, model_cfg, train_cfg))
    files = data_record(_data_specs(train_cfg))
    trainer = _make_trainer(model_cfg, train_cfg, out, progress=progress, keep=keep, init=init, stages=plan,
                            ranks=ranks)
    lock = _fresh_folder(out, replace)
    try:
        _store_settings(out, keep, train_cfg, files)
    except OSError as exc:
        lock.release()
        raise TinyMoeError(f"{out}: cannot write the run record: {exc.strerror or exc}") from None
    trainer.data_files = files
    return PreparedRun(trainer, out, lock, created=True, existed_empty=existed_empty)


def init_run(path: str | Path, out: str | Path, train_cfg: TrainConfig, model_over: dict, *,
             overwrite: bool = False, keep: int | None = None, progress: bool = True,
             continue_in_place: bool = False, stages_file: str | None = None) -> PreparedRun:
    """A new run (step 0, fresh optimizer) from the model and tokenizer of checkpoint `path`.

    continue_in_place: train in the checkpoint's own run folder (`train --resume` on a
    weights-only checkpoint such as an upcycled one), which must be a run folder."""
    from tinymoe.interop.init_state import load_init_state

    model_cfg, init, _ = load_init_state(str(path), model_over)
    if not continue_in_place:
        return new_run(model_cfg, train_cfg, out, overwrite=overwrite, keep=keep, progress=progress, init=init,
                       stages_file=stages_file)
    if stages_file:
        raise TinyMoeError("--stages with a weights-only checkpoint needs --out DIR (a new run in stages)")
    out = Path(out)
    if not _is_run_folder(out):
        raise TinyMoeError(f"{out} is not a run folder; pass --out DIR to start a run from this checkpoint")
    train_cfg = _absolute_paths(train_cfg)
    validate(model_cfg, train_cfg)
    files = data_record(_data_specs(train_cfg))
    marker = read_marker(out) or {}
    keep = marker.get("keep", 0) if keep is None else keep
    return _train_in_place(out, model_cfg, train_cfg, keep, files, progress=progress, init=init)


def _train_in_place(folder: Path, model_cfg, train_cfg, keep: int, files: list, note: str | None = None,
                    **trainer_args) -> PreparedRun:
    """Lock an existing run folder (refused while another trainer holds it), then build its trainer
    and store the run's settings; the lock is released again if either fails."""
    lock = RunLock(folder).acquire()
    try:
        trainer = _make_trainer(model_cfg, train_cfg, folder, keep=keep, **trainer_args)
        _store_settings(folder, keep, train_cfg, files)
    except BaseException:
        lock.release()
        raise
    trainer.data_files = files
    return PreparedRun(trainer, folder, lock, note)


def _is_run_folder(folder: Path) -> bool:
    """A marked run folder, or one laid out like a run by an older tinymoe (no marker)."""
    marker = read_marker(folder)
    if marker is not None:
        return marker["kind"] == "run"
    return (folder / "checkpoints").is_dir() and ((folder / "latest").is_file() or (folder / "metrics.jsonl").is_file())


def run_folder_of(ckpt: Path) -> Path | None:
    """The run folder holding checkpoint directory `ckpt`, or None for a loose checkpoint."""
    if ckpt.parent.name == "checkpoints" and _is_run_folder(ckpt.parent.parent):
        return ckpt.parent.parent
    return None


def _resumed_plan(manifest: dict, stages_file: str | None, model_cfg, train_cfg) -> tuple[list | None, bool]:
    """(the plan a resumed run continues with, whether it differs from the checkpoint's)."""
    stored = manifest.get("stages")
    if stored is None:
        if stages_file:
            raise TinyMoeError("this run was not trained in stages; --stages cannot be added when resuming "
                               "(start a new run with --init from its checkpoint instead)")
        return None, False
    old = from_dicts(stored.get("plan") if isinstance(stored, dict) else None, "the checkpoint's manifest.json")
    if not stages_file:
        return old, False
    _, new = _with_plan(train_cfg, load_stages(stages_file, model_cfg, train_cfg))
    change = plan_change(old, new, manifest["step"])
    if change:
        raise TinyMoeError(f"{stages_file} changed a stage this run has already trained: {change}")
    return new, new != old


def _resumed_configs(manifest: dict, model_over: dict, train_over: dict, extend_steps: int,
                     stages_file: str | None = None):
    model_cfg = from_dict(ModelConfig, manifest["model"], "checkpoint model config")
    train_cfg = from_dict(TrainConfig, manifest["train"], "checkpoint train config")
    if "data" in train_over:  # compared as absolute specs: a relative path naming the same files is no change
        train_over = {**train_over, "data": [absolute_spec(s) for s in train_over["data"]]}
    if train_over.get("teacher_cache"):
        train_over = {**train_over, "teacher_cache": os.path.abspath(os.path.expanduser(train_over["teacher_cache"]))}
    changes = {**model_over, **train_over}
    for key, value in changes.items():
        if key == "steps":
            continue
        saved = getattr(model_cfg if key in model_over else train_cfg, key)
        if key not in RESUME_MAY_CHANGE and value != saved:
            raise TinyMoeError(f"cannot change '{key}' when resuming (checkpoint has {saved!r}, flag gives {value!r})")
    if "steps" in train_over and train_over["steps"] != train_cfg.steps:
        raise TinyMoeError(f"cannot change 'steps' when resuming (the run is planned for {train_cfg.steps} steps "
                           f"and its learning-rate schedule follows that); use --extend-steps N to lengthen it")
    train_cfg = apply_overrides(train_cfg, {k: v for k, v in train_over.items() if k in RESUME_MAY_CHANGE}, "flag")
    plan, changed = _resumed_plan(manifest, stages_file, model_cfg, train_cfg)
    if plan is not None and extend_steps:
        raise TinyMoeError("--extend-steps does not apply to a run in stages: lengthen a later stage or add one "
                           "to the stage file and pass it with --stages")
    if extend_steps:
        train_cfg = dataclasses.replace(train_cfg, steps=train_cfg.steps + extend_steps)
    if plan is not None:
        train_cfg = dataclasses.replace(train_cfg, data=all_specs(plan), steps=total_steps(plan))
    validate(model_cfg, train_cfg)
    if manifest["step"] >= train_cfg.steps:
        more = ("add a stage to the stage file and pass it with --stages" if plan is not None
                else "use --extend-steps N")
        raise TinyMoeError(f"the checkpoint is already at step {manifest['step']} of {train_cfg.steps}; "
                           f"{more} to train further")
    # Only the files of the stages begun so far must be the same when later stages changed.
    begun = all_specs(plan[:stage_at(plan, manifest["step"]) + 1]) if changed else None
    return model_cfg, train_cfg, plan, begun


def _check_data(manifest: dict, train_cfg: TrainConfig, marker: dict | None, allow_change: bool,
                begun: list | None = None):
    """(current data record, note) after checking the manifest against the run's record and the
    files against the record. `begun`: a run in stages whose later stages changed; only these
    specs' files are compared with (the start of) the record."""
    where = "the checkpoint's manifest.json"
    saved_data = manifest.get("train", {}).get("data")
    if marker is not None:
        if marker.get("data") is not None and marker["data"] != saved_data:
            raise TinyMoeError(f"{where} names data {saved_data} but the run record {MARKER} names "
                               f"{marker['data']}; refusing to resume (was the manifest edited?)")
    current = data_record(_data_specs(train_cfg))
    recorded = manifest.get("data", {}).get("files")
    if recorded is None and marker is not None:
        recorded = marker.get("data_files")
    if recorded is None:
        return current, "note: this checkpoint has no record of its data files; they were not verified"
    if begun is not None and isinstance(recorded, list):
        compared = data_record(begun)
        change = record_change(recorded[:len(compared)], compared)
    else:
        change = record_change(recorded, current)
    if change and not allow_change:
        raise TinyMoeError(f"the training data changed since this run started: {change}; resuming would not "
                           f"continue the same run (pass --allow-data-change to train on the new data anyway)")
    return current, ("note: training continues on changed data" if change else None)



def resume_run(path: str | Path, out: str | Path | None = None, model_over: dict | None = None,
               train_over: dict | None = None, *, keep: int | None = None, extend_steps: int = 0,
               allow_data_change: bool = False, overwrite: bool = False, progress: bool = True,
               stages_file: str | None = None, ranks=None) -> PreparedRun:
    """Continue the run of checkpoint `path` (a run folder: its latest) in its own folder, or in
    the new folder `out` (a branch: the run's settings and metrics up to that step are copied).
    A run in stages continues its stored plan, or `stages_file` when only stages not yet begun
    changed."""
    from tinymoe.io.loader import load_training_state

    state = load_training_state(path)
    manifest, ckpt = state["manifest"], state["ckpt"]
    model_cfg, train_cfg, plan, begun = _resumed_configs(manifest, model_over or {}, train_over or {}, extend_steps,
                                                         stages_file)
    source_run = run_folder_of(ckpt)
    target = Path(out) if out is not None else source_run
    if target is None:
        raise TinyMoeError(f"{ckpt} is not inside a run folder; pass --out DIR to continue it in a new run folder")
    if ranks is not None and not ranks.writer:  # reads the same checkpoint; rank 0 checks and writes the folder
        return _follower(_make_trainer(model_cfg, train_cfg, target, resume=state, progress=False, keep=keep or 0,
                                       stages=plan, ranks=ranks), target)
    in_place = source_run is not None and target.resolve() == source_run.resolve()
    marker = read_marker(source_run) if source_run is not None else None
    files, note = _check_data(manifest, train_cfg, marker, allow_data_change, begun)
    if keep is None:
        keep = (marker or {}).get("keep", 0)
    if in_place:
        newest = checkpoint.resolve(source_run)
        if newest.resolve() != ckpt.resolve() and checkpoint.step_of(newest) >= manifest["step"]:
            raise TinyMoeError(f"{ckpt.name} is older than the run's latest checkpoint {newest.name}: continuing "
                               f"from it here would replace newer checkpoints; resume the latest "
                               f"(--resume {source_run}) or branch with --out NEWDIR")
        return _train_in_place(target, model_cfg, train_cfg, keep, files, note, resume=state, progress=progress,
                               stages=plan, ranks=ranks)
    replace = check_output(target, "run", overwrite)  # a branch into a new (or replaced) folder
    existed_empty = target.is_dir() and not replace
    trainer = _make_trainer(model_cfg, train_cfg, target, resume=state, progress=progress, keep=keep, stages=plan,
                            ranks=ranks)
    lock = _fresh_folder(target, replace)
    try:
        _store_settings(target, keep, train_cfg, files)
        if source_run is not None:
            _copy_metrics(source_run, target, manifest["step"])
    except OSError as exc:
        lock.release()
        raise TinyMoeError(f"{target}: cannot write the run folder: {exc.strerror or exc}") from None
    trainer.data_files = files
    return PreparedRun(trainer, target, lock, note, created=True, existed_empty=existed_empty)


class _NoLock:
    def release(self) -> None:
        pass


def _follower(trainer, run_dir: Path) -> PreparedRun:
    """A data-parallel rank other than 0: it trains but never locks, writes or removes the folder."""
    return PreparedRun(trainer, run_dir, _NoLock())




def _copy_metrics(source_run: Path, target: Path, step: int) -> None:
    """A branch starts with its parent's log up to the step it branches from."""
    source = source_run / metrics_log.FILE_NAME
    if not source.is_file():
        return
    try:
        kept = [line for line, rec in metrics_log.read_records(source) if rec["step"] <= step]
    except OSError:
        return  # an unreadable parent log costs the branch its history, not the run
    tmp = target / f".{metrics_log.FILE_NAME}.tmp"
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, target / metrics_log.FILE_NAME)
