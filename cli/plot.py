"""`tinymoe plot`: training curves of a run from its metrics.jsonl, as a PNG."""

from __future__ import annotations

from pathlib import Path

import click

from tinymoe.cli.common import OutDir, print_json, user_errors


@click.command("plot")
@click.argument("run", type=click.Path())
@click.option("--out", "out_dir", type=OutDir(), default=None,
              help="Folder for training.png (default: RUN/plots).")
@click.option("--json", "as_json", is_flag=True, help='Print {"written": [paths], "records": N}.')
@user_errors
def plot(run, out_dir, as_json):
    """Draw RUN's training curves: loss and validation loss, router losses, per-layer load CV, lr.

    RUN is a run directory or its metrics.jsonl. Needs matplotlib: pip install 'tinymoe[plot]'."""
    from tinymoe.analysis.plots import read_metrics, require_matplotlib, training_curves

    require_matplotlib()
    records = read_metrics(run)
    run_path = Path(run)
    base = run_path.parent if run_path.is_file() else run_path
    path = training_curves(records, (Path(out_dir) if out_dir else base / "plots") / "training.png",
                           _moe_layers(base))
    if as_json:
        print_json({"written": [str(path)], "records": len(records)})
    else:
        click.echo(f"wrote {path}")


def _moe_layers(run_dir: Path) -> list[int] | None:
    """Block indices of the MoE layers, from the run's latest checkpoint when there is one."""
    from tinymoe.io import checkpoint
    from tinymoe.errors import TinyMoeError
    from tinymoe.io.loader import model_config_of

    try:
        ckpt = checkpoint.resolve(run_dir)
        cfg = model_config_of(checkpoint.read_manifest(ckpt), ckpt)
    except TinyMoeError:
        return None  # curves still draw; lines are then numbered among the MoE layers
    return [i for i in range(cfg.n_layers) if cfg.layer_is_moe(i)]
