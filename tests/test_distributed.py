"""Data-parallel training under `mlx.launch`: 2 local processes on the ring backend (loopback).

The reference is always one process training on the same global batch: its losses and weights
must be those of the 2-rank run within float32 summation-order noise (the ranks sum their halves'
gradients in another order than one process sums the whole batch). The balancing loss is a
product of two batch means, so it is not additive over rows: the exact comparison turns it off,
and a second comparison bounds the difference it makes with its default weight. Every launch has
a timeout, so a hang fails the test instead of stalling the suite."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from debug_run import FOX_LINE

BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT_S = 180
STEPS = 6
# The same training, run both ways: debug preset, global batch 4 (2 rows per rank), 2 micro-batches.
TRAIN = ["train", "--preset", "debug", "--steps", str(STEPS), "--grad-accum", "2", "--set", "eval_every=0",
         "--set", "log_every=1", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TINYMOE_MAX_STEPS", "TINYMOE_QUICK")}
    return {**env, "NO_COLOR": "1"}


def launch(args: list, cwd: Path, env: dict | None = None, ranks: int = 2) -> subprocess.CompletedProcess:
    """`mlx.launch -n 2 --backend ring -- tinymoe ARGS`."""
    return _run([str(BIN / "tinymoe"), *args], cwd, env, ranks)


def launch_python(args: list, cwd: Path, ranks: int = 2) -> subprocess.CompletedProcess:
    """`mlx.launch -n RANKS --backend ring -- python ARGS`."""
    return _run([sys.executable, *args], cwd, None, ranks)


def _run(command: list, cwd: Path, env: dict | None, ranks: int) -> subprocess.CompletedProcess:
    """The command on RANKS local ranks, ended with all its processes after the timeout."""
    cmd = [str(BIN / "mlx.launch"), "-n", str(ranks), "--backend", "ring", "--starting-port", str(_free_port()),
           "--", *command]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mlx.launch did not finish within {LAUNCH_TIMEOUT_S} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def single(args: list, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "tinymoe"), *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    return result


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def weights(run: Path) -> dict:
    from tinymoe.io.loader import load_training_state

    return {k: np.array(v) for k, v in load_training_state(run)["weights"].items()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A corpus and the single-process reference runs (balancing loss off and at its default)."""
    root = tmp_path_factory.mktemp("dist")
    (root / "corpus.txt").write_text(FOX_LINE * 400 + "".join(f"line {i} of the text, " for i in range(800)))
    data = ["--data", str(root / "corpus.txt")]
    single([*TRAIN, *data, "--aux-loss-weight", "0", "--out", "one"], root)
    single([*TRAIN, *data, "--out", "one-balanced"], root)
    return root, data


def test_data_parallel_matches_one_process(work):
    root, data = work
    result = launch([*TRAIN, *data, "--aux-loss-weight", "0", "--out", "two"], root)
    assert "error" not in result.stderr, result.stderr
    one, two = losses(root / "one"), losses(root / "two")
    assert len(one) == len(two) == STEPS  # rank 0 alone logs: one line per step, not two
    np.testing.assert_allclose(two, one, rtol=2e-5)
    w1, w2 = weights(root / "one"), weights(root / "two")
    assert w1.keys() == w2.keys()
    for name in w1:
        np.testing.assert_allclose(w2[name], w1[name], rtol=1e-4, atol=2e-5, err_msg=name)
    assert two[0] != two[-1]  # the runs did train


def test_balancing_loss_is_per_rank_share(work):
    """With the balancing loss on, each rank balances its own rows (as each micro-batch does):
    close to, not bit-equal with, the single process."""
    root, data = work
    result = launch([*TRAIN, *data, "--out", "two-balanced"], root)
    assert "error" not in result.stderr, result.stderr
    one, two = losses(root / "one-balanced"), losses(root / "two-balanced")
    np.testing.assert_allclose(two, one, rtol=1e-3)


def test_expert_parallel_training_matches_one_process(work):
    """--expert-parallel 2: each rank holds 2 of the 4 experts; same losses and (gathered) weights."""
    root, data = work
    result = launch([*TRAIN, *data, "--aux-loss-weight", "0", "--expert-parallel", "2", "--out", "experts"], root)
    assert "error" not in result.stderr, result.stderr
    np.testing.assert_allclose(losses(root / "experts"), losses(root / "one"), rtol=2e-5)
    w1, w2 = weights(root / "one"), weights(root / "experts")
    assert {k: v.shape for k, v in w1.items()} == {k: v.shape for k, v in w2.items()}  # all 4 experts saved
    for name in w1:
        np.testing.assert_allclose(w2[name], w1[name], rtol=1e-4, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("ranks", [2])
def test_expert_parallel_layer_equals_the_whole_layer(tmp_path, ranks):
    cases = ["grouped:4:0", "gather:8:1"]  # 2 and 4 experts per rank; with a shared expert
    result = launch_python([str(Path(__file__).parent / "distributed_layer_check.py"), str(tmp_path), *cases],
                           tmp_path, ranks)
    for case in cases:
        for rank in range(ranks):
            path = tmp_path / f"rank-{rank}-{case.replace(':', '-')}.json"
            assert path.exists(), result.stderr
            errors = json.loads(path.read_text())
            assert {"router.weight", "experts.w_gate", "experts.w_up", "experts.w_down"} <= set(errors["names"])
            assert errors["y_scale"] > 0.1  # the outputs are not all zero
            for name, err in errors.items():
                if name not in ("names", "y_scale"):
                    assert err < 1e-5, (case, rank, name, err)


def test_two_rank_checkpoint_resumes_and_samples_in_one_process(work):
    """Half the run with the experts split, the rest data parallel: one checkpoint format for both,
    and the result is still the single-process run; a 2-rank checkpoint samples in one process."""
    root, data = work
    env = {**_env(), "TINYMOE_MAX_STEPS": "3"}  # stop after 3 of the 6 steps, and save
    first = launch([*TRAIN, *data, "--aux-loss-weight", "0", "--expert-parallel", "2", "--out", "halves"], root, env)
    assert sorted(p.name for p in (root / "halves" / "checkpoints").iterdir()) == ["step-0000003"], first.stderr
    second = launch(["train", "--quiet", "--resume", "halves"], root)
    assert "error" not in second.stderr, second.stderr
    np.testing.assert_allclose(losses(root / "halves"), losses(root / "one"), rtol=2e-5)
    w1, w2 = weights(root / "one"), weights(root / "halves")
    for name in w1:
        np.testing.assert_allclose(w2[name], w1[name], rtol=1e-4, atol=2e-5, err_msg=name)
    sampled = single(["sample", "halves", "--prompt", "the quick", "--max-tokens", "8", "--temperature", "0"], root)
    reference = single(["sample", "one", "--prompt", "the quick", "--max-tokens", "8", "--temperature", "0"], root)
    assert sampled.stdout.startswith("the quick") and sampled.stdout == reference.stdout


def test_killed_rank_stops_the_run_and_keeps_the_checkpoint(work):
    root, data = work
    cmd = [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "--starting-port", str(_free_port()), "--",
           str(BIN / "tinymoe"), *TRAIN, *data, "--steps", "100000", "--set", "save_every=2",
           "--out", "killed"]
    cmd.remove("--quiet")
    proc = subprocess.Popen(cmd, cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not (root / "killed" / "checkpoints" / "step-0000004").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
        _, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    ours = [line for line in err.splitlines() if line.startswith("error: rank 0")]
    assert len(ours) == 1 and ("lost the connection" in ours[0] or "stopped by the launcher" in ours[0]), err
    assert "Traceback" not in err, err
    from tinymoe.io.loader import load_model

    kept = sorted((root / "killed" / "checkpoints").glob("step-*"))
    assert kept, err
    load_model(kept[-1])  # the newest checkpoint loads, hashes verified


def _rank_pid(launcher: int, rank: int) -> int:
    """The process of `rank` among the launcher's descendants (mlx.launch sets MLX_RANK)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in env and _descends(int(entry.name), launcher):
            if "tinymoe" in (entry / "cmdline").read_text(errors="replace"):
                return int(entry.name)
        del stat
    raise AssertionError(f"no process of rank {rank} under {launcher}")


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def test_shards_put_together_are_the_single_process_batch():
    from tinymoe.data.batches import BatchSampler, ShardedSampler

    tokens = np.arange(1000, dtype=np.uint16)
    mask = (np.arange(1000) % 3 == 0).astype(np.uint8)
    whole = BatchSampler(tokens, 6, 8, seed=5, mask=mask)
    parts = [ShardedSampler(BatchSampler(tokens, 6, 8, seed=5, mask=mask), r, 3) for r in range(3)]
    for _ in range(3):
        batch = whole.next_batch()
        shards = [p.next_batch() for p in parts]
        for i, full in enumerate(batch):
            np.testing.assert_array_equal(np.concatenate([s[i] for s in shards]), full)
    assert parts[1].state() == whole.state()  # a checkpoint's sampler state resumes either way
    with pytest.raises(Exception, match="does not split over 4 ranks"):
        ShardedSampler(BatchSampler(tokens, 6, 8, seed=5), 0, 4)


def test_distributed_flags_without_a_launcher_are_one_error_line(tmp_path):
    from click.testing import CliRunner

    from debug_run import one_error_line
    from tinymoe.cli.main import cli

    runner = CliRunner()
    one_error_line(runner.invoke(cli, ["train", "--preset", "debug", "--out", str(tmp_path / "a"),
                                       "--rank-timeout", "5"]), "--rank-timeout")
    one_error_line(runner.invoke(cli, ["train", "--preset", "debug", "--out", str(tmp_path / "b"),
                                       "--distributed"]), "cannot join the distributed group")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_watchdog_ends_a_process_that_stops_making_progress():
    """A peer that hangs without dying leaves a collective waiting forever: the watchdog ends the
    process after its timeout with one line (in a child process: it exits)."""
    code = ("import time\nfrom tinymoe.train.distributed import Watchdog\n"
            "w = Watchdog(1, 0.4)\nw.start()\nw.beat(7)\ntime.sleep(30)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: rank 1: no progress for 0.4 s after step 7"), result.stderr
