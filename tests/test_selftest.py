"""`tinymoe selftest`: passes on a healthy install, and catches a broken backend or kernel op."""

import json

import mlx.core as mx
from click.testing import CliRunner

from tinymoe.nn import dispatch, selftest
from tinymoe.cli.main import cli
from tinymoe.nn.kernels import dispatch as kd
from tinymoe.nn.kernels import launch


def test_every_backend_and_kernel_op_passes_and_is_reported():
    report = selftest.run_selftest()
    assert report.passed, selftest.format_report(report)
    ops = {c.op for c in report.checks}
    assert {f"{b} vs dense" for b in dispatch.BACKENDS if b != "dense"} <= ops
    assert {"gather_rows forward", "gather_rows vjp", "combine forward", "combine vjp"} <= ops
    cases = {c.case for c in report.checks}
    assert {"k=1", "k=E", "T=1 (decode)", "experts with no tokens"} <= cases
    kernel_rows = [c for c in report.checks if c.op.startswith(("gather_rows", "combine"))]
    # the kernel ops and a backend that runs everywhere, in every dtype a Mac user trains with
    for rows in (kernel_rows, [c for c in report.checks if c.op == "grouped vs dense"]):
        assert {c.dtype for c in rows} == {"float32", "float16", "bfloat16"}
    if launch.device_backend() is None:
        assert all(c.implementation.startswith("reference") for c in kernel_rows)
        assert report.kernel_check["passed"] is None  # nothing to check: no kernel runs here
    else:
        assert all(c.implementation.endswith("kernel") for c in kernel_rows)
        assert report.kernel_check["passed"] is True
    assert report.kernel_check["auto_dispatch"] == dispatch.resolve_backend("auto")


def test_a_backend_off_by_1e_2_fails_and_the_others_still_pass(monkeypatch):
    original = dispatch._FUNCS["grouped"]
    monkeypatch.setitem(dispatch._FUNCS, "grouped", lambda *a: original(*a) + 1e-2)
    report = selftest.run_selftest()
    assert not report.passed
    for c in report.checks:
        if c.op != "grouped vs dense":
            assert c.passed, (c.op, c.case, c.dtype)
        elif c.dtype == "float32":  # in bfloat16, 1e-2 is within rounding of O(1) values
            assert not c.passed and c.worst == "forward" and 0.009 < c.max_abs_err < 0.011


def test_a_wrong_gradient_is_caught_and_a_crash_is_a_failed_row(monkeypatch):
    good = kd.combine_grad_gates_reference
    monkeypatch.setattr(kd, "combine_grad_gates_reference", lambda *a: good(*a) * 1.01)
    monkeypatch.setitem(dispatch._FUNCS, "gather", lambda *a: 1 / 0)
    report = selftest.run_selftest()
    failed = {(c.op, c.worst.split(":")[0]) for c in report.checks if not c.passed}
    assert ("gather vs dense", "error") in failed
    if launch.device_backend() is None:  # the patched reference ran
        assert ("combine vjp", "dgates") in failed
    # Backends built on `combine` inherit the wrong gate gradient and nothing else.
    assert all(worst == "dgates" for op, worst in failed if op != "gather vs dense")
    assert all(c.passed for c in report.checks if c.op.startswith("gather_rows"))


def test_cli_table_json_and_exit_codes(monkeypatch):
    runner = CliRunner()
    table = runner.invoke(cli, ["selftest"])
    assert table.exit_code == 0, table.output
    assert "grouped vs dense" in table.output and "FAIL" not in table.output
    data = json.loads(runner.invoke(cli, ["selftest", "--json"]).output)
    assert data["passed"] is True and data["environment"]["mlx"] == mx.__version__
    assert all(set(c) >= {"op", "case", "implementation", "max_abs_err", "passed"}
               for c in data["checks"])

    original = dispatch._FUNCS["metal"]
    monkeypatch.setitem(dispatch._FUNCS, "metal", lambda *a: original(*a) + 1e-2)
    broken = runner.invoke(cli, ["selftest"])
    assert broken.exit_code == 1
    assert any(line.startswith("metal vs dense") and "FAIL" in line
               for line in broken.output.splitlines())
    broken_json = runner.invoke(cli, ["selftest", "--json"])
    assert broken_json.exit_code == 1 and json.loads(broken_json.output)["passed"] is False
