"""Pictures: PNG files from hand-built statistics and a synthetic metrics log; clear errors."""

import json
import sys

import pytest
from click.testing import CliRunner

from tinymoe.cli.main import cli
from tinymoe.errors import TinyMoeError
from tinymoe.analysis.plots import curves, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"
LAYERS = [
    {"layer": 0, "experts": 4, "load": [0.4, 0.3, 0.2, 0.1], "specialization": 0.12,
     "domain_expert": [[0.7, 0.1, 0.1, 0.1], [0.1, 0.5, 0.3, 0.1]]},
    {"layer": 2, "experts": 4, "load": [0.25, 0.25, 0.25, 0.25], "specialization": None,
     "domain_expert": [[0.25] * 4, [0.25] * 4]},
]


def write_metrics(path, n=6):
    lines = []
    for step in range(1, n + 1):
        lines.append({"step": step, "loss": 3.0 / step, "total_loss": 3.1 / step, "balance_loss": 2.0 + 0.1 * step,
                      "z_loss": 5.0 / step, "lr": 1e-3, "load": [[0.5, 0.5, 0.0, 0.0], [0.25] * 4]})
        if step % 3 == 0:
            lines.append({"step": step, "val_loss": 2.9 / step, "val_ppl": 1.0})
    path.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    return path


def test_curves_from_metrics(tmp_path):
    records = read_metrics(write_metrics(tmp_path / "metrics.jsonl"))
    series = curves(records)
    assert series["loss"][0] == [1, 2, 3, 4, 5, 6]
    assert series["val_loss"] == ([3, 6], [pytest.approx(2.9 / 3), pytest.approx(2.9 / 6)])
    assert {"balance_loss", "z_loss"} <= set(series) and "total_loss" not in series
    # load (.5, .5, 0, 0): mean .25, std .25 -> CV 1; an even load has CV 0
    assert series["load_cv/0"][1] == [pytest.approx(1.0)] * 6
    assert series["load_cv/1"][1] == [0.0] * 6


def test_read_metrics_errors(tmp_path, capsys):
    with pytest.raises(TinyMoeError, match="no such metrics file"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{oops\n")
    with pytest.raises(TinyMoeError, match="no records yet"):
        read_metrics(tmp_path)


def test_read_metrics_tolerates_a_torn_last_line_and_skips_malformed_ones(tmp_path, capsys):
    # A crash mid-write tears the last line: dropped without a word. A malformed line elsewhere
    # is skipped with a warning naming it (docs/errors.md). Before: both raised.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    err = capsys.readouterr().err
    assert err.strip() == f"warning: {tmp_path / 'metrics.jsonl'}:2: not a metrics record (malformed line); skipped"


def test_missing_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    from tinymoe.analysis.plots import load_heatmap

    with pytest.raises(TinyMoeError, match=r"plots need matplotlib: pip install 'tinymoe\[plot\]'"):
        load_heatmap(LAYERS, tmp_path / "x.png")
    write_metrics(tmp_path / "metrics.jsonl")
    r = CliRunner().invoke(cli, ["plot", str(tmp_path)])
    assert r.exit_code == 2 and r.output.strip() == "error: plots need matplotlib: pip install 'tinymoe[plot]'"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 2000, path


def test_heatmaps_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from tinymoe.analysis.plots import domain_expert_heatmaps, load_heatmap

    assert_png(load_heatmap(LAYERS, tmp_path / "load.png"))
    assert_png(domain_expert_heatmaps(LAYERS, ["code", "prose"], tmp_path / "sub" / "de.png"))
    with pytest.raises(TinyMoeError, match="no domain tags"):
        domain_expert_heatmaps([{**LAYERS[0], "domain_expert": None}], [], tmp_path / "none.png")


def test_plot_command_writes_training_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path / "metrics.jsonl")
    r = CliRunner().invoke(cli, ["plot", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["records"] == 8 and out["written"] == [str(tmp_path / "plots" / "training.png")]
    assert_png(tmp_path / "plots" / "training.png")
    r = CliRunner().invoke(cli, ["plot", str(tmp_path / "metrics.jsonl"), "--out", str(tmp_path / "elsewhere")])
    assert r.exit_code == 0 and (tmp_path / "elsewhere" / "training.png").is_file()
    bad = CliRunner().invoke(cli, ["plot", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "no such metrics file" in bad.output
