"""The interop commands as a user meets them: upcycle -> train --init / --resume -> eval ->
export -> import, JSON reports, and bad input -> `error: ...` with exit code 2."""

import json

import pytest
from click.testing import CliRunner

from tinymoe.cli.main import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A dense debug model trained a few steps on the bundled corpus."""
    out = tmp_path_factory.mktemp("interop") / "dense"
    ok("train", "--preset", "debug", "--moe-experts", 1, "--moe-topk", 1, "--steps", 3, "--out", out, "--quiet")
    return out


def test_upcycle_train_eval_export_import(dense_run, tmp_path):
    up = tmp_path / "up"
    report = json.loads(ok("upcycle", dense_run, "--moe-experts", 4, "--moe-topk", 2, "--shared-experts", 1,
                           "--out", up, "--json").output)
    assert report["identity_check"]["within_float32_noise"] and report["moe_layers"] == [0, 1]
    text = ok("upcycle", dense_run, "--moe-experts", 4, "--moe-topk", 2, "--drop-fraction", 0.5,
              "--out", tmp_path / "drop").output
    assert "max |logit diff|" in text and "differs, as expected" in text

    # --init: a new run from the upcycled weights; --resume on the weights-only checkpoint also works.
    summary = json.loads(ok("train", "--init", up, "--preset", "debug", "--steps", 2, "--out", tmp_path / "run",
                            "--quiet", "--json").output)
    assert summary["step"] == 2
    ok("train", "--resume", up, "--preset", "debug", "--steps", 2, "--quiet")
    assert (up / "checkpoints" / "step-0000002" / "manifest.json").is_file()
    ev = json.loads(ok("eval", tmp_path / "run", "--json", "--max-batches", 2).output)
    assert ev["loss"] > 0

    exported = json.loads(ok("export", tmp_path / "run", "--format", "hf", "--out", tmp_path / "hf", "--json",
                             "--no-check").output)
    assert exported["architecture"] == "ernie4_5_moe"  # shared experts: Mixtral has none
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    imported = json.loads(ok("import", tmp_path / "hf", "--out", tmp_path / "back", "--json").output)
    assert imported["architecture"] == "ernie4_5_moe" and imported["tokenizer"] == "bytes"
    s = json.loads(ok("sample", tmp_path / "back", "--prompt", "The ", "--max-tokens", 4, "--json").output)
    assert s["tokens"] == 4


def test_interop_bad_input_exits_2(dense_run, tmp_path):
    cases = [
        (("upcycle", dense_run, "--moe-experts", 4, "--moe-topk", 2, "--every-n", 5, "--out", tmp_path / "a"),
         "no layer becomes MoE"),
        (("upcycle", tmp_path / "nope", "--moe-experts", 4, "--moe-topk", 2, "--out", tmp_path / "b"),
         "no such directory"),
        (("upcycle", dense_run, "--moe-experts", 4, "--moe-topk", 5, "--out", tmp_path / "c"), "exceeds"),
        (("import", dense_run.parent, "--out", tmp_path / "d"), "config.json"),
        (("export", dense_run, "--out", tmp_path / "e", "--arch", "mixtral"), "--arch mixtral"),
        (("train", "--init", dense_run, "--d-model", 64, "--out", tmp_path / "f"), "cannot change 'd_model'"),
        (("train", "--init", dense_run, "--resume", dense_run), "pass only one of them"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
    # A non-empty --out is never silently replaced.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    result = run("upcycle", dense_run, "--moe-experts", 4, "--moe-topk", 2, "--out", tmp_path / "busy")
    assert result.exit_code == 2 and "not empty" in result.output


def test_interop_help_is_instant_and_complete():
    for command in ("upcycle", "export", "import"):
        result = ok(command, "--help")
        assert "--out" in result.output
    assert "--init" in ok("train", "--help").output
