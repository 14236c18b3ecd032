"""A user's files are sacred: what --overwrite, --resume and --out may touch, the run record, the lock.

Each test is one of the ordinary mistakes that used to delete or damage data; every one asserts
both the refusal (one `error:` line, exit 2) and that the user's files are byte for byte intact.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from debug_run import one_error_line

from tinymoe.cli.main import cli
from tinymoe.data.corpus import bundled_corpus_dir


def run(*args, cwd=None):
    if cwd is not None:
        old = os.getcwd()
        os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        if cwd is not None:
            os.chdir(old)


def snapshot(folder: Path) -> dict:
    """Relative path -> bytes of every file under folder (the lock file aside)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "train.lock"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    src = bundled_corpus_dir()
    (root / "a.txt").write_text((src / "prose" / "shakespeare.txt").read_text()[:12000])
    return root


def train(out, corpus, *extra):
    return run("train", "--preset", "debug", "--data", corpus, "--steps", 4, "--eval-every", 0, "--out", out,
               "--quiet", "--json", *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("lifecycle") / "run"
    result = train(out, corpus, "--save-every", 1, "--keep", 2, "--log-every", 1)
    assert result.exit_code == 0, result.output
    return out


def fresh_copy(trained, tmp_path, name="copy"):
    copy = tmp_path / name
    shutil.copytree(trained, copy)
    return copy


# ----------------------------------------------------------------------------- --overwrite


@pytest.mark.parametrize("lookalike", ["checkpoints", "metrics.jsonl"])
def test_overwrite_refuses_a_folder_that_merely_looks_like_a_run(tmp_path, corpus, lookalike):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    (project / lookalike).mkdir() if lookalike == "checkpoints" else (project / lookalike).write_text("{}\n")
    before = snapshot(project)
    one_error_line(train(project, corpus, "--overwrite"), "not a folder tinymoe created", "refusing")
    assert snapshot(project) == before


def test_overwrite_checks_the_new_inputs_before_deleting_the_old_run(trained, tmp_path, corpus):
    copy = fresh_copy(trained, tmp_path)
    before = snapshot(copy)
    one_error_line(run("train", "--preset", "debug", "--data", tmp_path / "typo.txt", "--out", copy, "--overwrite"),
                   "typo.txt")
    assert snapshot(copy) == before  # the old run is still all there


def test_overwrite_replaces_a_marked_run(trained, tmp_path, corpus):
    copy = fresh_copy(trained, tmp_path)
    result = train(copy, corpus, "--steps", 2, "--overwrite")
    assert result.exit_code == 0, result.output
    steps = sorted(p.name for p in (copy / "checkpoints").iterdir())
    assert steps == ["step-0000002"]  # nothing of the old run is left
    assert json.loads((copy / "tinymoe.json").read_text())["steps"] == 2


def test_export_overwrite_refuses_a_users_hf_model(trained, tmp_path):
    theirs = tmp_path / "their-model"
    theirs.mkdir()
    (theirs / "config.json").write_text('{"model_type": "llama"}')
    (theirs / "model.safetensors").write_bytes(b"precious")
    before = snapshot(theirs)
    one_error_line(run("export", trained, "--out", theirs, "--overwrite", "--no-check"), "refusing")
    assert snapshot(theirs) == before


def test_export_replaces_only_its_own_export_and_marks_it(trained, tmp_path):
    out = tmp_path / "export"
    assert run("export", trained, "--out", out, "--no-check").exit_code == 0
    marker = json.loads((out / "tinymoe.json").read_text())
    assert marker["kind"] == "export" and (out / "config.json").is_file()
    one_error_line(run("export", trained, "--out", out, "--no-check"), "--overwrite")
    assert run("export", trained, "--out", out, "--no-check", "--overwrite").exit_code == 0
    # A run folder is not an export, and an export is not a run: neither replaces the other.
    one_error_line(run("export", trained, "--out", fresh_copy(trained, tmp_path), "--overwrite", "--no-check"),
                   "tinymoe run folder")
    one_error_line(run("train", "--preset", "debug", "--out", out, "--overwrite"), "tinymoe export folder")


def test_out_that_is_not_a_folder_is_one_line(corpus):
    one_error_line(train("/dev/null", corpus), "/dev/null", "not a")


# ----------------------------------------------------------------------------- --resume


def test_resume_into_another_run_leaves_it_alone(trained, tmp_path, corpus):
    other = tmp_path / "other"
    assert train(other, corpus, "--steps", 2, "--seed", 3).exit_code == 0
    before = snapshot(other)
    one_error_line(run("train", "--resume", trained, "--out", other, "--extend-steps", 1), "--overwrite")
    assert snapshot(other) == before


def test_resume_into_a_folder_that_is_not_a_run_is_refused(trained, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("mine")
    one_error_line(run("train", "--resume", trained, "--out", folder, "--extend-steps", 1), "not a folder tinymoe")
    assert snapshot(folder) == {"todo.txt": b"mine"}


def test_resume_a_loose_checkpoint_needs_an_out_folder(trained, tmp_path):
    loose = tmp_path / "loose"
    shutil.copytree(trained / "checkpoints" / "step-0000004", loose)
    before = snapshot(loose)
    one_error_line(run("train", "--resume", loose, "--extend-steps", 1), "not inside a run folder", "--out")
    assert snapshot(loose) == before


def test_branching_from_an_older_checkpoint_keeps_the_source_run(trained, tmp_path):
    copy = fresh_copy(trained, tmp_path)
    before = snapshot(copy)
    older = copy / "checkpoints" / "step-0000003"
    one_error_line(run("train", "--resume", older, "--extend-steps", 1), "older than the run's latest", "--out")
    assert snapshot(copy) == before
    branch = tmp_path / "branch"
    result = run("train", "--resume", older, "--out", branch, "--quiet", "--json")
    assert result.exit_code == 0, result.output
    assert snapshot(copy) == before  # the source run is untouched by the branch
    logged = [json.loads(line)["step"] for line in (branch / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(logged) and logged[-1] == 4 and 3 in logged  # parent's log to step 3, then its own
    assert json.loads((branch / "tinymoe.json").read_text())["keep"] == 2  # the run's settings came along


def test_keep_is_stored_with_the_run_and_used_on_resume(trained, tmp_path):
    copy = fresh_copy(trained, tmp_path)
    assert json.loads((copy / "tinymoe.json").read_text())["keep"] == 2
    result = run("train", "--resume", copy, "--extend-steps", 2, "--save-every", 1, "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step-0000004", "step-0000005",
                                                                        "step-0000006"]


def test_resume_refuses_a_longer_schedule_unless_extended(trained, tmp_path):
    copy = fresh_copy(trained, tmp_path)
    before = snapshot(copy)
    one_error_line(run("train", "--resume", copy, "--steps", 8), "cannot change 'steps'", "--extend-steps")
    assert snapshot(copy) == before
    result = run("train", "--resume", copy, "--extend-steps", 2, "--quiet", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["step"] == 6
    manifest = json.loads((copy / "checkpoints" / "step-0000006" / "manifest.json").read_text())
    assert manifest["train"]["steps"] == 6


def test_resume_refuses_changed_data_unless_allowed(tmp_path, corpus):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    out = tmp_path / "run"
    assert train(out, data).exit_code == 0
    before = snapshot(out)
    with open(data / "a.txt", "a") as f:
        f.write("one more line\n")
    one_error_line(run("train", "--resume", out, "--extend-steps", 1), "data changed", "a.txt",
                   "--allow-data-change")
    assert snapshot(out) == before
    result = run("train", "--resume", out, "--extend-steps", 1, "--allow-data-change", "--quiet")
    assert result.exit_code == 0, result.output


def test_resume_does_not_trust_an_edited_manifest(trained, tmp_path):
    copy = fresh_copy(trained, tmp_path)
    path = copy / "checkpoints" / "step-0000004" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["train"]["data"] = ["/etc/passwd"]
    path.write_text(json.dumps(manifest))
    before = snapshot(copy)
    one_error_line(run("train", "--resume", copy, "--extend-steps", 1), "was the manifest edited")
    assert snapshot(copy) == before


def test_relative_data_paths_work_from_any_directory(tmp_path, corpus):
    work = tmp_path / "work"
    shutil.copytree(corpus, work / "texts")
    result = run("train", "--preset", "debug", "--data", "texts", "--steps", 2, "--eval-every", 0, "--out", "run",
                 "--quiet", cwd=work)
    assert result.exit_code == 0, result.output
    manifest = json.loads((work / "run" / "checkpoints" / "step-0000002" / "manifest.json").read_text())
    assert manifest["train"]["data"] == [str(work / "texts")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert run("eval", work / "run", "--json", cwd=elsewhere).exit_code == 0
    assert run("train", "--resume", work / "run", "--extend-steps", 1, "--quiet", cwd=elsewhere).exit_code == 0


# ----------------------------------------------------------------------------- lock and readers

HOLD_LOCK = r"""
import sys, time
from tinymoe.run.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_trainer_on_a_busy_run_is_refused(trained, tmp_path):
    copy = fresh_copy(trained, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(copy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(copy)
        line = one_error_line(run("train", "--resume", copy, "--extend-steps", 1), "is being trained by")
        assert f"pid {holder.pid}" in line
        one_error_line(run("train", "--preset", "debug", "--out", copy, "--overwrite"), "is being trained by")
        assert snapshot(copy) == before
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: its lock file is stale and simply taken over.
    assert (copy / "train.lock").exists()
    assert run("train", "--resume", copy, "--extend-steps", 1, "--quiet").exit_code == 0


def test_reader_retries_when_its_checkpoint_is_pruned_under_it(trained, tmp_path):
    from tinymoe.io.loader import load_model
    from tinymoe.run.readers import read_latest

    copy = fresh_copy(trained, tmp_path)
    calls = []

    def read_while_a_trainer_prunes(ckpt):
        calls.append(ckpt.name)
        if len(calls) == 1:  # what a trainer does meanwhile: a newer step lands, this one is pruned
            shutil.copytree(ckpt, ckpt.parent / "step-0000009")
            (copy / "latest").write_text("step-0000009\n")
            shutil.rmtree(ckpt)
        return load_model(ckpt)

    model, manifest, _, ckpt = read_latest(copy, read_while_a_trainer_prunes)
    assert calls == ["step-0000004", "step-0000009"] and ckpt.name == "step-0000009"
    # A checkpoint named directly is never swapped for another one.
    with pytest.raises(Exception, match="missing|no such"):
        read_latest(copy / "checkpoints" / "step-0000003",
                    lambda c: (shutil.rmtree(c), load_model(c)))


TRAIN_LONG = [sys.executable, "-m", "tinymoe.cli.main", "train", "--preset", "debug", "--steps", "400",
              "--save-every", "1", "--eval-every", "0", "--quiet"]


def test_sample_and_eval_while_training_never_fail(tmp_path, corpus):
    """Readers against a trainer that saves and prunes every step."""
    out = tmp_path / "busy"
    assert train(out, corpus, "--steps", 1).exit_code == 0
    trainer = subprocess.Popen(TRAIN_LONG + ["--data", str(corpus), "--out", str(out), "--overwrite"],
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "latest").is_file() or (out / "latest").read_text().strip() == "step-0000001":
            assert trainer.poll() is None and time.monotonic() < deadline, trainer.stderr.read()
            time.sleep(0.05)
        seen = set()
        for i in range(20):
            command = ("sample", out, "--max-tokens", 2, "--seed", 0, "--json") if i % 2 else ("eval", out, "--json",
                                                                                              "--max-batches", 1)
            result = run(*command)
            assert result.exit_code == 0, result.output
            seen.add((out / "latest").read_text().strip())
        assert trainer.poll() is None, "the trainer finished too early to overlap with the readers"
        assert len(seen) > 1  # checkpoints really were replaced while we read
    finally:
        trainer.kill()
        trainer.wait()


# ----------------------------------------------------------------------------- hidden leftovers


def test_only_marked_leftovers_are_ever_removed(tmp_path):
    """Names like tinymoe's hidden staging folders are not enough: a folder without the marker is
    never deleted, and a staged write refuses rather than clear one in its way."""
    from tinymoe.errors import TinyMoeError
    from tinymoe.io.folders import clean_leftovers, staged_output, write_marker

    out = tmp_path / "out"
    dead_pid = 2**22 + 12345  # above Linux's default pid_max: no such process
    theirs = tmp_path / f".out.tmp-{dead_pid}"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    ours = tmp_path / f".out.old-{dead_pid}"
    ours.mkdir()
    write_marker(ours, "export")
    clean_leftovers(out)
    assert (theirs / "notes.txt").read_text() == "mine"
    assert out.is_dir() and (out / "tinymoe.json").is_file() and not ours.exists()  # restored, not lost

    blocker = tmp_path / f".out.tmp-{os.getpid()}"
    blocker.mkdir()
    (blocker / "notes.txt").write_text("mine")
    with pytest.raises(TinyMoeError, match="staging folder"):
        with staged_output(out, "export", overwrite=True):
            pass
    assert (blocker / "notes.txt").read_text() == "mine"
    assert (out / "tinymoe.json").is_file()  # the earlier export is untouched


def test_a_deletion_cut_short_is_finished_by_the_next_write(tmp_path):
    """Deleting removes the marker last, so whatever a kill leaves is still recognisably ours."""
    from tinymoe.io.folders import MARKER, clean_leftovers, delete_marked, write_marker

    dead_pid = 2**22 + 54321
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the current output")
    half = tmp_path / f".out.del-{dead_pid}"  # marker still there, some contents already gone
    (half / "sub").mkdir(parents=True)
    write_marker(half, "export")
    (half / "sub" / "model.safetensors").write_bytes(b"x")
    emptied = tmp_path / f".out.tmp-{dead_pid + 1}"  # killed before its marker was written
    emptied.mkdir()
    (emptied / f".{MARKER}.tmp-{dead_pid + 1}").write_text("{")
    clean_leftovers(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "keep.txt").read_text() == "the current output"

    folder = tmp_path / "marked"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "a" / "b" / "f").write_text("x")
    write_marker(folder, "run")
    delete_marked(folder)
    assert not folder.exists()
