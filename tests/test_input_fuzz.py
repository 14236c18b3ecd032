"""Property-based search for bad input that escapes the CLI's contract.

The contract (docs/errors.md): whatever a user types or feeds in, a command exits 0, or exits 2
with exactly one `error: ...` line; never a traceback, another exit code, a signal or a hang.
hypothesis drives the real commands in-process with click's CliRunner (fast enough for a few
hundred examples on two cores): random flag values, random `--set KEY=VALUE` pairs, random preset
TOML, config.json and JSONL files (structured and raw bytes), random prompt and `route --text`
text including the surrogate escapes the OS makes of undecodable bytes, random sampling flags.
A few examples also run as real subprocesses with real bytes on the command line, where a
segmentation fault would show. Training examples use `--preset debug --steps 1` and values
small enough to run in milliseconds, plus absurd ones that must be refused before any work.
Seeds are fixed (derandomize) so CI sees the same examples every run; the named regression
tests of everything found so far are in tests/test_input_errors.py.
"""

import faulthandler
import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from debug_run import write_corpus
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinymoe.cli.main import cli
from tinymoe.cli.train import MODEL_FLAGS, TRAIN_FLAGS
from tinymoe.config import ModelConfig, TrainConfig

COUNTS = {"ok": 0, "refused": 0}
FUZZ = settings(derandomize=True, database=None, deadline=timedelta(seconds=30),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
FAST = ["--steps", "1", "--eval-every", "0", "--set", "eval_batches=1", "--quiet"]
# Settings that only multiply work (or name files to read) are not fuzzed: a huge but valid
# --steps is a long run, not a bug.
NOT_FUZZED = {"steps", "data", "eval_batches", "grad_accum"}

NASTY = ["-1", "0", "1", "2", "3", "4", "nan", "inf", "-inf", "1e308", "1e-320", "-0.0", "0.5", "1.5",
         "2147483648", str(2**63), str(2**64), "1e999", "0x10", "", " ", "1_000", "true", "\udcff"]
NUMBER = st.one_of(st.integers(-3, 48).map(str), st.sampled_from(NASTY), st.floats().map(repr))
TEXT = st.text(st.characters(exclude_categories=["Cs"]) | st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
               max_size=12)
# TOML right-hand sides for --set and preset files: literals of every type, and text that is none.
TOML_VALUE = st.one_of(st.integers(-3, 48).map(str), st.sampled_from(NASTY), st.floats().map(repr),
                       st.sampled_from(["true", "false", '"topk"', '"sp:100"', '"bytes"', "[1, 2]", "{a = 1}",
                                        '"adafactor"', '"grouped"', "[[[]]]", '"\\ud800"', "'''x'''"]),
                       TEXT)
FIELDS = sorted((set(ModelConfig.__dataclass_fields__) | set(TrainConfig.__dataclass_fields__)) - NOT_FUZZED)
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([2**31, 2**63, -(2**63), 10**30]),
                      st.floats(), st.text(max_size=8))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def check(result) -> str:
    """The contract; returns 'ok' or 'refused' (and counts it)."""
    out = result.output
    assert result.exit_code in (0, 2), f"exit {result.exit_code}: {result.exception!r}\n{out}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out, out
    if result.exit_code == 2:
        lines = [line for line in out.splitlines() if line.strip() and not line.startswith("warning: ")]
        assert len(lines) == 1 and lines[0].startswith("error: "), out
    kind = "ok" if result.exit_code == 0 else "refused"
    COUNTS[kind] += 1
    return kind


def invoke(*args):
    # A fixed memory size makes "does not fit" decisions the same on every machine.
    return CliRunner(env={"TINYMOE_MEMORY_GIB": "8"}).invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module", autouse=True)
def watchdog():
    """A hang is a failure too: dump every thread's stack and exit after 4 minutes."""
    faulthandler.dump_traceback_later(240, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
    print(f"\ninput fuzz examples: {COUNTS}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("fuzz-input"), 30)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("fuzz-input") / "run"
    assert invoke("train", "--preset", "debug", "--data", corpus, *FAST, "--out", out).exit_code == 0
    return out


@pytest.fixture
def fresh(tmp_path_factory):
    """A new, empty place per example (hypothesis reuses a function's fixtures)."""
    return lambda: tmp_path_factory.mktemp("ex")


def _flag_value(name):
    typ = {**MODEL_FLAGS, **TRAIN_FLAGS}[name][0]
    if typ in (int, float):
        return NUMBER
    return st.one_of(TEXT, st.sampled_from(["topk", "switch", "dynamic", "expert-choice", "sp:100", "sp:0",
                                            "sp:99999999999999", "bytes", "adamw", "adafactor", "bfloat16"]))


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_train_flags(data, corpus, fresh):
    names = data.draw(st.lists(st.sampled_from(sorted(set(MODEL_FLAGS) | set(TRAIN_FLAGS) - NOT_FUZZED)),
                               min_size=1, max_size=3, unique=True))
    args = []
    for name in names:
        args += ["--" + name.replace("_", "-"), data.draw(_flag_value(name))]
    check(invoke("train", "--preset", "debug", "--data", corpus, *FAST, *args, "--out", fresh() / "r"))


@settings(FUZZ, max_examples=60)
@given(pairs=st.lists(st.tuples(st.sampled_from(FIELDS) | TEXT, TOML_VALUE), min_size=1, max_size=3))
def test_train_set_pairs(pairs, corpus, fresh):
    sets = [a for key, value in pairs for a in ("--set", f"{key}={value}")]
    check(invoke("train", "--preset", "debug", "--data", corpus, *FAST, *sets, "--out", fresh() / "r"))


DEBUG_PRESET = {"model": {"d_model": "32", "n_layers": "2", "n_heads": "2", "n_kv_heads": "1", "context": "32",
                          "d_ff": "64", "moe_experts": "4", "moe_topk": "2"},
                "train": {"batch_size": "4", "lr": "3e-3", "warmup_steps": "2"}}


@settings(FUZZ, max_examples=40)
@given(changes=st.lists(st.tuples(st.sampled_from(FIELDS) | TEXT, TOML_VALUE), max_size=3),
       section=st.sampled_from(["model", "train", "extra"]), raw=st.none() | st.binary(max_size=80))
def test_preset_files(changes, section, raw, corpus, fresh):
    if raw is None:
        tables = {k: dict(v) for k, v in DEBUG_PRESET.items()}
        for key, value in changes:
            tables.setdefault(section, {})[key] = value
        text = "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in table.items())
                       for name, table in tables.items())
        raw = text.encode("utf-8", "surrogateescape") if "\udcff" in text else text.encode("utf-8", "replace")
    preset = fresh() / "p.toml"
    preset.write_bytes(raw)
    check(invoke("train", "--preset", preset, "--data", corpus, *FAST, "--out", preset.parent / "r"))


@settings(FUZZ, max_examples=40)
@given(arch=st.sampled_from(["llama", "qwen2", "mixtral", "qwen2_moe", "ernie4_5_moe", "glm4_moe", "gpt2", None]),
       changes=st.dictionaries(st.sampled_from(["hidden_size", "num_attention_heads", "num_hidden_layers",
                                                "intermediate_size", "vocab_size", "rms_norm_eps", "head_dim",
                                                "num_key_value_heads", "max_position_embeddings", "rope_theta",
                                                "tie_word_embeddings", "num_local_experts", "num_experts_per_tok",
                                                "mlp_only_layers", "decoder_sparse_step", "moe_layer_start_index",
                                                "rope_parameters", "rope_scaling", "sliding_window", "tinymoe"]),
                               JSON_VALUE, max_size=4),
       raw=st.none() | st.binary(max_size=60))
def test_imported_config_json(arch, changes, raw, fresh):
    folder = fresh()
    base = {"model_type": arch, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 256, "rms_norm_eps": 1e-5, "num_local_experts": 4,
            "num_experts_per_tok": 2, "num_experts": 4, "moe_intermediate_size": 32, "moe_num_experts": 4, "moe_k": 2,
            "n_routed_experts": 4, **changes}
    (folder / "hf").mkdir()
    (folder / "hf" / "config.json").write_bytes(raw if raw is not None else json.dumps(base).encode())
    check(invoke("import", folder / "hf", "--out", folder / "out"))


@settings(FUZZ, max_examples=30)
@given(records=st.lists(st.one_of(
    st.fixed_dictionaries({"text": st.text(st.characters(exclude_categories=()), max_size=30)},
                          optional={"domain": JSON_VALUE}).map(json.dumps),
    JSON_VALUE.map(json.dumps), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))), max_size=4))
def test_jsonl_data(records, corpus, fresh):
    folder = fresh()
    # A valid first record long enough for one training window, then the random lines.
    lines = [json.dumps({"text": corpus.read_text()})] + records
    (folder / "d.jsonl").write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    check(invoke("train", "--preset", "debug", "--data", folder / "d.jsonl", *FAST, "--out", folder / "r"))


PROMPT = st.text(st.characters(exclude_categories=()), max_size=40)


@settings(FUZZ, max_examples=40)
@given(prompt=PROMPT, temperature=NUMBER, top_p=NUMBER, top_k=NUMBER, seed=NUMBER,
       max_tokens=st.sampled_from(["1", "3", "0", "-1", "x"]), layer=st.none() | NUMBER,
       routing=st.booleans(), as_json=st.booleans())
def test_sample(run_dir, prompt, temperature, top_p, top_k, seed, max_tokens, layer, routing, as_json):
    args = ["sample", run_dir, "--prompt", prompt, "--temperature", temperature, "--top-p", top_p,
            "--top-k", top_k, "--seed", seed, "--max-tokens", max_tokens]
    args += (["--layer", layer] if layer is not None else []) + (["--show-routing"] if routing else [])
    check(invoke(*args, *(["--json"] if as_json else [])))


@settings(FUZZ, max_examples=40)
@given(text=PROMPT, as_json=st.booleans(), gates=st.booleans())
def test_route_text(run_dir, text, as_json, gates):
    result = invoke("route", run_dir, "--text", text, *(["--json"] if as_json else []), *(["--gates"] if gates else []))
    if check(result) == "ok" and as_json:
        json.loads(result.output)  # strict enough for Python; tests/test_strict_json.py is stricter


@settings(FUZZ, max_examples=40)
@given(flags=st.dictionaries(st.sampled_from(["--batch-size", "--context", "--moe-experts", "--moe-topk",
                                              "--expert-state-fraction", "--resident-experts", "--memory-gib",
                                              "--usable-fraction", "--prompt-tokens", "--mode", "--param-dtype",
                                              "--preset"]), NUMBER | TEXT, max_size=4), as_json=st.booleans())
def test_plan_flags(flags, as_json):
    result = invoke("plan", *[a for item in flags.items() for a in item], *(["--json"] if as_json else []))
    if check(result) == "ok" and as_json:
        json.loads(result.output)


# A --data value that names no file (no globs, no `.`/`~`/`/`: the fuzzer must not read the disk).
NO_PATH = TEXT.filter(lambda s: s.strip() and not set(s) & set("*?[./~\\"))


@settings(FUZZ, max_examples=25)
@given(command=st.sampled_from(["eval", "inspect"]),
       flags=st.dictionaries(st.sampled_from(["--batch-size", "--max-batches", "--moe-dispatch"]),
                             NUMBER | TEXT, max_size=2), data=st.none() | NO_PATH, as_json=st.booleans())
def test_eval_and_inspect_flags(run_dir, command, flags, data, as_json):
    args = [a for item in flags.items() for a in item] + (["--data", data] if data is not None else [])
    check(invoke(command, run_dir, *args, *(["--json"] if as_json else [])))


@settings(FUZZ, max_examples=3, deadline=timedelta(seconds=60))
@given(text=st.binary(min_size=1, max_size=30).filter(lambda b: b"\x00" not in b))
def test_route_real_bytes_in_a_subprocess(run_dir, text):
    """Real undecodable bytes on a real command line; a signal would show as a negative code."""
    proc = subprocess.run([sys.executable, "-m", "tinymoe.cli.main", "route", os.fsencode(run_dir), "--text", text],
                          capture_output=True, timeout=60, env=os.environ)
    assert proc.returncode in (0, 2), (proc.returncode, proc.stderr[-2000:])
    assert b"Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_examples_ran():
    """Runs after the property tests in this file: both outcomes were exercised."""
    assert COUNTS["ok"] >= 20 and COUNTS["refused"] >= 100, COUNTS
