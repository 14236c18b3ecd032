"""Crash safety of export, upcycle and import: SIGKILL each at many moments while it replaces an
earlier output, then look at --out.

A child process loads its inputs, says "ready", then runs the command's library function (the
same code the CLI runs) once, replacing an earlier complete output with --overwrite. The parent
kills it at delays spread over one and a half runs. After every kill, --out must be exactly the
earlier output or exactly a complete new one (never a partial folder under the real name), and
the next ordinary run must clear every hidden leftover.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tinymoe.cli.main import cli
from tinymoe.io.folders import clean_leftovers
from tinymoe.io.validate import validate_checkpoint

KILL_POINTS = 10

CHILD = r"""
import sys
from pathlib import Path
kind, source, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
if kind == "export":
    from tinymoe.interop.export import export_hf as job
    args = dict(checkpoint=source, out=out, overwrite=True, check=False)
elif kind == "upcycle":
    from tinymoe.interop.upcycle import upcycle as job
    args = dict(source=source, out=out, experts=4, topk=2, overwrite=True)
else:
    from tinymoe.interop.import_hf import import_hf as job
    args = dict(source=source, out=out, overwrite=True)
import mlx.core  # noqa: F401  (paid before "ready", so the kills land in the work itself)
print("ready", flush=True)
job(**args)
print("done", flush=True)
"""


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop-kill")
    dense = root / "dense"
    run_cli("train", "--preset", "debug", "--moe-experts", 1, "--moe-topk", 1, "--steps", 2, "--eval-every", 0,
            "--out", dense, "--quiet")
    hf = root / "hf"
    run_cli("export", dense, "--out", hf, "--no-check")
    return {"export": dense, "upcycle": dense, "import": hf}


def fingerprint(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def complete(kind: str, out: Path) -> bool:
    """Whether `out` is a whole output of `kind` (loads and checks), judged independently."""
    marker = json.loads((out / "tinymoe.json").read_text())
    if kind == "export":
        import mlx.core as mx

        json.loads((out / "config.json").read_text())
        mx.eval(list(mx.load(str(out / "model.safetensors")).values()))
        return marker["kind"] == "export" and (out / "tokenizer.json").is_file()
    return marker["kind"] == "run" and validate_checkpoint(out)["valid"]


def stable_part(kind: str, files: dict) -> dict:
    """What two complete runs of the same command must agree on (timestamps aside)."""
    skip = ("tinymoe.json", "manifest.json")
    return {k: v for k, v in files.items() if not k.endswith(skip)}


@pytest.mark.parametrize("kind", ["export", "upcycle", "import"])
def test_sigkill_never_leaves_a_partial_output(sources, tmp_path, kind):
    out = tmp_path / "out"
    env = {**os.environ}
    child_args = [sys.executable, "-c", CHILD, kind, str(sources[kind]), str(out)]
    # A first complete output, timed from "ready": every kill afterwards must leave a whole one.
    durations = []
    for _ in range(2):
        child = subprocess.Popen(child_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        t0 = time.perf_counter()
        assert child.stdout.readline().strip() == "done", child.stderr.read()
        durations.append(time.perf_counter() - t0)
        child.wait()
    assert complete(kind, out)
    reference = stable_part(kind, fingerprint(out))
    run_s = min(durations)

    outcomes = {"old": 0, "new": 0}
    for i in range(KILL_POINTS):
        before = fingerprint(out)
        child = subprocess.Popen(child_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        time.sleep((i + 0.5) / KILL_POINTS * 1.5 * run_s)
        child.send_signal(signal.SIGKILL)
        child.communicate()
        if not out.exists():  # killed between the two renames of the swap: the next writer restores it
            clean_leftovers(out)
            outcomes["restored"] = outcomes.get("restored", 0) + 1
        now = fingerprint(out)
        assert complete(kind, out), f"kill {i}: {out} is not a complete {kind} output"
        assert stable_part(kind, now) == reference, f"kill {i}: contents differ from a complete run"
        outcomes["old" if now == before else "new"] += 1
        visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
        assert visible == ["out"], visible

    # The next ordinary run removes what the killed ones left behind.
    subprocess.run(child_args, check=True, capture_output=True, env=env)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    print(f"\n{kind}: {KILL_POINTS} kills over {run_s * 1000:.0f} ms runs -> {outcomes}")
