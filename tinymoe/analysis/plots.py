"""Pictures of routing and training: load and domain x expert heatmaps, training curves.

matplotlib is an optional extra (`pip install 'tinymoe[plot]'`); it is imported only when a
picture is drawn, with the non-interactive Agg backend so plotting works without a display.
The inputs are plain data: the `layers` list of `inspect --json` for the heatmaps, and the
records of a run's `metrics.jsonl` for the curves (`read_metrics`). Every function writes one
PNG and returns its path.
"""

from __future__ import annotations

import math
from pathlib import Path

from tinymoe.analysis.stats import load_cv
from tinymoe.errors import TinyMoeError
from tinymoe.io import metrics_log

DPI = 100


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise TinyMoeError("plots need matplotlib: pip install 'tinymoe[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _annotate(ax, values, dark=None):
    """Write each cell's value (%) on it; `dark(r, c)` says which cells need light text."""
    top = max((v for row in values for v in row), default=0) or 1.0
    for r, row in enumerate(values):
        for c, v in enumerate(row):
            light = dark(r, c) if dark else v <= 0.6 * top
            ax.text(c, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if light else "black")


def load_heatmap(layers: list[dict], path) -> Path:
    """Rows = MoE layers, columns = experts, cell = share of the layer's kept slots (%)."""
    plt = require_matplotlib()
    loads = [layer["load"] for layer in layers]
    E = max(len(row) for row in loads)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * E, 0.9 + 0.45 * len(loads)))
    percent = [[100 * v for v in row] for row in loads]  # cells and colour bar in the same unit
    im = ax.imshow(percent, cmap="viridis", vmin=0, aspect="auto")
    _annotate(ax, loads)
    ax.set_xticks(range(E))
    ax.set_yticks(range(len(loads)), [f"layer {layer['layer']}" for layer in layers])
    ax.set_xlabel("expert")
    ax.set_title("expert load (% of routed slots)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02).set_label("%", fontsize=8)
    return _save(fig, path)


def preference(layer: dict) -> list[list[float]]:
    """log2(share of domain d's slots on expert e / the layer's load on e), per (d, e): above 0
    the domain uses the expert more than the data as a whole does, below 0 less."""
    out = []
    for row in layer["domain_expert"]:
        out.append([math.log2(max(s, 1e-4) / max(l, 1e-4)) for s, l in zip(row, layer["load"])])
    return out


def domain_expert_heatmaps(layers: list[dict], domains: list[str], path) -> Path:
    """One panel per MoE layer: rows = domains, columns = experts. The number in a cell is the share
    of the domain's routed slots that went to the expert (%); its colour is the domain's preference
    for the expert (`preference`), red for more than the layer's average use, blue for less, so
    the experts a domain favours stand out even when every expert gets some of everything."""
    plt = require_matplotlib()
    if not domains or any(layer.get("domain_expert") is None for layer in layers):
        raise TinyMoeError("no domain tags in the routed data; a domain x expert picture needs them")
    n = len(layers)
    E = max(layer["experts"] for layer in layers)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False,
                             figsize=(cols * (1.4 + 0.42 * E), 0.6 + rows * (0.9 + 0.42 * len(domains))))
    # Saturate at 2x (or 1/2) the average use: with two equal domains 2x is the most an expert can
    # favour one of them, and the weak preferences of a briefly trained router stay visible.
    lim = 1.0
    for ax, layer in zip(axes.flat, layers):
        pref = preference(layer)
        im = ax.imshow(pref, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        _annotate(ax, layer["domain_expert"], dark=lambda r, c, pref=pref: abs(pref[r][c]) > 0.6 * lim)
        ax.set_xticks(range(layer["experts"]))
        ax.set_yticks(range(len(domains)), domains)
        spec = layer.get("specialization")
        spec_text = "n/a" if spec is None else f"{spec:.2f}"
        ax.set_title(f"layer {layer['layer']}  (specialization {spec_text})", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("% of each domain's routed slots per expert; colour: log2 of that over the layer's load",
                 fontsize=10)
    fig.tight_layout()
    bar = fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.025, pad=0.02)
    bar.set_label("preference (log2)", fontsize=8)
    return _save(fig, path)


# ----------------------------------------------------------------------------- training curves


def read_metrics(path) -> list[dict]:
    """Records of a run's metrics.jsonl (`path` is the file or the run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise TinyMoeError(f"{path}: no such metrics file (is this a tinymoe run directory?)")
    # A torn last line (a crash mid-write) is dropped, other malformed lines skipped with a warning.
    records = [rec for _, rec in metrics_log.read_records(path)]
    if not records:
        raise TinyMoeError(f"{path}: no records yet")
    return records


def curves(records: list[dict]) -> dict:
    """Series to plot, each a (steps, values) pair: loss, val_loss, every router loss
    (a key ending in _loss other than loss / total_loss / val_loss), lr, and per-layer load CV."""
    out: dict = {}

    def add(name, step, value):
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps, values = out.setdefault(name, ([], []))
            steps.append(step)
            values.append(float(value))

    for rec in records:
        step = rec["step"]
        for key, value in rec.items():
            if key in ("loss", "val_loss", "lr") or (key.endswith("_loss") and key != "total_loss"):
                add(key, step, value)
        for i, load in enumerate(rec.get("load") or []):
            if load:
                add(f"load_cv/{i}", step, load_cv(load))
    return out


def training_curves(records: list[dict], path, moe_layers: list[int] | None = None,
                    loss_weights: dict | None = None) -> Path:
    """A 2x2 figure: train and validation loss; router losses; per-MoE-layer load CV; lr.
    `moe_layers` (block indices) names the load-CV lines like `inspect` does. `loss_weights`
    (router loss name -> its weight in the training loss): a loss of weight 0 is logged but
    trained on by nobody, so it is left out, and the others say their weight."""
    plt = require_matplotlib()
    series = curves(records)
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    ax = axes[0][0]
    for name, style in (("loss", "-"), ("val_loss", "o-")):
        if name in series:
            ax.plot(*series[name], style, label=name.replace("_", " "), markersize=4)
    ax.set_title("loss (nats/token)", fontsize=10)
    ax = axes[0][1]
    aux = sorted(k for k in series if k.endswith("_loss") and k not in ("loss", "val_loss"))
    weights = loss_weights or {}
    for name in aux:
        if weights.get(name, 1.0) == 0:
            continue
        ax.plot(*series[name], label=f"{name} (x{weights[name]:g})" if name in weights else name)
    ax.set_title("router losses (summed over MoE layers)", fontsize=10)
    ax = axes[1][0]
    # The log stores one load per MoE layer, in order; without the block indices, count MoE layers.
    for name in sorted((k for k in series if k.startswith("load_cv/")), key=lambda k: int(k.split("/")[1])):
        j = int(name.split("/")[1])
        known = moe_layers is not None and j < len(moe_layers)
        ax.plot(*series[name], label=f"layer {moe_layers[j]}" if known else f"MoE layer #{j}")
    ax.set_title("load CV per MoE layer (0 = even)", fontsize=10)
    ax = axes[1][1]
    if "lr" in series:
        ax.plot(*series["lr"], color="gray")
    ax.set_title("learning rate", fontsize=10)
    for ax in axes.flat:
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        if not ax.has_data():
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    return _save(fig, path)
