"""Saving that cannot lose a checkpoint: failed writes, crash leftovers, `latest`, --keep.

Each test builds the on-disk state a fault leaves behind (or injects the fault itself) and checks
that the run still resolves to a complete checkpoint with exactly the expected tensors.
"""

import errno
import os
import shutil
import subprocess

import pytest

import ckpt_factory as factory
from tinymoe.io import checkpoint, safetensors_io
from tinymoe.errors import CheckpointError
from tinymoe.io.validate import validate_checkpoint

SMALL = {"vocab_size": 256, "d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
         "context": 8, "d_ff": 32, "moe_experts": 2, "moe_topk": 1}


@pytest.fixture(scope="module")
def base():
    return factory.bases(factory.param_shapes(SMALL))


def save(run, base, step, keep=0):
    return factory.save_version(run, base, SMALL, step, keep=keep)


def hidden(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))


def visible(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))


def assert_intact(run, base, step):
    ckpt = checkpoint.resolve(run)
    assert ckpt.name == checkpoint.step_dirname(step)
    report = validate_checkpoint(run)
    assert report["valid"], report["problems"]
    factory.assert_is_version(ckpt, base, step)


@pytest.mark.parametrize("fail_on", ["model.safetensors", "optimizer.safetensors", "manifest"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_failed_write_cleans_up_and_keeps_the_previous_checkpoint(tmp_path, base, monkeypatch, fail_on, err):
    save(tmp_path, base, 1)
    real_write, real_atomic = safetensors_io.write, checkpoint._write_bytes_atomic

    def write(path, *args, **kwargs):
        if path.endswith(fail_on):
            with open(path, "wb") as f:
                f.write(b"\0" * 1000)  # a partial file, as a full disk leaves it
            raise OSError(err, os.strerror(err), path)
        return real_write(path, *args, **kwargs)

    def atomic(path, data):
        if fail_on == "manifest" and path.name == "manifest.json":
            raise OSError(err, os.strerror(err), str(path))
        return real_atomic(path, data)

    monkeypatch.setattr(safetensors_io, "write", write)
    monkeypatch.setattr(checkpoint, "_write_bytes_atomic", atomic)
    with pytest.raises(CheckpointError) as info:
        save(tmp_path, base, 2)
    message = str(info.value)
    assert "\n" not in message and "step-0000002" in message and os.strerror(err) in message
    assert "previous checkpoint is untouched" in message
    assert hidden(tmp_path) == [] and visible(tmp_path) == ["step-0000001"]
    assert (tmp_path / "latest").read_text().strip() == "step-0000001"
    assert_intact(tmp_path, base, 1)


def _mount_tmpfs(where, size):
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): the injected-OSError tests cover this")


def test_real_full_and_read_only_filesystem(tmp_path, base):
    """On a real 512 KiB tmpfs: a save that does not fit, then a read-only remount."""
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "512k")
    try:
        save(mnt, base, 1)  # ~60 KB: fits
        big = factory.bases(factory.param_shapes({**SMALL, "d_model": 64, "d_ff": 128}))
        with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is untouched"):
            factory.save_version(mnt, big, {**SMALL, "d_model": 64, "d_ff": 128}, 2)
        assert hidden(mnt) == [] and visible(mnt) == ["step-0000001"]
        assert_intact(mnt, base, 1)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(CheckpointError, match="Read-only file system"):
            save(mnt, base, 3)
        assert_intact(mnt, base, 1)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_crash_after_rename_before_latest_update(tmp_path, base):
    """`latest` still names the previous step: it wins; stale or garbage `latest` falls back."""
    save(tmp_path, base, 1, keep=5)
    save(tmp_path, base, 2, keep=5)
    (tmp_path / "latest").write_text("step-0000001\n")  # the rename of step 2 happened, the update not
    assert_intact(tmp_path, base, 1)
    for content in ["step-0000009\n", "", "../../etc\n", "\xff"]:  # dangling, empty, escaping, junk
        (tmp_path / "latest").write_text(content)
        assert_intact(tmp_path, base, 2)
    (tmp_path / "latest").unlink()
    assert_intact(tmp_path, base, 2)


def test_leftovers_of_crashed_saves_are_ignored_then_cleaned(tmp_path, base):
    save(tmp_path, base, 1)
    root = tmp_path / "checkpoints"
    # A temporary directory of a process that died mid-save, with a manifest already written and
    # a higher step: it must never be picked.
    dead = root / ".step-0000002.tmp-999999999"
    shutil.copytree(root / "step-0000001", dead)
    shutil.copytree(root / "step-0000001", root / ".step-0000003.del-999999999")  # half-pruned
    live = root / f".step-0000004.tmp-{os.getppid()}"  # a live process's save in progress
    live.mkdir()
    assert_intact(tmp_path, base, 1)
    save(tmp_path, base, 5)
    assert hidden(tmp_path) == [live.name]  # the live one is not ours to delete
    assert visible(tmp_path) == ["step-0000005"]
    assert_intact(tmp_path, base, 5)


def test_crash_while_replacing_a_step_keeps_the_old_copy(tmp_path, base):
    """Re-saving step 2: killed after moving the old step 2 aside, before the new one arrived."""
    save(tmp_path, base, 2)
    root = tmp_path / "checkpoints"
    os.replace(root / "step-0000002", root / ".step-0000002.old-999999999")
    assert checkpoint.resolve(tmp_path).name == ".step-0000002.old-999999999"
    assert validate_checkpoint(tmp_path)["valid"]
    factory.assert_is_version(checkpoint.resolve(tmp_path), base, 2)
    save(tmp_path, base, 3, keep=1)  # the next save brings it back under its own name
    assert visible(tmp_path) == ["step-0000002", "step-0000003"] and hidden(tmp_path) == []
    assert_intact(tmp_path, base, 3)


def test_resaving_a_step_replaces_it(tmp_path, base):
    save(tmp_path, base, 3)
    weights, opt = factory.state(base, 7)
    checkpoint.save(tmp_path, 3, weights, opt, factory.manifest_for(SMALL))
    assert visible(tmp_path) == ["step-0000003"] and hidden(tmp_path) == []
    factory.assert_is_version(checkpoint.resolve(tmp_path), base, 7)


def test_keep_n_keeps_the_newest_by_step_number(tmp_path, base):
    for step in (9_999_998, 9_999_999, 10_000_000, 10_000_001):  # names change width at 10^7
        save(tmp_path, base, step, keep=2)
    assert visible(tmp_path) == ["step-10000000", "step-10000001", "step-9999999"]
    assert (tmp_path / "latest").read_text().strip() == "step-10000001"
    assert_intact(tmp_path, base, 10_000_001)
