"""Decoding: the overlapped generate loop gives the tokens of the plain step-by-step loop (greedy
and seeded), `auto` picks a decode backend per call shape, offloaded sampling of a quantized
model equals full sampling, and quantized checkpoints round-trip through export/import in
mlx-lm's quantized layout."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from debug_run import ok
from tinymoe.cli.main import cli
from tinymoe.config import apply_overrides, load_preset
from tinymoe.infer.sample import generate, pick_token
from tinymoe.nn.model import Model


def model_of(seed=0, **over):
    cfg, _ = load_preset("debug")  # context 32: 60 new tokens slide the window twice
    cfg = apply_overrides(cfg, {"d_model": 64, "d_ff": 128, **over})
    mx.random.seed(seed)
    model = Model(cfg, "grouped")
    mx.eval(model.parameters())
    model.train(False)
    return model


def stepwise(model, prompt, n, temperature=0.0, seed=None):
    """The loop generate used to be: a synchronous forward per token with the layers' training
    backend for every call shape (`grouped`), each cache rebuilt by the same window rule."""
    if seed is not None:
        mx.random.seed(seed)
    context = model.cfg.context
    tokens, start, out = list(prompt)[-context:], 0, []
    caches = model.make_caches()
    logits, _ = model(mx.array([tokens]), caches)
    for _ in range(n):
        token = pick_token(logits[0, -1], temperature, 0, 1.0).item()
        out.append(token)
        tokens.append(token)
        if len(tokens) - start > context:
            start = len(tokens) - context // 2
            caches = model.make_caches()
            logits, _ = model(mx.array([tokens[start:]]), caches)
        else:
            logits, _ = model(mx.array([[token]]), caches)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_tokens_are_those_of_the_stepwise_loop(seed):
    model = model_of(seed)
    prompt = np.random.default_rng(seed).integers(0, 256, 12).tolist()
    model.set_dispatch("grouped")
    want = stepwise(model, prompt, 60)
    model.set_dispatch("auto")
    assert model.decode_dispatch == "gather" and model.blocks[0].moe.decode_dispatch == "gather"
    assert list(generate(model, prompt, 60, temperature=0)) == want


def test_seeded_samples_are_those_of_the_stepwise_loop():
    model = model_of(3)
    model.set_dispatch("grouped")
    want = stepwise(model, [5, 6, 7], 50, temperature=0.9, seed=11)
    model.set_dispatch("auto")
    assert list(generate(model, [5, 6, 7], 50, temperature=0.9, seed=11)) == want


def test_explicit_dispatch_is_kept_for_decoding():
    model = model_of()
    for name in ("dense", "gather", "grouped", "metal"):
        model.set_dispatch(name)
        assert model.decode_dispatch == name


def test_timing_counts_prefill_and_decode_tokens():
    model = model_of()
    timing = {}
    out = list(generate(model, list(range(10)), 7, temperature=0, timing=timing))
    assert len(out) == 7 and timing["prompt_tokens"] == 10 and timing["decode_tokens"] == 6
    assert timing["prefill_s"] > 0 and timing["decode_s"] > 0


def test_routing_records_one_forward_per_generated_token():
    model = model_of()
    records = []
    list(generate(model, [1, 2, 3], 5, temperature=0, routing=records))
    assert len(records) == len(model.moe_layers()) * (1 + 5)  # prefill + one per token, the last included


@pytest.fixture(scope="module")
def q_run(tmp_path_factory):
    """A float checkpoint and its 4-bit twin."""
    from tinymoe.interop.import_hf import write_checkpoint
    from tinymoe.tokenizers.builtin import ByteTokenizer

    model = model_of(5, moe_experts=4, d_model=64)
    root = tmp_path_factory.mktemp("decode")
    write_checkpoint(root / "float", model.cfg, dict(tree_flatten(model.parameters())), ByteTokenizer(), {"kind": "t"})
    ok("quantize", root / "float", "--bits", 4, "--group-size", 32, "--out", root / "q4")
    return root


@pytest.mark.parametrize("resident", [1, 3])
def test_offloaded_sampling_of_a_quantized_model_equals_full_sampling(q_run, resident):
    from tinymoe.infer.offload import load_model_offloaded
    from tinymoe.io.loader import load_model

    full, *_ = load_model(q_run / "q4")
    offloaded, _, _, _, caches = load_model_offloaded(q_run / "q4", resident)
    prompt = list(b"def quantized(x):")
    assert list(generate(offloaded, prompt, 40, temperature=0)) == list(generate(full, prompt, 40, temperature=0))
    assert list(generate(offloaded, prompt, 30, temperature=0.8, seed=4)) == \
        list(generate(full, prompt, 30, temperature=0.8, seed=4))
    assert max(len(c.resident) for c in caches.values()) <= resident


def test_sample_reports_prefill_and_decode_speed(q_run):
    out = json.loads(ok("sample", q_run / "q4", "--prompt", "abc", "--max-tokens", 5, "--temperature", 0,
                        "--json").output)
    assert out["prompt_tokens"] == 3 and out["decode_tokens_per_s"] > 0 and out["prefill_tokens_per_s"] > 0


def test_quantized_checkpoint_round_trips_through_export_and_import(q_run, tmp_path):
    from tinymoe.io.loader import load_model

    pytest.importorskip("mlx_lm")
    report = json.loads(ok("export", q_run / "q4", "--arch", "mixtral", "--out", tmp_path / "hf", "--json").output)
    assert report["mlx_lm_max_abs_logit_diff"] < 1e-3  # mlx-lm loads the quantized layout
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    ok("import", tmp_path / "hf", "--out", tmp_path / "back")
    a, ma, *_ = load_model(q_run / "q4")
    b, mb, *_ = load_model(tmp_path / "back")
    assert mb["quantization"]["modules"] == ma["quantization"]["modules"]
    wa, wb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and mx.array_equal(wa[name], wb[name]).item(), name


def test_export_refuses_an_architecture_whose_mlx_lm_loader_drops_quantized_experts(q_run, tmp_path):
    result = CliRunner().invoke(cli, ["export", str(q_run / "q4"), "--arch", "ernie4_5_moe", "--out",
                                      str(tmp_path / "hf")])
    assert result.exit_code == 2 and "cannot be exported as ernie4_5_moe" in result.output
    assert not (tmp_path / "hf").exists()


def test_quantized_qwen2_moe_shared_experts_round_trip_exactly(tmp_path):
    """Qwen2-MoE doubles the shared expert's down projection on export and halves it on import:
    on a quantized weight that is its scales and biases, exactly."""
    from tinymoe.interop.import_hf import write_checkpoint
    from tinymoe.io.loader import load_model
    from tinymoe.tokenizers.builtin import ByteTokenizer

    pytest.importorskip("mlx_lm")
    model = model_of(6, shared_experts=1, router_norm=False)
    write_checkpoint(tmp_path / "f", model.cfg, dict(tree_flatten(model.parameters())), ByteTokenizer(), {"kind": "t"})
    ok("quantize", tmp_path / "f", "--bits", 8, "--group-size", 32, "--out", tmp_path / "q")
    report = json.loads(ok("export", tmp_path / "q", "--out", tmp_path / "hf", "--json").output)
    assert report["architecture"] == "qwen2_moe" and report["mlx_lm_max_abs_logit_diff"] < 1e-3
    ok("import", tmp_path / "hf", "--out", tmp_path / "back")
    wa = dict(tree_flatten(load_model(tmp_path / "q")[0].parameters()))
    wb = dict(tree_flatten(load_model(tmp_path / "back")[0].parameters()))
    assert wa.keys() == wb.keys() and all(mx.array_equal(wa[k], wb[k]).item() for k in wa)
