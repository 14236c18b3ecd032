"""tinymoe compare and its bootstrap: intervals checked on synthetic data with known answers,
scores checked against `tinymoe eval` (a second implementation), the trainer's validation
checked against both, and the refusal (tokenizers) and warning (data) cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from tinymoe.analysis import bootstrap
from tinymoe.analysis.compare import check_comparable
from tinymoe.cli.main import cli
from tinymoe.errors import TinyMoeError


# ----------------------------------------------------------------------------- bootstrap, known answers


def test_bootstrap_standard_error_of_a_mean_matches_the_analytic_one():
    rng = np.random.default_rng(1)
    sigma, n = 2.0, 400
    x = rng.normal(3.0, sigma, n)
    reps = bootstrap.ratio_replicates(x, np.ones(n), bootstrap.window_indices(n, 4000, seed=5))
    plug_in = x.std(ddof=0) / math.sqrt(n)  # what the bootstrap estimates
    assert bootstrap.standard_error(reps) == pytest.approx(plug_in, rel=0.05)
    assert bootstrap.standard_error(reps) == pytest.approx(sigma / math.sqrt(n), rel=0.10)


def test_bootstrap_interval_covers_the_true_mean_at_its_level():
    """Of 400 data sets of known mean, close to 95% of the intervals contain it."""
    rng = np.random.default_rng(2)
    trials, n = 400, 60
    covered = 0
    for t in range(trials):
        x = rng.normal(0.0, 1.0, n)
        low, high = bootstrap.percentile_interval(
            bootstrap.ratio_replicates(x, np.ones(n), bootstrap.window_indices(n, 500, seed=t)))
        covered += low <= 0.0 <= high
    assert 0.90 <= covered / trials <= 0.98  # binomial sd at 95%: 0.011


def test_ratio_of_sums_matches_the_delta_method():
    """bits/byte is sum(nats)/sum(bytes): its bootstrap SE matches the delta-method SE of a ratio."""
    rng = np.random.default_rng(3)
    n = 500
    den = rng.integers(100, 300, n).astype(float)
    num = 1.5 * den + rng.normal(0, 20, n)
    r = num.sum() / den.sum()
    delta_se = math.sqrt(np.sum((num - r * den) ** 2)) / den.sum()
    reps = bootstrap.ratio_replicates(num, den, bootstrap.window_indices(n, 4000, seed=0))
    assert bootstrap.standard_error(reps) == pytest.approx(delta_se, rel=0.06)


def test_paired_differences_cancel_shared_noise():
    """Two 'runs' on the same windows: hard windows are hard for both. The paired interval is
    much narrower than either run's, and covers the true difference 0.1."""
    rng = np.random.default_rng(4)
    n = 300
    hardness = rng.normal(0, 1.0, n)
    a = 2.0 + hardness + rng.normal(0, 0.05, n)
    b = 2.1 + hardness + rng.normal(0, 0.05, n)
    idx = bootstrap.window_indices(n, 2000, seed=9)
    ones = np.ones(n)
    ra, rb = bootstrap.ratio_replicates(a, ones, idx), bootstrap.ratio_replicates(b, ones, idx)
    low, high = bootstrap.percentile_interval(rb - ra)
    a_low, a_high = bootstrap.percentile_interval(ra)
    assert low < 0.1 < high
    assert (high - low) < 0.2 * (a_high - a_low)


def test_identical_seeds_give_the_window_interval():
    """With seeds that agree exactly, resampling seeds adds nothing: the two-level replicates are
    the window replicates."""
    rng = np.random.default_rng(5)
    num, den = rng.random(50) + 1, np.ones(50)
    idx = bootstrap.window_indices(50, 300, seed=1)
    two_level = bootstrap.seed_mean_replicates(np.stack([num] * 3), np.stack([den] * 3), idx,
                                               bootstrap.seed_indices(3, 300, 0))
    np.testing.assert_allclose(two_level, bootstrap.ratio_replicates(num, den, idx))


# ----------------------------------------------------------------------------- refusals and warnings


def _manifest(files):
    return {"data": {"files": files}, "train": {"val_fraction": 0.1}}


def test_different_tokenizers_are_refused_and_different_data_warned():
    with pytest.raises(TinyMoeError, match="another tokenizer.*bits per byte are still comparable"):
        check_comparable(["a", "b"], [_manifest([]), _manifest([])], ["bytes", "sp:abc"])
    warnings = check_comparable(["a", "b", "c"], [_manifest(["x"]), _manifest(["x"]), _manifest(["y"])], ["t"] * 3)
    assert len(warnings) == 1 and "c trained on other data than a" in warnings[0]
    assert check_comparable(["a", "b"], [_manifest(["x"]), _manifest(["x"])], ["t", "t"]) == []


# ----------------------------------------------------------------------------- real runs


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    common = ["--preset", "debug", "--steps", 6, "--eval-every", 6, "--quiet"]
    for name, extra in [("moe", []), ("moe1", ["--seed", 1]), ("dense", ["--moe-experts", 1, "--moe-topk", 1]),
                        ("few", ["--set", "eval_batches=3"])]:
        result = _cli("train", *common, *extra, "--out", root / name)
        assert result.exit_code == 0, result.output
    return root


def test_compare_scores_equal_tinymoe_eval(runs):
    """Every window scored: compare's bits/byte is eval's (a second implementation), for each run."""
    out = _cli("compare", runs / "dense", runs / "moe", "--json", "--replicates", 50)
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    for group in result["groups"]:
        ev = json.loads(_cli("eval", runs / group["label"], "--json").stdout)
        assert group["bits_per_byte"] == pytest.approx(ev["bits_per_byte"], rel=1e-5)
        low, high = group["ci_windows"]
        assert low < group["bits_per_byte"] < high
    moe = next(g for g in result["groups"] if g["label"] == "moe")
    assert moe["diff"] == pytest.approx(moe["bits_per_byte"] - result["groups"][0]["bits_per_byte"])
    assert set(moe["domains"]) == {"code", "prose"}
    assert moe["params_total"] > moe["params_active"]


def test_seeds_of_one_configuration_form_one_row(runs):
    out = _cli("compare", runs / "moe", runs / "moe1", runs / "dense", "--baseline", "dense", "--json",
               "--replicates", 50)
    result = json.loads(out.stdout)
    assert [g["runs"] for g in result["groups"]] == [["moe", "moe1"], ["dense"]]
    moe = result["groups"][0]
    assert moe["bits_per_byte"] == pytest.approx(np.mean(moe["per_seed"]))
    assert moe["ci_seeds"] is not None and result["baseline"] == "dense"


def test_trainer_validation_agrees_with_eval(runs):
    """The trainer validated on 3 batches x 4 = 12 windows spread over the whole split: exactly
    compare's score of those 12 windows, within sampling error of eval's score of every window,
    and drawn from both domains (the first 12 windows are all code)."""
    from tinymoe.data.batches import spread_windows
    from tinymoe.data.prepare import held_out_tokens
    from tinymoe.io.loader import load_model

    trainer_bpb = json.loads((runs / "few" / "checkpoints" / "step-0000006" / "manifest.json").read_text()
                             )["metrics"]["val_bits_per_byte"]
    twelve = json.loads(_cli("compare", runs / "few", "--max-windows", 12, "--json", "--batch-size", 4,
                             "--replicates", 2000).stdout)["groups"][0]
    assert trainer_bpb == pytest.approx(twelve["bits_per_byte"], rel=1e-5)
    full = json.loads(_cli("eval", runs / "few", "--json").stdout)["bits_per_byte"]
    low, high = twelve["ci_windows"]
    half = (high - low) / 2
    assert abs(trainer_bpb - full) <= 1.5 * half
    _, manifest, tokenizer, _ = load_model(runs / "few")
    held = held_out_tokens(manifest, tokenizer, None)
    context = manifest["model"]["context"]
    starts = spread_windows(held.tokens.size, context, 12)
    assert len(set(held.domain_ids[starts].tolist())) == 2
    assert len(set(held.domain_ids[np.arange(12) * context].tolist())) == 1


def test_compare_refuses_another_tokenizer_in_one_line(runs, tmp_path):
    r = _cli("train", "--preset", "debug", "--tokenizer", "sp:400", "--steps", 2, "--quiet", "--out", tmp_path / "sp")
    assert r.exit_code == 0, r.output
    import subprocess
    import sys

    # the real entry point: one line on stderr, exit 2
    p = subprocess.run([sys.executable, "-m", "tinymoe.cli.main", "compare", str(runs / "dense"), str(tmp_path / "sp")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: ")
    assert "tokenizer" in p.stderr and "still comparable" in p.stderr


def test_compare_warns_when_the_data_differ(runs, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("a different little corpus, repeated. " * 400)
    r = _cli("train", "--preset", "debug", "--steps", 2, "--data", text, "--quiet", "--out", tmp_path / "other")
    assert r.exit_code == 0, r.output
    out = _cli("compare", runs / "dense", tmp_path / "other", "--max-windows", 8, "--replicates", 20)
    assert out.exit_code == 0
    assert "warning: other trained on other data than dense" in out.output
