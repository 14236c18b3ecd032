"""Strict JSON everywhere tinymoe writes it: a number that is not finite is `null`, never the
`NaN`/`Infinity` tokens Python writes by default and other JSON readers reject (docs/errors.md).

Checked with a parser that refuses those tokens: the helper itself (tinymoe.jsonutil), and a
training run whose validation loss is NaN, through metrics.jsonl, the checkpoint manifest and
`--json` output.
"""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from tinymoe.cli.main import cli
from tinymoe.jsonutil import dumps, strict


def strict_loads(text: str):
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_helper_turns_non_finite_numbers_into_null():
    value = {"a": math.nan, "b": [math.inf, -math.inf, 1.5, (2, math.nan)], "c": np.float32("nan"),
             "d": np.float64(2.5), "e": np.int64(3), "f": np.array([1.0, np.inf]), "g": None, "h": "NaN"}
    assert strict_loads(dumps(value)) == {"a": None, "b": [None, None, 1.5, [2, None]], "c": None, "d": 2.5,
                                          "e": 3, "f": [1.0, None], "g": None, "h": "NaN"}
    assert strict(1e308) == 1e308 and strict(True) is True


def test_helper_refuses_what_it_cannot_sanitise():
    with pytest.raises(TypeError):
        dumps({"x": object()})


def test_nan_validation_loss_is_null_in_metrics_manifest_and_json(tmp_path, monkeypatch):
    """Old: `NaN` in metrics.jsonl (the val record), in the manifest's metrics and in `--json`."""
    import tinymoe.train.trainer as trainer

    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: {"loss": math.nan, "ppl": math.inf,
                                                              "bits_per_byte": math.nan, "tokens": 64})
    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--preset", "debug", "--data", str(data), "--steps", "2",
                                      "--eval-every", "1", "--out", str(out), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    summary = strict_loads(result.output)
    assert summary["val_loss"] is None and summary["step"] == 2
    records = [strict_loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    assert val and all(r["val_loss"] is None and r["val_ppl"] is None for r in val)
    manifests = sorted(out.rglob("manifest.json"))
    assert manifests
    for path in manifests:
        assert strict_loads(path.read_text())["metrics"]["val_loss"] is None
