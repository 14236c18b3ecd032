"""`tinymoe quantize`: a checkpoint's weights in 4 or 8 bits, in a new run folder."""

from __future__ import annotations

import click

from tinymoe.cli.common import OutDir, print_json, user_errors

# tinymoe.nn.quantized's BITS and GROUP_SIZES, spelled out here so `--help` needs no MLX
# (tests/test_quantize.py checks that they agree).
BITS = ("4", "8")
GROUP_SIZES = ("32", "64", "128")


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--bits", type=click.Choice(BITS), default="4", show_default=True,
              help="Bits per weight.")
@click.option("--group-size", type=click.Choice(GROUP_SIZES), default="64", show_default=True,
              help="Consecutive weights of a row sharing one scale and bias; must divide every quantized width.")
@click.option("--keep-float", "keep_float", multiple=True, metavar="PATTERN",
              help="Keep the layers whose path or weight name matches this pattern in float "
                   "(fnmatch, repeatable: 'embed*', 'blocks.*.attn.*'). Routers always stay float.")
@click.option("--out", type=OutDir(), required=True, help="Run directory to create.")
@click.option("--overwrite", is_flag=True, help="Replace an existing tinymoe run in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def quantize(checkpoint, bits, group_size, keep_float, out, overwrite, as_json):
    """Quantize CHECKPOINT (a checkpoint or run directory) into the run directory --out.

    MLX affine quantization: every weight matrix (stacked experts, attention, dense and shared
    FFNs, embedding, output head) is stored as BITS-bit integers with a float scale and bias per
    group of weights; each expert stays one readable slice, so --resident-experts works as in
    float. The result samples, evaluates, inspects and exports (to mlx-lm's quantized layout)
    like any checkpoint; it cannot be trained.
    """
    from pathlib import Path

    from tinymoe.interop.quantize import quantize_checkpoint
    from tinymoe.run.readers import read_latest

    report = read_latest(checkpoint, lambda c: quantize_checkpoint(c, Path(out), int(bits), int(group_size),
                                                                   keep_float, overwrite))
    if as_json:
        print_json(report)
        return
    mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    click.echo(f"source       {report['source']} (step {report['step']})")
    kept = f"; kept float: {', '.join(report['float_modules_kept'])}" if report["float_modules_kept"] else ""
    click.echo(f"quantized    {report['quantized_modules']} layers to {report['bits']} bits, group size "
               f"{report['group_size']} (routers, norms and biases in float{kept})")
    click.echo(f"weights      {mib(report['weight_bytes_before'])} -> {mib(report['weight_bytes_after'])}")
    click.echo(f"error        max |w - dequantized w| / max |w| = {report['max_relative_weight_error']:.3g}")
    click.echo(f"wrote        {report['checkpoint']}")
