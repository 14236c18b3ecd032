"""`tinymoe selftest`: every MoE fast path against its reference on this machine, as a table."""

from __future__ import annotations

import sys

import click

from tinymoe.cli.common import print_json, user_errors


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def selftest(as_json):
    """Check every dispatch backend and fused kernel against its reference.

    Re-runs the fused kernels' first-use check on this machine (and stores its verdict), then
    runs each sparse dispatch backend against the dense one (output and gradients wrt x, gates
    and expert weights) on a few edge-case shapes, and the gather/combine kernel ops and their
    gradients against plain indexing, in float32, float16 and bfloat16. Each row says which
    implementation actually ran (a Metal or CUDA kernel, or the pure-MLX reference). Exit code 0
    when everything passes, 1 otherwise; attach the --json output to a bug report (docs/mac.md).
    """
    from tinymoe.nn import selftest as st

    report = st.run_selftest()
    if as_json:
        print_json(report.to_dict())
    else:
        click.echo(st.format_report(report))
    if not report.passed:
        sys.exit(1)
