"""Domain experts, end to end on a toy two-domain corpus (debug preset): the secretary learns the
domain, selective loading samples exactly what the fully loaded model does with fewer bytes read,
the probe and inspect report on it, and the sampling refusals."""

import json
import random

import numpy as np
import pytest
from click.testing import CliRunner

from debug_run import one_error_line
from test_reliability_resume import assert_same_final_state, corpus, losses, straight_and_resumed  # noqa: F401
from tinymoe.cli.main import cli

STEPS = 60


def _toy_corpus(root):
    """Python-like functions and plain sentences, about 17 KB and 28 KB."""
    rng = random.Random(0)
    words = "the a cat dog sat ran over under quietly house river morning evening old young walked".split()
    (root / "code").mkdir()
    (root / "prose").mkdir()
    (root / "code" / "a.py").write_text("".join(
        f"def f{i}({v}):\n    return {v} * {rng.randint(1, 9)} + ({v} - {i})\n\n"
        for i in range(400) for v in [rng.choice("xyzabc")]))
    (root / "prose" / "a.txt").write_text("".join(
        " ".join(rng.choice(words) for _ in range(rng.randint(5, 10))).capitalize() + ". " for _ in range(700)))


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    _toy_corpus(root)
    # val_fraction 0.5: alternate 4096-token blocks, so the validation split holds both domains
    result = _invoke("train", "--preset", "debug", "--data", f"code={root / 'code'}", "--data",
                     f"prose={root / 'prose'}", "--domain-experts", "code=0-1,prose=2-3", "--domain-mode", "hard",
                     "--secretary", "--steps", STEPS, "--set", "val_fraction=0.5", "--set", "eval_batches=8",
                     "--eval-every", 0, "--out", root / "run", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    return root / "run"


def test_secretary_learns_the_domain_clearly_above_chance(run):
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line][-1]
    manifest = json.loads(next((run / "checkpoints").iterdir()).joinpath("manifest.json").read_text())
    assert manifest["domains"]["experts"] == {"code": [0, 1], "prose": [2, 3]}
    assert manifest["domains"]["secretary_val_accuracy"] == val["val_secretary_accuracy"]
    # chance is the larger domain's share of windows: at most 28/45 of the corpus
    assert val["val_secretary_accuracy"] >= 0.8


def _sample(run, *extra):
    result = _invoke("sample", run, "--prompt", "def f3(x):\n    return", "--max-tokens", 40, "--temperature", 0,
                     "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


@pytest.mark.parametrize("domain", ["code", "prose"])
def test_selective_loading_equals_full_loading_token_for_token(run, domain):
    from tinymoe.planner import plan
    from tinymoe.config import load_preset

    full = _sample(run, "--domain", domain)
    part = _sample(run, "--domain", domain, "--load-domain-experts-only")
    assert part["text"] == full["text"] and part["tokens"] == full["tokens"] == 40
    info = part["domain"]
    assert info["experts"] == ({"code": [0, 1], "prose": [2, 3]}[domain])
    assert info["expert_bytes_read"] * 2 == info["expert_bytes_total"]  # 2 of 4 experts per layer
    cfg = load_preset("debug")[0]
    cfg.vocab_size = 256
    assert info["weight_bytes"] == info["planned_weight_bytes"] == plan(cfg, mode="sample",
                                                                        resident_experts=2)["bytes"]["weights"]
    assert info["secretary_bytes"] == (32 + 1) * 2 * 4  # (D + bias) x 2 classes, float32


def test_hard_routing_with_domain_changes_the_output_of_a_free_model(run):
    """The check above compares like with like; this one shows --domain matters at all."""
    texts = {d: _sample(run, "--domain", d)["text"] for d in ("code", "prose")}
    assert texts["code"] != texts["prose"]


def test_domain_auto_picks_with_the_secretary_and_loads_that_domain(run):
    out = _sample(run, "--domain", "auto", "--load-domain-experts-only")
    assert out["domain"]["by"] == "secretary" and out["domain"]["domain"] in ("code", "prose")
    assert 0.5 <= out["domain"]["probability"] <= 1.0
    same = _sample(run, "--domain", out["domain"]["domain"])
    assert same["text"] == out["text"]


def test_sampling_refusals(run, tmp_path):
    one_error_line(_invoke("sample", run, "--domain", "legal"), "--domain legal", "code, prose")
    one_error_line(_invoke("sample", run, "--load-domain-experts-only"), "needs --domain")
    one_error_line(_invoke("sample", run, "--domain", "code", "--resident-experts", 2), "--resident-experts")
    (tmp_path / "t.txt").write_text("plain text for a run without domains. " * 60)
    plain = tmp_path / "plain"
    assert _invoke("train", "--preset", "debug", "--data", tmp_path / "t.txt", "--steps", 2, "--out", plain,
                   "--quiet").exit_code == 0
    one_error_line(_invoke("sample", plain, "--domain", "code"), "no domain experts")
    one_error_line(_invoke("sample", plain, "--domain", "code", "--load-domain-experts-only"), "no domain experts")
    one_error_line(_invoke("probe", plain), "probes need text of two or more")


def test_probe_reports_every_layer_above_chance(run):
    result = _invoke("probe", run, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert [h["layer"] for h in out["hidden"]] == [0, 1] and [r["layer"] for r in out["routing"]] == [0, 1]
    assert out["mapping"] == {"code": [0, 1], "prose": [2, 3]}
    assert out["chance"] < 0.8 and all(h["accuracy"] > out["chance"] + 0.15 for h in out["hidden"])
    assert 0.0 <= out["secretary_accuracy"] <= 1.0


def test_ridge_probe_against_known_answers():
    from tinymoe.analysis.probe import probe_accuracy

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    fit = np.arange(600) % 2 == 0
    separable = rng.standard_normal((600, 5)) * 0.1 + np.eye(3, 5)[labels] * 3
    assert probe_accuracy(separable, labels, fit, 3) == 1.0
    noise = rng.standard_normal((600, 5))  # nothing to find: about one in three
    assert abs(probe_accuracy(noise, labels, fit, 3) - 1 / 3) < 0.1


def test_inspect_shows_the_target_mapping_and_its_share(run):
    result = _invoke("inspect", run, "--json", "--max-batches", 2)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["domain_experts"]["experts"] == {"code": [0, 1], "prose": [2, 3]}
    for layer in out["layers"]:
        rows = dict(zip(out["domains"], layer["domain_expert"]))
        assert layer["target_share"]["code"] == pytest.approx(rows["code"][0] + rows["code"][1], abs=1e-4)
        assert layer["target_share"]["prose"] == pytest.approx(rows["prose"][2] + rows["prose"][3], abs=1e-4)
    text = _invoke("inspect", run, "--max-batches", 2).output
    assert "domain map   code=0-1, prose=2-3 (hard)" in text and "on target" in text


def test_eval_per_domain_routes_within_each_domain(run):
    free = json.loads(_invoke("eval", run, "--per-domain", "--json", "--max-batches", 2).output)
    routed = json.loads(_invoke("eval", run, "--per-domain", "--route-by-domain", "--json", "--max-batches", 2).output)
    assert set(free) == set(routed) == {"code", "prose"}
    assert routed["code"]["routed_within"] == [0, 1] and free["code"]["routed_within"] is None
    assert routed["code"]["tokens"] == free["code"]["tokens"] > 0


# cpu: bitwise equality between two runs (see tests/test_reliability_resume.py).
@pytest.mark.cpu
def test_resume_with_domain_experts_and_secretary_is_exact(tmp_path, corpus):
    straight, resumed = straight_and_resumed(tmp_path, corpus, 6, domain_experts="code=0-1,prose=2-3",
                                             domain_weight=0.1, secretary=True)
    assert losses(resumed) == losses(straight) and len(losses(straight)) == 6
    rows = lambda run: [(r["domain_loss"], r["secretary_loss"]) for r in map(json.loads,  # noqa: E731
                        (run / "metrics.jsonl").read_text().splitlines()) if "domain_loss" in r]
    assert rows(resumed) == rows(straight) and len(rows(straight)) == 6
    final = assert_same_final_state(straight, resumed)
    assert "secretary.proj.weight" in final["weights"]


def test_secretary_routed_eval_equals_routing_each_window_by_the_secretarys_pick(run):
    """Per-token hard masks from the picks (one batched pass) against each window on its own with
    `predict_domain` and a fixed domain (what sample --domain auto does)."""
    import math

    import mlx.core as mx
    import mlx.nn as nn

    from tinymoe.data.batches import eval_batches
    from tinymoe.data.prepare import held_out_tokens
    from tinymoe.io.loader import load_model
    from tinymoe.nn.domain import predict_domain, set_domain
    from tinymoe.train.domains import secretary_routed_eval

    model, manifest, tokenizer, _ = load_model(next((run / "checkpoints").iterdir()), "dense")
    model.train(False)
    held = held_out_tokens(manifest, tokenizer, ())
    code = np.asarray(held.tokens)[np.asarray(held.domain_ids) == held.domain_names.index("code")]
    got = secretary_routed_eval(model, code, tokenizer.token_byte_lengths(), 4, 32, max_batches=2)
    nats, picks = 0.0, {"code": 0, "prose": 0}
    for inputs, targets in eval_batches(code, 4, 32, 2):
        for row in range(inputs.shape[0]):
            name, _ = predict_domain(model, inputs[row].tolist())
            picks[name] += 1
            set_domain(model, name)
            logits, _ = model(mx.array(inputs[row:row + 1]))
            set_domain(model, None)
            nats += nn.losses.cross_entropy(logits, mx.array(targets[row:row + 1]), reduction="sum").item()
    assert got["secretary_picks"] == picks and got["tokens"] == 8 * 32
    assert got["loss"] == pytest.approx(nats / got["tokens"], rel=1e-5)
    assert math.isfinite(got["bits_per_byte"])
