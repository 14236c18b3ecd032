"""`tinymoe doctor`: what this machine gives MLX (version, device, Metal, BLAS, matmul speed)."""

from __future__ import annotations

import platform

import click

from tinymoe.cli.common import print_json, user_errors


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def doctor(as_json):
    """Report MLX version, device, Metal availability, BLAS and measured fp32 matmul GFLOP/s."""
    from tinymoe import backend

    import mlx.core as mx

    openblas, reason = backend.openblas_status()
    report = {
        "tinymoe": __import__("tinymoe").__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "mlx": mx.__version__,
        "device": backend.default_device_name(),
        "metal_available": bool(mx.metal.is_available()),
        "blas": backend.blas_in_use(),
        "openblas_preload": reason,
        "matmul_fp32_gflops": round(backend.matmul_gflops(), 1),
    }
    if as_json:
        print_json(report)
        return
    for key, value in report.items():
        click.echo(f"{key:20s} {value}")
    if "reference BLAS" in report["blas"]:
        click.echo("hint: install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread) "
                   "for ~8x faster training on CPU")
