"""`tinymoe compare`: runs (or a sweep's runs) scored on the same held-out windows, with intervals."""

from __future__ import annotations

from pathlib import Path

import click

from tinymoe.cli.common import UserError, print_json, user_errors
from tinymoe.names import DISPATCH_CHOICES


def _entries(paths) -> list[tuple[str, str]]:
    """(label, run or checkpoint path) for every argument; a sweep folder gives its runs that have
    a checkpoint, in the sweep's order."""
    from tinymoe.io.folders import has_checkpoints, read_marker
    from tinymoe.run.sweep import SWEEP_KIND, sweep_runs

    found = []
    for path in paths:
        marker = read_marker(Path(path))
        if marker is not None and marker["kind"] == SWEEP_KIND:
            _, runs = sweep_runs(Path(path))
            present = [(r.name, str(Path(path) / r.name)) for r in runs if has_checkpoints(Path(path) / r.name)]
            if not present:
                raise UserError(f"{path}: no run of this sweep has a checkpoint yet (run tinymoe sweep first)")
            missing = [r.name for r in runs if not has_checkpoints(Path(path) / r.name)]
            if missing:
                click.echo(f"note: {path}: not compared, no checkpoint yet: {', '.join(missing)}", err=True)
            found += [(name, p, path) for name, p in present]
        else:
            if not Path(path).exists():
                raise UserError(f"{path}: no such run, checkpoint or sweep folder")
            found.append((Path(path).resolve().name, str(path), None))
    labels = [name for name, _, _ in found]
    out = []
    for name, p, sweep in found:  # a name two arguments share is told apart by its folder
        label = name if labels.count(name) == 1 else (f"{Path(sweep).name}/{name}" if sweep else str(p))
        out.append((label, p))
    if len({label for label, _ in out}) != len(out):
        raise UserError("a run is named twice; give each run once")
    return out


def _baseline_index(entries, baseline) -> int:
    if baseline is None:
        return 0
    for i, (label, path) in enumerate(entries):
        if baseline in (label, path) or Path(baseline).resolve() == Path(path).resolve():
            return i
    raise UserError(f"--baseline {baseline}: not among the runs compared ({', '.join(l for l, _ in entries)})")


@click.command("compare")
@click.argument("runs", nargs=-1, required=True)
@click.option("--baseline", default=None, help="The run (name or path) the others are compared with, "
              "paired window by window (default: the first).")
@click.option("--data", multiple=True, help="Score on this text instead of the first run's validation split.")
@click.option("--max-windows", type=click.IntRange(min=1), default=None,
              help="Score this many windows spread evenly over the held-out text (default: all of them).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--replicates", type=click.IntRange(min=10), default=1000, show_default=True,
              help="Bootstrap replicates.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Bootstrap seed.")
@click.option("--moe-dispatch", "dispatch", default="auto", show_default=True, type=click.Choice(DISPATCH_CHOICES))
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@user_errors
def compare(runs, baseline, data, max_windows, batch_size, replicates, seed, dispatch, as_json):
    """Score RUNS (run folders, checkpoints or sweep folders) on the same held-out windows.

    Prints bits per byte with 95% bootstrap intervals (over windows; over seeds too where runs
    differ only in their seed), per domain, the paired difference to --baseline, parameters
    total/active, tokens, an estimate of training FLOPs and the training time. Runs trained
    with different tokenizers are refused (bits per byte would be comparable, the windows would
    not be the same text); runs trained on different data are compared with a warning."""
    from tinymoe.analysis.compare import score_runs, summarise
    from tinymoe.analysis.compare_table import format_table
    from tinymoe.quick import eval_batches

    entries = _entries(runs)
    base = _baseline_index(entries, baseline)
    quick = eval_batches(None)  # TINYMOE_QUICK: a couple of batches of windows
    if quick is not None:
        max_windows = min(max_windows or quick * batch_size, quick * batch_size)
    say = (lambda line: None) if as_json else (lambda line: click.echo(line, err=True))
    scored, info = score_runs(entries, list(data) or None, max_windows, batch_size, dispatch, say)
    for line in info["warnings"]:
        click.echo(line, err=True)
    result = summarise(scored, base, replicates, seed, info["domains"])
    if as_json:
        print_json({"held_out": info, **result,
                    "runs": [{k: v for k, v in r.items() if k not in ("manifest", "scores")} for r in scored]})
        return
    for line in format_table(result, info):
        click.echo(line)
