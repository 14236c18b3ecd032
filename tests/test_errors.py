"""Bad input through the command line: one case per entry of docs/errors.md.

Each case runs the real command with CliRunner and checks the exit code (2 for every command,
1 for `validate`, which reports rather than fails), that the error is one line, and that it
names the file and the problem. Cases already covered by tests/test_cli.py (unknown preset,
conflicting MoE flags, missing data file, corpus shorter than a context, ...) are listed in
docs/errors.md and not repeated here.
"""

import errno
import json
import os
import shutil
import struct

import pytest
from debug_run import write_corpus
from click.testing import CliRunner

from tinymoe.io import safetensors_io
from tinymoe.cli.main import cli
from tinymoe.io.validate import validate_checkpoint


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(result, code=2):
    """The single `error:` line of a failed command (warnings may precede it)."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    others = [line for line in result.output.splitlines() if line and not line.startswith(("error:", "warning:"))]
    assert len(errors) == 1 and not others, result.output
    return errors[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("errors"), 80)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("errors") / "run"
    result = invoke("train", "--preset", "debug", "--data", corpus, "--steps", 2, "--eval-every", 0,
                    "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out / "checkpoints" / "step-0000002"


# ----------------------------------------------------------------------------- training input

def _data(tmp, name):
    """Write the bad input `name` under tmp; return the --data argument and the file to name."""
    if name == "empty file":
        (tmp / "empty.txt").write_text("")
        return tmp / "empty.txt", "empty.txt"
    if name == "empty directory":
        (tmp / "nothing").mkdir()
        return tmp / "nothing", "nothing"
    if name == "only binary files":
        (tmp / "bin").mkdir()
        (tmp / "bin" / "blob.dat").write_bytes(b"\x7fELF\x00\x01" * 50)
        return tmp / "bin", "bin"
    if name == "jsonl without text field":
        (tmp / "recs.jsonl").write_text('{"text": "fine"}\n{"title": "no text here"}\n')
        return tmp / "recs.jsonl", "recs.jsonl:2: record has no 'text' field"
    if name == "jsonl invalid line":
        (tmp / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
        return tmp / "broken.jsonl", "broken.jsonl:2: invalid JSON"
    if name == "unmatched glob":
        return tmp / "*.nomatch", "*.nomatch: glob pattern matches no files"
    raise AssertionError(name)


@pytest.mark.parametrize("name, problem", [
    ("empty file", "all 1 documents are empty"),
    ("empty directory", "no documents found"),
    ("only binary files", "no documents found"),
    ("jsonl without text field", ""),
    ("jsonl invalid line", ""),
    ("unmatched glob", ""),
])
def test_bad_training_data(tmp_path, name, problem):
    data, names = _data(tmp_path, name)
    result = invoke("train", "--preset", "debug", "--data", data, "--out", tmp_path / "run", "--quiet")
    line = error_line(result)
    assert names in line and problem in line, line
    if name == "only binary files":  # skipped with a warning naming the file, then nothing is left
        assert "warning:" in result.output and "blob.dat" in result.output and "skipped" in result.output
    assert not (tmp_path / "run").exists()


def test_binary_and_non_utf8_files_are_handled_by_policy(tmp_path):
    """Binary files are skipped with a warning; invalid UTF-8 bytes become U+FFFD (see errors.md)."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "d" / "latin1.txt").write_bytes(("caf\xe9 au lait. " * 40).encode("latin-1"))
    result = invoke("train", "--preset", "debug", "--data", tmp_path / "d", "--steps", 1, "--eval-every", 0,
                    "--out", tmp_path / "run", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "blob.bin" in result.output


@pytest.mark.parametrize("args, problem", [
    (["--set", "d_model=31"], "d_model 31 is not divisible by n_heads 2"),
    (["--max-bad-steps", "0"], "max_bad_steps must be positive"),
    (["--set", "spike_factor=-1.0"], "spike_factor must be >= 0"),
    (["--preset", "{tmp}/broken.toml"], "broken.toml: invalid TOML"),
])
def test_bad_settings(tmp_path, args, problem):
    (tmp_path / "broken.toml").write_text("[model\nd_model = 3")
    args = [a.format(tmp=tmp_path) for a in args]
    preset = [] if "--preset" in args else ["--preset", "debug"]
    line = error_line(invoke("train", *preset, *args, "--out", tmp_path / "run"))
    assert problem in line, line


def test_unwritable_output_directory(tmp_path, corpus):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    line = error_line(invoke("train", "--preset", "debug", "--data", corpus, "--steps", 1,
                             "--out", blocker / "run", "--quiet"))
    assert f"{blocker / 'run'}: cannot write the run directory" in line, line


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, corpus, monkeypatch):
    real = safetensors_io.write

    def write(path, *args, **kwargs):
        if "step-0000004" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors_io, "write", write)
    run = tmp_path / "run"
    line = error_line(invoke("train", "--preset", "debug", "--data", corpus, "--steps", 4, "--save-every", 2,
                             "--eval-every", 0, "--out", run, "--quiet"))
    assert f"{run}/checkpoints/step-0000004: cannot save checkpoint: No space left on device" in line
    assert "the previous checkpoint is untouched" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]
    assert validate_checkpoint(run)["valid"]


def test_resume_already_finished(trained):
    line = error_line(invoke("train", "--resume", trained))
    assert "checkpoint is already at step 2 of 2" in line and "--extend-steps" in line


# ----------------------------------------------------------------------------- checkpoints

def _manifest_edit(fn):
    def apply(ck):
        m = json.loads((ck / "manifest.json").read_text())
        fn(m)
        (ck / "manifest.json").write_text(json.dumps(m))
    return apply


def _forge_header_length(ck):
    path = ck / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", 2**62)
    path.write_bytes(bytes(raw))
    import hashlib

    _manifest_edit(lambda m: m["files"].update({"model.safetensors": {
        "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}}))(ck)


def _flip(ck):
    path = ck / "experts.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x10
    path.write_bytes(bytes(raw))


CKPT_CASES = {
    "newer format version": (_manifest_edit(lambda m: m.update(version=99)), "manifest.json",
                             "format version 99 is newer than this tinymoe reads"),
    "manifest not JSON": (lambda ck: (ck / "manifest.json").write_text('{"format": '), "manifest.json",
                          "not valid JSON"),
    "manifest missing a field": (_manifest_edit(lambda m: m.pop("files")), "manifest.json", "missing 'files'"),
    "manifest wrong type": (_manifest_edit(lambda m: m["tensors"]["embed.weight"].update(shape="big")),
                            "manifest.json", "tensor 'embed.weight': shape 'big' is not a list"),
    "truncated safetensors": (lambda ck: (ck / "experts.safetensors").write_bytes(
        (ck / "experts.safetensors").read_bytes()[:5000]), "experts.safetensors", "truncated"),
    "corrupted bytes": (_flip, "experts.safetensors", "sha256 does not match the manifest"),
    "missing file": (lambda ck: (ck / "optimizer.safetensors").unlink(), "optimizer.safetensors", "missing"),
    "forged header length": (_forge_header_length, "model.safetensors", "bad safetensors header: header length"),
    "weights do not fit the config": (_manifest_edit(lambda m: m["model"].update(d_ff=48)), "manifest.json",
                                      "the model config implies"),
    "tokenizer file missing": (_manifest_edit(lambda m: m.update(tokenizer={"kind": "sp", "vocab_size": 256})),
                               "tokenizer.model", "tokenizer file is missing"),
    "not a checkpoint": (lambda ck: (shutil.rmtree(ck), ck.mkdir(), (ck / "notes.txt").write_text("hi")),
                         "", "not a tinymoe checkpoint"),
    "a file, not a directory": (lambda ck: (shutil.rmtree(ck), ck.write_text("hi")), "", "is a file"),
}


@pytest.mark.parametrize("command", ["sample", "resume", "validate"])
@pytest.mark.parametrize("case", sorted(CKPT_CASES))
def test_bad_checkpoint(tmp_path, trained, case, command):
    damage, names, problem = CKPT_CASES[case]
    ck = tmp_path / "ck"
    shutil.copytree(trained, ck)
    damage(ck)
    if command == "validate":
        result = invoke("validate", ck)
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert lines[-1].startswith("invalid: ")
        assert all(line.startswith(str(ck)) for line in lines[:-1]), lines  # each names its file
        line = lines[0]
    elif command == "resume":
        line = error_line(invoke("train", "--resume", ck, "--steps", 5, "--quiet"))
    else:
        line = error_line(invoke("sample", ck, "--max-tokens", 1))
    assert f"{ck}/{names}" in line or (not names and str(ck) in line), line
    assert problem in line, line


def test_validate_json_and_usage(trained):
    ok = invoke("validate", trained, "--json")
    assert ok.exit_code == 0 and json.loads(ok.output)["valid"] is True
    assert json.loads(ok.output)["problems"] == []
    assert invoke("validate").exit_code == 2  # usage error: no CHECKPOINT
