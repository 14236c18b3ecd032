"""The picture of a sweep: validation bits per byte against tokens, training time and active
parameters, one line per configuration, a band where several seeds allow.

Inputs are plain data read from each run folder: the validation records of metrics.jsonl (the
trainer's periodic validation, whose windows are spread over the whole split:
tinymoe.data.batches.spread_windows) and the parameter counts of the latest manifest. Time is
the training time up to each validation (tinymoe.analysis.compare.training_seconds' rule: the log
windows' tokens / tokens per second). Runs whose configs differ only in their seed share a line:
their mean, with a 95% band mean +- 1.96 x the standard error over seeds (a normal
approximation, rough with 2-3 seeds; `tinymoe compare` gives the bootstrap intervals).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tinymoe.analysis.plots import _save, require_matplotlib
from tinymoe.errors import TinyMoeError
from tinymoe.io import metrics_log


def validation_series(run_dir: Path) -> dict:
    """{"tokens", "seconds", "bits_per_byte"}: lists, one entry per validation of the run."""
    path = Path(run_dir) / metrics_log.FILE_NAME
    if not path.is_file():
        return {"tokens": [], "seconds": [], "bits_per_byte": []}
    tokens_at, seconds_at = {0: 0}, {0: 0.0}
    seen, seconds = 0, 0.0
    out = {"tokens": [], "seconds": [], "bits_per_byte": []}
    for _, rec in metrics_log.read_records(path, warn=False):
        step = rec.get("step")
        if isinstance(rec.get("tokens_seen"), int):
            rate = rec.get("tokens_per_s")
            if isinstance(rate, (int, float)) and rate > 0 and rec["tokens_seen"] > seen:
                seconds += (rec["tokens_seen"] - seen) / rate
            seen = rec["tokens_seen"]
            tokens_at[step], seconds_at[step] = seen, seconds
        bpb = rec.get("val_bits_per_byte")
        if isinstance(bpb, (int, float)) and math.isfinite(bpb) and step in tokens_at:
            out["tokens"].append(tokens_at[step])
            out["seconds"].append(seconds_at[step])
            out["bits_per_byte"].append(float(bpb))
    return out


def _mean_band(rows: list[list[float]]) -> tuple[np.ndarray, np.ndarray | None]:
    n = min(len(r) for r in rows)
    values = np.array([r[:n] for r in rows], dtype=np.float64)  # (S, n)
    mean = values.mean(axis=0)
    if values.shape[0] < 2:
        return mean, None
    half = 1.96 * values.std(axis=0, ddof=1) / math.sqrt(values.shape[0])
    return mean, half


def sweep_figure(groups: list[dict], path) -> Path:
    """`groups`: [{"label", "params_active", "series": [validation_series of each seed]}]."""
    plt = require_matplotlib()
    if not any(s["bits_per_byte"] for g in groups for s in g["series"]):
        raise TinyMoeError("no run of the sweep has validated yet: nothing to plot")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    finals = []
    for g in groups:
        series = [s for s in g["series"] if s["bits_per_byte"]]
        if not series:
            continue
        bpb, band = _mean_band([s["bits_per_byte"] for s in series])
        n = bpb.size
        for ax, key, unit in ((axes[0], "tokens", 1e6), (axes[1], "seconds", 1.0)):
            x = np.array([s[key][:n] for s in series], dtype=np.float64).mean(axis=0) / unit
            line, = ax.plot(x, bpb, "o-", markersize=3, label=g["label"])
            if band is not None:
                ax.fill_between(x, bpb - band, bpb + band, color=line.get_color(), alpha=0.2)
        finals.append((g["label"], g["params_active"], bpb[-1], None if band is None else band[-1]))
    for label, active, value, half in finals:
        if active:
            active = active / 1e6
            axes[2].errorbar([active], [value], yerr=None if half is None else [[half], [half]], fmt="o", capsize=3,
                             label=label)
            axes[2].annotate(label, (active, value), fontsize=6, xytext=(3, 3), textcoords="offset points")
    titles = ("validation bits/byte vs tokens", "vs training time (s)", "final value vs active parameters")
    xlabels = ("tokens seen (millions)", "seconds in training steps", "active parameters per token (millions)")
    for ax, title, xlabel in zip(axes, titles, xlabels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("bits per byte", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
