"""`tinymoe doctor`: what this machine gives MLX (version, device, Metal, BLAS, matmul speed), and
on a Mac the chip, its memory, the Metal working-set limit in force and the presets that fit it;
plus the fused kernels' first-use verdict and the path `--moe-dispatch auto` takes."""

from __future__ import annotations

import platform

import click

from tinymoe.cli.common import print_json, user_errors


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def doctor(as_json):
    """Report MLX version, device, Metal availability, BLAS and measured fp32 matmul GFLOP/s.

    On a Mac also the chip, its memory, the Metal working-set limit in force and which presets
    fit it (training at each preset's own batch); everywhere, the verdict of the fused kernels'
    first-use check on this MLX and GPU and the dispatch `--moe-dispatch auto` picks.
    """
    from tinymoe import backend
    from tinymoe.nn.selftest import kernel_status
    from tinymoe.planner import machine_budget, presets_that_fit

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
    mac = backend.mac_memory_facts()
    if mac:
        report.update(chip=mac["chip"], memory_gib=round(mac["memory_gib"], 1),
                      metal_working_set_gib=round(mac["working_set_gib"], 1))
    memory_gib, fraction, source = machine_budget(mac)
    fits = presets_that_fit(memory_gib, fraction)
    report["presets_that_fit"] = [name for name, ok in fits.items() if ok]
    report["presets_budget"] = f"{memory_gib * fraction:.1f} GiB: {source}"
    status = kernel_status()
    report["kernels"] = status["kernels"] or "none"
    report["kernel_check"] = status["summary"]
    report["auto_dispatch"] = status["auto_dispatch"]
    if as_json:
        print_json(report)
        return
    for key, value in report.items():
        click.echo(f"{key:20s} {value}")
    hint = blas_hint(report["blas"], backend.openblas_status()[1])
    if hint:
        click.echo(hint)


def blas_hint(blas: str, preload_reason: str) -> str | None:
    """What to do about a slow BLAS, matching why OpenBLAS is not in use (tinymoe.backend.setup)."""
    if "reference BLAS" not in blas:
        return None
    if preload_reason.startswith("disabled by TINYMOE_NO_OPENBLAS"):
        return "hint: OpenBLAS is turned off by TINYMOE_NO_OPENBLAS; unset it for ~8x faster training on CPU"
    if preload_reason.startswith("could not load"):
        return f"hint: OpenBLAS is installed but {preload_reason}; set TINYMOE_OPENBLAS to a working libopenblas.so"
    if preload_reason.startswith("mlx.core was imported"):
        return "hint: import tinymoe before mlx so it can load OpenBLAS first (~8x faster training on CPU)"
    return ("hint: install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread) "
            "for ~8x faster training on CPU")
