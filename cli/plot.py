"""`tinymoe plot`: training curves of a run from its metrics.jsonl, as a PNG."""

from __future__ import annotations

from pathlib import Path

import click

from tinymoe.cli.common import OutDir, print_json, user_errors


@click.command("plot")
@click.argument("run", type=click.Path())
@click.option("--out", "out_dir", type=OutDir(), default=None,
              help="Folder for training.png or sweep.png (default: RUN/plots).")
@click.option("--json", "as_json", is_flag=True, help='Print {"written": [paths], "records": N}.')
@user_errors
def plot(run, out_dir, as_json):
    """Draw RUN's training curves: loss and validation loss, router losses, per-layer load CV, lr.

    RUN is a run directory or its metrics.jsonl, or a sweep folder (tinymoe sweep): then one figure,
    sweep.png, of validation bits/byte against tokens, training time and active parameters, one
    line per configuration (the mean and a band where it has several seeds). Needs matplotlib: pip install 'tinymoe[plot]'."""
    from tinymoe.analysis.plots import read_metrics, require_matplotlib, training_curves

    require_matplotlib()
    if _is_sweep(run):
        return _plot_sweep(Path(run), out_dir, as_json)
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


def _is_sweep(path) -> bool:
    from tinymoe.io.folders import read_marker
    from tinymoe.run.sweep import SWEEP_KIND

    marker = read_marker(Path(path)) if Path(path).is_dir() else None
    return marker is not None and marker["kind"] == SWEEP_KIND


def _plot_sweep(folder: Path, out_dir, as_json: bool):
    """One line per configuration of the sweep (its seeds together)."""
    from tinymoe.analysis.compare import config_key
    from tinymoe.analysis.sweep_plots import sweep_figure, validation_series
    from tinymoe.errors import TinyMoeError
    from tinymoe.io import checkpoint
    from tinymoe.run.sweep import sweep_runs

    _, runs = sweep_runs(folder)
    groups: dict = {}
    for run in runs:
        try:
            manifest = checkpoint.read_manifest(checkpoint.resolve(folder / run.name))
        except TinyMoeError:
            continue  # not started yet
        group = groups.setdefault(config_key(manifest), {"label": run.point, "series": [],
                                                         "params_active": (manifest.get("params") or {}).get("active")})
        group["series"].append(validation_series(folder / run.name))
    if not groups:
        raise TinyMoeError(f"{folder}: no run of this sweep has a checkpoint yet")
    path = sweep_figure(list(groups.values()), (Path(out_dir) if out_dir else folder / "plots") / "sweep.png")
    if as_json:
        print_json({"written": [str(path)], "runs": sum(len(g["series"]) for g in groups.values())})
    else:
        click.echo(f"wrote {path}")
