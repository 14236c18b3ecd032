"""Reported bad input, one named regression test per example: each gives exactly one
`error: ...` line and exit code 2 (or is handled by a documented policy), never a traceback, a
hang, a signal or a crash. What the old code did is in each test's docstring. The random search
for more such inputs is tests/test_input_fuzz.py; the contract is docs/errors.md.
"""

import json
import os
import subprocess
import sys

import pytest
from debug_run import one_error_line as single_error_line, write_corpus
from click.testing import CliRunner

from tinymoe.cli.main import cli

FAST = ["--preset", "debug", "--steps", "1", "--eval-every", "0", "--quiet"]


def invoke(*args, env=None):
    return CliRunner(env=env).invoke(cli, [str(a) for a in args])


def one_error_line(result) -> str:
    """The command failed cleanly: exit 2, one `error:` line and nothing else, no exception."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return single_error_line(result, "error: ")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("input"), 40)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("input") / "run"
    result = invoke("train", *FAST, "--data", corpus, "--steps", 2, "--out", out)
    assert result.exit_code == 0, result.output
    return out


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("command", ["train", "sample"])
def test_negative_seed(command, run_dir, corpus, tmp_path):
    """Old: `--seed -1` reached mx.random.seed (an unsigned 64-bit argument): TypeError traceback."""
    args = (["train", *FAST, "--data", corpus, "--out", tmp_path / "r"] if command == "train"
            else ["sample", run_dir, "--max-tokens", "2"])
    line = one_error_line(invoke(*args, "--seed", "-1"))
    assert "'--seed'" in line and "-1" in line


def test_seed_beyond_what_a_preset_can_hold(run_dir):
    """A seed must fit the signed 64-bit integer a TOML preset holds; the largest one works."""
    one_error_line(invoke("sample", run_dir, "--max-tokens", "2", "--seed", str(2**63)))
    assert invoke("sample", run_dir, "--max-tokens", "2", "--seed", str(2**63 - 1)).exit_code == 0


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan")])
def test_non_finite_sampling_flags(run_dir, flag, value):
    """Old: `--temperature nan` passed click's FloatRange (NaN compares false) and printed NUL bytes."""
    line = one_error_line(invoke("sample", run_dir, "--max-tokens", "2", flag, value))
    assert "not a finite number" in line


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--aux-loss-weight", "-inf")])
def test_non_finite_training_flags(corpus, tmp_path, flag, value):
    line = one_error_line(invoke("train", *FAST, "--data", corpus, "--out", tmp_path / "r", flag, value))
    assert "not a finite number" in line


# ----------------------------------------------------------------------------- --set and presets


@pytest.mark.parametrize("setting, problem", [
    ("norm_eps=-1", "norm_eps must be positive"),  # old: ValueError from inside mlx.nn.RMSNorm
    ("norm_eps=0", "norm_eps must be positive"),
    ("beta1=2.0", "beta1 must be in [0, 1)"),  # old: ValueError from inside mlx.optimizers.Adam
    ("beta2=1", "beta2 must be in [0, 1)"),
    ("rope_theta=0", "rope_theta must be positive"),
    ("rope_theta=1e-300", "rope_theta must be positive"),  # old: 0 in float32, every step NaN
    ("lr=1e300", "lr 1e+300 is beyond float32"),  # old: inf learning rate, refused only at the save
    ("lr=inf", "'lr' must be a finite number"),  # old: trained, every step skipped
    ("weight_decay=nan", "'weight_decay' must be a finite number"),
    ("seed=-1", "seed must be >= 0"),
    ("d_ff=10000000000", "d_ff must be at most 2147483647"),  # old: OverflowError from MLX
    ("vocab_size=4000000000", "vocab_size must be at most"),
    ("steps=" + "9" * 5000, "'steps' must be an integer"),  # old: ValueError (int of 4300+ digits) in tomllib
])
def test_bad_set_values(corpus, tmp_path, setting, problem):
    line = one_error_line(invoke("train", *FAST, "--data", corpus, "--out", tmp_path / "r", "--set", setting))
    assert problem in line


def test_set_value_on_two_lines(corpus, tmp_path):
    """Old: `--set 'd_model=64\\nn_layers=9'` set d_model and silently dropped the second line."""
    line = one_error_line(invoke("train", *FAST, "--data", corpus, "--out", tmp_path / "r",
                                 "--set", "d_model=64\nn_layers=9"))
    assert "one line" in line


@pytest.mark.parametrize("content, problem", [
    (b"[model]\nd_model = 32\n\xff\xfe\n", "not UTF-8"),  # old: UnicodeDecodeError traceback
    (b"model = 3\n", "'model' must be a table"),  # old: AttributeError ('int' has no 'items')
    (b"[train]\nlr = nan\n", "'lr' must be a finite number"),
    (b"[model]\nnorm_eps = -inf\n", "'norm_eps' must be a finite number"),
])
def test_bad_preset_files(tmp_path, content, problem):
    preset = tmp_path / "p.toml"
    preset.write_bytes(content)
    line = one_error_line(invoke("train", "--preset", preset, "--steps", "1", "--out", tmp_path / "r"))
    assert problem in line


# ----------------------------------------------------------------------------- output folder


@pytest.mark.parametrize("out", ["/dev/null", "{tmp}/file.txt"])
def test_out_that_is_not_a_directory(corpus, tmp_path, out):
    """Old: `--out /dev/null` raised NotADirectoryError from os.listdir."""
    (tmp_path / "file.txt").write_text("mine")
    line = one_error_line(invoke("train", *FAST, "--data", corpus, "--out", out.format(tmp=tmp_path)))
    assert "exists and is not a folder; --out needs a folder to create" in line
    assert (tmp_path / "file.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("setting", ["d_model=1000000", "n_layers=1000000", "context=100000000"])
def test_absurd_model_size_is_refused_before_allocation(corpus, tmp_path, setting):
    """Old: `d_model=1000000` died with SIGSEGV and no message; `n_layers=1000000` built layers
    for many minutes. The planner prices the config first."""
    env = {"TINYMOE_MEMORY_GIB": "16"}
    line = one_error_line(invoke("train", *FAST, "--data", corpus, "--out", tmp_path / "r", "--set", setting,
                                 env=env))
    assert "does not fit in memory" in line and "this machine has 16.0 GiB" in line
    assert not (tmp_path / "r").exists()


def test_absurd_size_in_a_subprocess_is_not_a_signal(corpus, tmp_path):
    """The same through the real entry point: a segmentation fault is only visible there."""
    proc = subprocess.run([sys.executable, "-m", "tinymoe.cli.main", "train", *FAST, "--data", str(corpus),
                           "--out", str(tmp_path / "r"), "--set", "d_model=1000000"],
                          capture_output=True, text=True, timeout=120, env=os.environ)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- text


def test_prompt_with_bytes_that_are_not_utf8(run_dir):
    """Old: a prompt with undecodable bytes (surrogate escapes) raised UnicodeEncodeError in the
    tokenizer. Now each invalid byte is U+FFFD, the policy for text files."""
    result = invoke("sample", run_dir, "--prompt", "caf\udce9 \udcff", "--max-tokens", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["prompt"] == "caf\ufffd \ufffd"


def test_route_text_bytes_through_the_real_command_line(run_dir):
    """Real bytes from the OS (not a str made in Python) reach `route --text`."""
    proc = subprocess.run([sys.executable, "-m", "tinymoe.cli.main", "route", os.fsencode(run_dir),
                           "--text", b"ab\xff\xfe", "--json"], capture_output=True, timeout=120, env=os.environ)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    data = json.loads(proc.stdout)
    assert data["text"] == "ab\ufffd\ufffd"
    assert "".join(t["text"] for t in data["tokens"]) == data["text"]


@pytest.mark.parametrize("line, problem", [
    ("[" * 100_000, "nested too deeply"),  # old: RecursionError traceback
    ('{"text": "a", "n": ' + "1" * 5000 + "}", "a number too long"),  # old: ValueError traceback
])
def test_jsonl_lines_the_json_module_cannot_read(tmp_path, line, problem):
    data = tmp_path / "d.jsonl"
    data.write_text(line + "\n")
    result = invoke("train", *FAST, "--data", data, "--out", tmp_path / "r")
    assert problem in one_error_line(result) and "d.jsonl:1" in result.output


def test_jsonl_lone_surrogate_escape_is_replaced(tmp_path):
    """Old: a JSON "\\ud800" escape became a str no tokenizer can encode: UnicodeEncodeError."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello \ud800 world " * 60}) + "\n")
    result = invoke("train", *FAST, "--data", data, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------- click's own errors


@pytest.mark.parametrize("args, problem", [
    (["train", "--bogus"], "No such option '--bogus'"),
    (["trian"], "No such command 'trian'"),
    (["sample"], "Missing argument 'CHECKPOINT'"),
    (["train", "--steps", "many"], "'many' is not a valid integer"),
    (["train", "--optimizer", "sgd"], "'sgd' is not one of"),
    (["plan", "--mode", "fly"], "'fly' is not one of"),
    (["eval", "x", "--batch-size", "0"], "0 is not in the range"),
])
def test_click_usage_errors_are_one_line(args, problem):
    """Old: click printed usage, a hint, a blank line and `Error: ...` (four lines)."""
    line = one_error_line(invoke(*args))
    assert problem in line and "--help" in line


def test_help_and_version_still_work():
    assert invoke("--help").exit_code == 0 and "Usage:" in invoke("--help").output
    assert invoke("train", "--help").exit_code == 0
    assert invoke("--version").exit_code == 0


# ----------------------------------------------------------------------------- imported configs


@pytest.mark.parametrize("change, problem", [
    ({"hidden_size": "64"}, "'hidden_size' must be an integer"),  # old: int("64") accepted a string
    ({"hidden_size": [64]}, "'hidden_size' must be an integer"),  # old: TypeError traceback
    ({"num_attention_heads": 0}, "must be positive"),  # old: ZeroDivisionError
    ({"num_hidden_layers": 10**9}, "cannot fit in this machine's memory"),  # old: hours in a layer loop
    ({"rms_norm_eps": float("nan")}, "'rms_norm_eps' must be a finite number"),
    ({"tie_word_embeddings": "no"}, "must be true or false"),  # old: bool("no") is True
    ({"intermediate_size": 2**40}, "must be in [0, 2147483647]"),
])
def test_bad_hugging_face_config_values(tmp_path, change, problem):
    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "intermediate_size": 128, "vocab_size": 256, "rms_norm_eps": 1e-5, **change}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    line = one_error_line(invoke("import", tmp_path / "hf", "--out", tmp_path / "out",
                                 env={"TINYMOE_MEMORY_GIB": "16"}))
    assert problem in line
