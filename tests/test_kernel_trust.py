"""Verify before trusting (tinymoe.nn.kernels.trust): both outcomes of the kernels' first-use check,
simulated on a machine without a GPU.

A faked GPU default device gets kernel objects that run the real bodies in the C++ emulator
(tests/kernel_emulator.py); monkeypatched sources stand in for kernels that give wrong numbers
and for kernels that do not compile. The tests show what a Mac user would see: `auto` falling
back to `gather` with one warning line, the verdict cached per tinymoe/MLX/device, an explicit
`--moe-dispatch metal` stopping with one `error:` line, and selftest/doctor reporting it.
"""

import dataclasses
import json

import mlx.core as mx
import pytest
from click.testing import CliRunner

import kernel_emulator as emu
from tinymoe import backend
from tinymoe.cli.main import cli
from tinymoe.errors import TinyMoeError
from tinymoe.nn import dispatch, selftest
from tinymoe.nn.kernels import dispatch as kd
from tinymoe.nn.kernels import sources, trust


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory):
    if emu.compiler() is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) on PATH: kernels cannot be emulated")
    d = tmp_path_factory.mktemp("trust_emulator")
    specs = dict(sources.KERNELS)  # the real sources; a test's broken ones get their own build
    rc, binary, err = emu.build(d, {n: (s, s.metal_source, s.cuda_source) for n, s in specs.items()})
    assert rc == 0, err
    return binary, specs


@pytest.fixture
def gpu(prebuilt, monkeypatch, tmp_path):
    """A fresh process on a faked GPU (Metal unless a test says otherwise), its own cache folder,
    and a first-use check cut to two cases (all three dtypes) to keep the emulator quick."""
    monkeypatch.setenv("TINYMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(trust, "CHECK_CASES", trust.CHECK_CASES[1:3])
    monkeypatch.setattr(trust, "device_name", lambda: "Apple M9 Test")

    def start(backend="metal"):
        kernels = emu.EmulatedKernels(prebuilt[0], tmp_path, prebuilt[1])
        emu.fake_gpu(monkeypatch, backend, kernels, trusted=False)
        return kernels

    return start


def break_kernel(monkeypatch, name, old, new):
    spec = sources.KERNELS[name]
    assert old in spec.body
    monkeypatch.setitem(sources.KERNELS, name, dataclasses.replace(spec, body=spec.body.replace(old, new)))


def warnings(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]


def test_verdicts_live_in_tinymoe_s_cache_folder(monkeypatch, tmp_path):
    from tinymoe.data.prepare import cache_dir

    assert trust.cache_dir() == cache_dir()
    monkeypatch.setenv("TINYMOE_CACHE", str(tmp_path))
    assert trust.cache_dir() == cache_dir() == tmp_path
    assert trust.cache_path(("0.1.0", "0.32.4", "metal", "Apple M2 Max")).parent == tmp_path / "kernel-checks"


def test_kernels_that_pass_are_used_and_the_verdict_is_cached(gpu, capsys):
    kernels = gpu()
    assert dispatch.resolve_backend("auto") == "metal"
    assert set(kernels.log) == set(sources.KERNELS)  # the check ran every kernel
    v = trust.verdict()
    assert v.ok and v.checks == 2 * 3 * 5 and v.origin == "checked now"
    stored = json.loads(trust.cache_path(trust.verdict_key("metal")).read_text())
    assert stored["ok"] is True and stored["device"] == "Apple M9 Test"
    assert stored["mlx"] == mx.__version__ and stored["tinymoe"] == __import__("tinymoe").__version__

    kernels = gpu()  # a new process: reads the verdict instead of checking again
    assert dispatch.resolve_backend("auto") == "metal" and dispatch.resolve_backend("metal")
    assert kernels.log == [] and trust.verdict().origin.startswith("cached ")
    assert warnings(capsys) == []


def test_wrong_numbers_fall_back_to_gather_with_one_warning_and_explicit_metal_errors(gpu, capsys,
                                                                                    monkeypatch):
    # only lane 0's partial dot product: wrong gate gradients once D > 32 (the check has D = 96)
    monkeypatch.setattr(trust, "CHECK_CASES", ((4, 2, 40, 5, "random"),))
    break_kernel(monkeypatch, "combine_grad_gates", "acc = simd_sum(acc);", "")
    gpu()
    assert dispatch.resolve_backend("auto") == "gather"
    assert dispatch.resolve_backend("auto") == "gather"
    (line,) = warnings(capsys)  # once per process
    assert "combine vjp dgates" in line and "Apple M9 Test" in line
    assert "gather" in line and "tinymoe selftest --json" in line
    v = trust.verdict()
    assert not v.ok and v.failed == 3 and "combine vjp dgates" in v.failure  # all three dtypes
    assert json.loads(trust.cache_path(trust.verdict_key("metal")).read_text())["ok"] is False

    with pytest.raises(TinyMoeError) as err:
        dispatch.resolve_backend("metal")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("--moe-dispatch metal: ") and "selftest --json" in msg

    # Code that calls the ops directly (the `grouped` backend) gets the references instead.
    kernels = gpu()  # a new process: the cached failure, no re-check, one warning
    c_ys, pos = mx.ones((8, 40)), mx.array([[0, 1], [2, 3], [4, 5], [6, 7]], dtype=mx.uint32)
    mx.eval(kd.combine(c_ys, pos, mx.ones((4, 2))))
    assert kernels.log == [] and len(warnings(capsys)) == 1


def test_kernels_that_fail_to_compile_fall_back_too(gpu, capsys, monkeypatch):
    break_kernel(monkeypatch, "gather_rows", "xs[p * D + d] = x[t * D + d];",
                 "xs[p * D + d] = undeclared_name;")
    gpu()
    assert dispatch.resolve_backend("auto") == "gather"
    v = trust.verdict()
    assert not v.ok and "RuntimeError" in v.failure and "Unable to build" in v.failure
    assert "undeclared_name" in v.failure  # the compiler's own line, for the bug report
    (line,) = warnings(capsys)
    assert "RuntimeError" in line


def test_the_verdict_is_per_device_and_mlx_version(gpu, monkeypatch):
    kernels = gpu()
    trust.verdict()
    first = trust.cache_path(trust.verdict_key("metal"))
    n = len(kernels.log)
    monkeypatch.setattr(trust, "device_name", lambda: "Apple M10 Test")
    trust.verdict()
    assert len(kernels.log) > n  # another GPU: checked again
    monkeypatch.setattr(mx, "__version__", "0.99.0")
    assert trust.cache_path(trust.verdict_key("metal")) != first
    n = len(kernels.log)
    trust.verdict()
    assert len(kernels.log) > n  # another MLX: checked again


def test_cuda_twins_are_checked_only_when_asked_for(gpu, monkeypatch):
    break_kernel(monkeypatch, "combine", "k < K;", "k + 1 < K;")
    kernels = gpu("cuda")
    assert dispatch.resolve_backend("auto") == "gather"  # CUDA: auto never uses the kernels
    assert kernels.log == [] and not trust.cache_path(trust.verdict_key("cuda")).exists()
    with pytest.raises(TinyMoeError, match="cuda kernels failed their first-use check"):
        dispatch.resolve_backend("metal")


def test_explicit_metal_is_one_error_line_from_the_cli(gpu, monkeypatch, tmp_path):
    break_kernel(monkeypatch, "combine", "k < K;", "k + 1 < K;")
    gpu()
    result = CliRunner().invoke(cli, ["train", "--preset", "debug", "--steps", "1",
                                      "--moe-dispatch", "metal", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "first-use check" in errors[0] and "Traceback" not in result.output


def test_selftest_and_doctor_report_the_verdict_and_the_auto_path(gpu, monkeypatch):
    break_kernel(monkeypatch, "combine", "k < K;", "k + 1 < K;")
    gpu()
    monkeypatch.setattr(selftest, "BACKEND_CASES", selftest.BACKEND_CASES[:1])
    monkeypatch.setattr(selftest, "KERNEL_CASES", selftest.KERNEL_CASES[2:3])
    report = selftest.run_selftest(backends=["grouped"])
    kc = report.kernel_check
    assert kc["kernels"] == "metal" and kc["passed"] is False and kc["auto_dispatch"] == "gather"
    assert kc["summary"].startswith("FAILED") and "combine" in kc["summary"]
    assert not report.passed
    kernel_rows = [c for c in report.checks if c.op.startswith("combine")]
    assert {c.implementation for c in kernel_rows} == {"metal kernel"}  # run despite the verdict
    assert not any(c.passed for c in kernel_rows if c.op == "combine forward")
    text = selftest.format_report(report)
    assert "--moe-dispatch auto -> gather" in text and "tinymoe selftest --json" in text

    monkeypatch.setattr(backend, "matmul_gflops", lambda: 1.0)  # not what this test is about
    doctor = json.loads(CliRunner().invoke(cli, ["doctor", "--json"]).output)
    assert doctor["kernel_check"].startswith("FAILED") and doctor["auto_dispatch"] == "gather"
