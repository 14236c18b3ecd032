"""Routing through the CLI: inspect's new statistics, `route`, `sample --show-routing`, colour."""

import io
import json

import pytest
from click.testing import CliRunner

from tinymoe.cli.main import cli
from tinymoe.analysis.routing_view import SUBSCRIPT, paint, use_color

ESC = "\x1b["


def run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("route") / "run"
    r = run("train", "--preset", "debug", "--steps", 4, "--eval-every", 0, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    return out


def test_inspect_json_reports_domains_and_new_keys(ckpt):
    r = run("inspect", ckpt, "--json", "--max-batches", 4)
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["domains"] == ["code", "prose"]  # spread windows reach both halves of the split
    assert all(n > 0 for n in info["domain_tokens"])
    for layer in info["layers"]:
        assert {"layer", "experts", "top_k", "load", "entropy", "load_cv", "dead_experts", "drop_rate",
                "domain_expert", "expert_domain", "specialization", "coactivation", "top_pairs"} <= set(layer)
        assert len(layer["domain_expert"]) == 2
        for row in layer["domain_expert"]:
            assert sum(row) == pytest.approx(1.0, abs=1e-4)
        assert 0.0 <= layer["specialization"] <= 1.0 and layer["drop_rate"] == 0.0
        c = layer["coactivation"]
        assert len(c) == 4 and sum(c[e][e] for e in range(4)) == pytest.approx(2.0, abs=1e-4)  # K per token
    text = run("inspect", ckpt, "--max-batches", 2)
    assert text.exit_code == 0 and "specialization" in text.output and "prose" in text.output


def test_inspect_uses_domain_tags_of_given_data(ckpt, tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma " * 40)
    (tmp_path / "b.txt").write_text("def f(x):\n    return x\n" * 30)
    r = run("inspect", ckpt, "--json", "--data", f"words={tmp_path / 'a.txt'}", "--data", f"py={tmp_path / 'b.txt'}")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["domains"] == ["py", "words"]


def test_inspect_plot_writes_pngs(ckpt, tmp_path):
    pytest.importorskip("matplotlib")
    r = run("inspect", ckpt, "--json", "--max-batches", 2, "--plot", tmp_path / "pics")
    assert r.exit_code == 0, r.output
    json.loads(r.stdout)  # the "wrote" lines go to stderr, so stdout stays JSON
    for name in ("load.png", "domain_expert.png"):
        data = (tmp_path / "pics" / name).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 2000


def test_route_json_and_table(ckpt):
    text = "To be, or not"
    r = run("route", ckpt, "--text", text, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["layers"] == [0, 1] and "".join(t["text"] for t in out["tokens"]) == text
    assert set(out["tokens"][0]) == {"id", "text", "experts", "gates"}
    for tok in out["tokens"]:
        for experts, gates in zip(tok["experts"], tok["gates"]):
            assert len(set(experts)) == 2 and sum(gates) == pytest.approx(1.0, abs=1e-3)
            assert gates[0] >= gates[1]  # first choice first
    table = run("route", ckpt, "--text", text)
    assert table.exit_code == 0 and ESC not in table.output  # not a terminal: no colour
    lines = table.output.splitlines()
    assert lines[0].split() == ["#", "token", "L0", "L1"] and len(lines) == 1 + len(text)
    first = out["tokens"][0]["experts"]
    assert lines[1].split()[2:] == [",".join(map(str, first[0])), ",".join(map(str, first[1]))]
    assert ESC in run("route", ckpt, "--text", text, "--color").output
    assert ESC not in run("route", ckpt, "--text", text, "--color", "--no-color").output


def test_sample_show_routing_json_matches_route(ckpt):
    r = run("sample", ckpt, "--prompt", "The ", "--max-tokens", 10, "--temperature", 0, "--show-routing", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    toks = out["routing"]["tokens"]
    assert out["routing"]["layers"] == [0, 1] and len(toks) == 4 + 10
    assert [t["prompt"] for t in toks] == [True] * 4 + [False] * 10
    assert "".join(t["text"] for t in toks) == "The " + out["text"]
    # Routing recorded during cached generation equals routing the whole text at once.
    again = json.loads(run("route", ckpt, "--text", "The " + out["text"], "--json").output)["tokens"]
    assert [t["id"] for t in again] == [t["id"] for t in toks]
    for a, b in zip(toks, again):
        for ga, gb, ea, eb in zip(a["gates"], b["gates"], a["experts"], b["experts"]):
            assert ga == pytest.approx(gb, abs=2e-3)
            if abs(ga[0] - ga[1]) > 2e-3:  # a near-tie may flip order with rounding
                assert ea == eb


def test_sample_show_routing_past_the_context(ckpt):
    # debug context is 32: 40 new tokens force a sliding-window re-prefill mid-generation.
    r = run("sample", ckpt, "--prompt", "ab", "--max-tokens", 40, "--seed", 3, "--show-routing", "--json")
    assert r.exit_code == 0, r.output
    toks = json.loads(r.output)["routing"]["tokens"]
    assert len(toks) == 42 and all(t["experts"] is not None and len(t["experts"]) == 2 for t in toks)


def test_sample_show_routing_text_colour_and_layer(ckpt):
    plain = run("sample", ckpt, "--prompt", "To be", "--max-tokens", 8, "--seed", 1, "--show-routing")
    assert plain.exit_code == 0, plain.output
    assert ESC not in plain.output and any(ch in plain.output for ch in "₀₁₂₃")
    assert "layer 1, first-choice expert:" in plain.output  # default: the last MoE layer
    coloured = run("sample", ckpt, "--prompt", "To be", "--max-tokens", 8, "--seed", 1, "--show-routing",
                   "--color", "--layer", 0)
    assert coloured.exit_code == 0 and ESC in coloured.output and "layer 0," in coloured.output
    bad = run("sample", ckpt, "--show-routing", "--layer", 7)
    assert bad.exit_code == 2 and "--layer 7: not an MoE layer (MoE layers: 0, 1)" in bad.output


def test_colour_decision(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color(None, Tty()) is True and use_color(None, io.StringIO()) is False
    assert use_color(False, Tty()) is False and use_color(True, io.StringIO()) is True
    monkeypatch.setenv("NO_COLOR", "1")
    assert use_color(None, Tty()) is False
    # Newlines stay outside the colour so backgrounds never run on to the line end.
    assert paint("a\nb", 0) == "\x1b[30;48;5;117ma\x1b[0m\n\x1b[30;48;5;117mb\x1b[0m"
    assert "12".translate(SUBSCRIPT) == "₁₂"


def test_route_bad_input(ckpt, tmp_path):
    r = run("route", ckpt)
    assert r.exit_code == 2 and r.output.startswith("error: give the text")
    r = run("route", ckpt, "--text", "")
    assert r.exit_code == 2 and "no tokens" in r.output
    r = run("route", tmp_path / "missing", "--text", "x")
    assert r.exit_code == 2 and r.output.startswith("error:")
