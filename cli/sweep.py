"""`tinymoe sweep`: a grid of ordinary training runs in one folder, resumable, with dense twins."""

from __future__ import annotations

import click

from tinymoe.cli.common import OutDir, UserError, print_json, user_errors


def _parse_grid(items) -> dict:
    from tinymoe.cli.train import _parse_value

    grid = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--grid expects KEY=V1,V2,..., got '{item}'")
        if key in grid:
            raise UserError(f"--grid {key} is given twice; list all its values in one --grid")
        zipped = "," in key  # KEY1,KEY2=a:b,c:d - the keys move together
        values = [[_parse_value(p.strip()) for p in v.split(":")] if zipped else _parse_value(v.strip())
                  for v in raw.split(",") if v.strip()]
        if not values:
            raise UserError(f"--grid {key}: no values")
        if len(set(map(repr, values))) != len(values):
            raise UserError(f"--grid {key}: a value is listed twice")
        grid[key] = values
    return grid


def _parse_sets(items) -> dict:
    """--set KEY=VALUE items as train reads them (known keys, values of the key's type)."""
    from tinymoe.cli.train import _split_sets

    model_over, train_over = {}, {}
    _split_sets(items, model_over, train_over)
    return {**model_over, **train_over}


@click.command("sweep")
@click.option("--preset", default="tiny", show_default=True, help="Preset every run starts from.")
@click.option("--grid", "grid_items", multiple=True, metavar="KEY=V1,V2",
              help="A config key (as --set takes it) and its values; repeat for more keys: runs are their product. "
                   "Keys that move together: KEY1,KEY2=a1:b1,a2:b2.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="A setting shared by every run.")
@click.option("--match", type=click.Choice(["active-params", "total-params", "none"]), default="active-params",
              show_default=True, help="Add to each MoE point a dense twin of equal active (or total) parameters "
              "(the routers' weights aside); none: run the grid only.")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Repeat each run with this many seeds (the preset's seed, +1, ...).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Steps of every run (default: the preset's).")
@click.option("--data", multiple=True, help="Training data of every run (as train --data; default: bundled corpus).")
@click.option("--out", type=OutDir(), default=None, help="Sweep folder: one run folder per run inside it.")
@click.option("--dry-run", is_flag=True, help="Print the planned runs and their parameter counts; train nothing.")
@click.option("--quiet", is_flag=True, help="Only the sweep's own progress lines, no per-step progress.")
@click.option("--json", "as_json", is_flag=True, help="Print the runs (planned, or their summaries) as JSON.")
@user_errors
def sweep(preset, grid_items, sets, match, seeds, steps, data, out, dry_run, quiet, as_json):
    """Train every point of a grid of settings as its own run folder under --out.

    \b
    Example: tinymoe sweep --preset tiny --grid moe_experts=1,4,8 --grid moe_topk=1,2 --out sweeps/a
    Run the same command again to continue: finished runs are skipped, a stopped one resumes.
    Then: tinymoe compare sweeps/a   and   tinymoe plot sweeps/a"""
    from pathlib import Path

    from tinymoe.run.sweep import SweepRunner, open_sweep
    from tinymoe.run.sweep_plan import describe, plan_sweep, planned_dict

    grid = _parse_grid(grid_items)
    fixed = _parse_sets(sets)
    if data:
        from tinymoe.data.record import absolute_spec

        fixed["data"] = [absolute_spec(s) for s in data]
    runs = plan_sweep(preset, grid, fixed, seeds, match)
    described = [describe(r, preset, fixed, steps) for r in runs]
    if dry_run:
        if as_json:
            print_json({"runs": described})
            return
        for d in described:
            twin = f"twin of {', '.join(d['twin_of'])}" if d["twin_of"] else ""
            role = twin if d["role"] == "twin" else "grid point" + (f"; {twin}" if twin else "")
            click.echo(f"{d['name']:<44} {d['params_total']:>11,} total {d['params_active']:>11,} active  "
                       f"{d['steps']} steps  seed {d['seed']}  ({role})")
        return
    if not out:
        raise UserError("--out is required (the sweep folder), or use --dry-run")
    open_sweep(Path(out), planned_dict(preset, grid, fixed, seeds, match, steps, list(fixed.get("data", []))), runs)
    say = (lambda line: None) if as_json else (lambda line: click.echo(line, err=True))
    runner = SweepRunner(Path(out), preset, fixed, steps, runs, say=say, progress=not quiet and not as_json)
    try:
        results = runner.run()
    except KeyboardInterrupt:
        raise UserError(f"interrupted; run the same command again to continue the sweep in {out}") from None
    if as_json:
        print_json({"sweep": str(out), "runs": results})
        return
    busy = [r["name"] for r in results if r["state"] == "busy"]
    if busy:
        click.echo(f"sweep: {len(busy)} runs were being trained by another process ({', '.join(busy)}); run the "
                   f"command again once they finish to check the whole sweep", err=True)
    else:
        click.echo(f"sweep done: {len(results)} runs in {out}; compare them with: tinymoe compare {out}", err=True)
