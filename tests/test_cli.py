"""The command line as a user meets it: a smoke run, JSON outputs, and bad input -> exit 2."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tinymoe.cli.main import cli


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A debug MoE trained a few steps on the bundled corpus."""
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run("train", "--preset", "debug", "--steps", 6, "--eval-every", 3, "--out", out, "--quiet", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["step"] == 6 and summary["val_loss"] > 0
    return out


def test_smoke_train_sample_eval_inspect(trained):
    assert (trained / "latest").is_file() and (trained / "metrics.jsonl").is_file()
    ckpt = trained / "checkpoints" / "step-0000006"
    assert {"manifest.json", "model.safetensors", "experts.safetensors", "optimizer.safetensors"} <= {
        p.name for p in ckpt.iterdir()}

    s = run("sample", trained, "--prompt", "The ", "--max-tokens", 12, "--seed", 1, "--json")
    assert s.exit_code == 0, s.output
    sample = json.loads(s.output)
    assert sample["tokens"] == 12 and isinstance(sample["text"], str)

    e = run("eval", trained, "--json")
    assert e.exit_code == 0, e.output
    ev = json.loads(e.output)
    assert set(ev) == {"loss", "ppl", "bits_per_byte", "tokens", "loss_on"} and ev["loss_on"] == "all"
    assert ev["ppl"] == pytest.approx(__import__("math").exp(ev["loss"]), rel=1e-6)
    assert ev["bits_per_byte"] == pytest.approx(ev["loss"] / __import__("math").log(2), rel=1e-6)  # bytes

    i = run("inspect", trained, "--json")
    assert i.exit_code == 0, i.output
    info = json.loads(i.output)
    assert info["params"]["total"] > info["params"]["active"] > 0
    assert [layer["layer"] for layer in info["layers"]] == [0, 1]
    for layer in info["layers"]:
        assert layer["experts"] == 4 and layer["top_k"] == 2 and len(layer["load"]) == 4
        assert sum(layer["load"]) == pytest.approx(1.0, abs=1e-4)
        assert {"entropy", "load_cv", "dead_experts"} <= set(layer)

    text = run("inspect", trained)
    assert text.exit_code == 0 and "expert   0" in text.output


def test_resume_extends_to_new_total(trained, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    r = run("train", "--resume", copy, "--extend-steps", 2, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["step"] == 8
    conflict = run("train", "--resume", copy, "--extend-steps", 2, "--moe-experts", 8)
    assert conflict.exit_code == 2 and "moe_experts" in conflict.output


BAD = [
    (["train", "--preset", "nope", "--out", "{tmp}/x"], "unknown preset"),
    (["train", "--preset", "debug", "--moe-topk", "8", "--out", "{tmp}/x"], "moe_topk 8 exceeds"),
    (["train", "--preset", "debug", "--d-model", "-4", "--out", "{tmp}/x"], "d_model must be positive"),
    (["train", "--preset", "debug", "--steps", "0", "--out", "{tmp}/x"], "steps must be positive"),
    (["train", "--preset", "debug", "--data", "{tmp}/missing.txt", "--out", "{tmp}/x"], "missing.txt"),
    (["train", "--preset", "debug", "--data", "{tmp}/short.txt", "--out", "{tmp}/x"], "short.txt"),
    (["train", "--preset", "debug", "--tokenizer", "wordpiece", "--out", "{tmp}/x"], "wordpiece"),
    (["train", "--preset", "debug", "--set", "colour=blue", "--out", "{tmp}/x"], "unknown setting 'colour'"),
    (["train", "--preset", "debug", "--set", "d_model=wide", "--out", "{tmp}/x"], "d_model"),
    (["train", "--preset", "debug"], "--out is required"),
    (["train", "--preset", "debug", "--out", "{tmp}/notrun"], "already exists"),
    (["sample", "{tmp}/nothing"], "no such checkpoint"),
    (["eval", "{tmp}/notrun"], "not a tinymoe checkpoint"),
    (["inspect", "{tmp}/badjson"], "not valid JSON"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a[:3]) + "…" + m for a, m in BAD])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "notrun").mkdir()
    (tmp_path / "notrun" / "mine.txt").write_text("user data")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "manifest.json").write_text("{oops")
    result = CliRunner().invoke(cli, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert (tmp_path / "notrun" / "mine.txt").read_text() == "user data"  # never touched


def test_help_does_not_import_mlx():
    code = "import sys; from tinymoe.cli.main import cli; sys.argv=['tinymoe','--help']\n" \
           "try:\n    cli()\nexcept SystemExit:\n    pass\nassert 'mlx.core' not in sys.modules, 'mlx imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert out.returncode == 0, out.stderr


def test_sentencepiece_run_end_to_end(tmp_path):
    """sp:N is trained, stored in the checkpoint, reloaded; bits/byte accounts for bytes/token."""
    import math

    out = tmp_path / "sp"
    r = run("train", "--preset", "debug", "--tokenizer", "sp:400", "--steps", 3, "--out", out, "--quiet", "--json")
    assert r.exit_code == 0, r.output
    ckpt = out / "checkpoints" / "step-0000003"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "sp" and manifest["model"]["vocab_size"] == 400
    assert (ckpt / "tokenizer.model").is_file()
    ev = json.loads(run("eval", out, "--json").output)
    # Merged sp pieces cover several bytes, so bits/byte is below loss/ln2 (equal for bytes).
    assert ev["bits_per_byte"] < 0.97 * ev["loss"] / math.log(2)
    s = run("sample", out, "--prompt", "def ", "--max-tokens", 5, "--json")
    assert s.exit_code == 0 and json.loads(s.output)["tokens"] == 5
