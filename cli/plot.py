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
    cfg = _model_config(base)
    layers = [i for i in range(cfg.n_layers) if cfg.layer_is_moe(i)] if cfg is not None else None
    path = training_curves(records, (Path(out_dir) if out_dir else base / "plots") / "training.png",
                           layers, _loss_weights(cfg))
    if as_json:
        print_json({"written": [str(path)], "records": len(records)})
    else:
        click.echo(f"wrote {path}")


def _model_config(run_dir: Path):
    """The run's model config, from its latest checkpoint when there is one."""
    from tinymoe.io import checkpoint
    from tinymoe.errors import TinyMoeError
    from tinymoe.io.loader import model_config_of

    try:
        ckpt = checkpoint.resolve(run_dir)
        return model_config_of(checkpoint.read_manifest(ckpt), ckpt)
    except TinyMoeError:
        return None  # curves still draw; lines are then numbered among the MoE layers


def _loss_weights(cfg) -> dict | None:
    """The weight each logged router loss has in the training loss (a weight-0 loss is not drawn)."""
    if cfg is None:
        return None
    from tinymoe.router_registry import effective_entropy_weight

    return {"balance_loss": cfg.aux_loss_weight, "z_loss": cfg.z_loss_weight,
            "entropy_loss": effective_entropy_weight(cfg)}
