"""Upcycling a dense model into an MoE (exact start, Drop-Upcycling), and hub sources.

The dense models are random tinymoe checkpoints and a Llama directory in Hugging Face layout
written by the builders in test_interop; the upcycled model's logits are compared with the
dense model's, computed separately.
"""

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from test_interop import TOL, build_hf_dir, diff, logits_of, random_checkpoint, tokens_for  # noqa: E402
from tinymoe.errors import TinyMoeError  # noqa: E402


def _dense(tmp_path, **over):
    return random_checkpoint(tmp_path / "dense", moe_experts=1, moe_topk=1, **{"n_layers": 4, **over})


def test_upcycle_reproduces_the_dense_model(tmp_path):
    from tinymoe.interop.upcycle import upcycle

    cfg, weights = _dense(tmp_path)
    report = upcycle(str(tmp_path / "dense"), tmp_path / "moe", experts=4, topk=2, every=2)
    check = report["identity_check"]
    print(f"upcycle identity: max |logit diff| = {check['max_abs_logit_diff']:.3g}")
    assert check["within_float32_noise"] and check["max_abs_logit_diff"] < 1e-4
    assert report["moe_layers"] == [1, 3]
    # Independently of the command's own check: reload the written checkpoint and compare.
    from tinymoe.io.loader import load_model

    model, _, _, _ = load_model(tmp_path / "moe")
    assert model.cfg.moe_experts == 4 and model.moe_layers() == [1, 3]
    tokens = tokens_for(cfg.vocab_size)
    from tinymoe.interop.export import tinymoe_logits

    assert diff(tinymoe_logits(model, tokens), logits_of(cfg, weights, tokens)) < 1e-4
    dense_ffn = weights["blocks.1.ffn.w_up.weight"]
    experts = model.blocks[1].moe.experts.w_up
    assert all(mx.array_equal(experts[e], dense_ffn).item() for e in range(4))


@pytest.mark.parametrize("shared", [1, 3])
def test_upcycle_with_shared_experts_still_starts_dense(tmp_path, shared):
    from tinymoe.interop.upcycle import upcycle
    from tinymoe.io.loader import load_model

    cfg, weights = _dense(tmp_path)
    report = upcycle(str(tmp_path / "dense"), tmp_path / "moe", experts=4, topk=2, shared_experts=shared,
                     first_dense=1)
    assert report["identity_check"]["max_abs_logit_diff"] < 1e-4 and report["moe_layers"] == [1, 2, 3]
    model, _, _, _ = load_model(tmp_path / "moe")
    assert model.cfg.shared_experts == shared
    assert model.blocks[1].moe.shared.w_up.weight.shape == (shared * cfg.d_ff, cfg.d_model)
    from tinymoe.interop.export import tinymoe_logits

    tokens = tokens_for(cfg.vocab_size)
    assert diff(tinymoe_logits(model, tokens), logits_of(cfg, weights, tokens)) < 1e-4


def test_drop_upcycling_reinitialises_a_fraction_per_expert(tmp_path):
    from tinymoe.interop.upcycle import moe_config, upcycle_weights

    cfg, weights = _dense(tmp_path)
    moe_cfg = moe_config(cfg, 4, 2)
    a = upcycle_weights(weights, moe_cfg, drop_fraction=0.25, seed=7)
    b = upcycle_weights(weights, moe_cfg, drop_fraction=0.25, seed=7)
    H = cfg.d_ff
    for layer in range(cfg.n_layers):
        dense = {p: np.array(weights[f"blocks.{layer}.ffn.{p}.weight"]) for p in ("w_gate", "w_up", "w_down")}
        kept = []
        for e in range(4):
            g = np.array(a[f"blocks.{layer}.moe.experts.w_gate"][e])  # (H, D)
            u = np.array(a[f"blocks.{layer}.moe.experts.w_up"][e])
            dn = np.array(a[f"blocks.{layer}.moe.experts.w_down"][e])  # (D, H)
            changed = ~np.all(g == dense["w_gate"], axis=1)
            assert changed.sum() == round(0.25 * H)
            # The same units are redrawn in all three projections; the rest are exact copies.
            assert np.array_equal(changed, ~np.all(u == dense["w_up"], axis=1))
            assert np.array_equal(changed, ~np.all(dn == dense["w_down"], axis=0))
            kept.append(tuple(np.flatnonzero(changed)))
        assert len(set(kept)) > 1  # experts draw their own units
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)  # seeded


def test_upcycle_refusals(tmp_path):
    from tinymoe.interop.upcycle import upcycle

    random_checkpoint(tmp_path / "moe")
    with pytest.raises(TinyMoeError, match="already an MoE"):
        upcycle(str(tmp_path / "moe"), tmp_path / "out", experts=4, topk=2)
    _dense(tmp_path)
    with pytest.raises(TinyMoeError, match="drop-fraction"):
        upcycle(str(tmp_path / "dense"), tmp_path / "out", experts=4, topk=2, drop_fraction=1.5)
    with pytest.raises(TinyMoeError, match="output directory holds the source"):
        upcycle(str(tmp_path / "dense"), tmp_path / "dense", experts=4, topk=2, overwrite=True)
    with pytest.raises(TinyMoeError, match="no layer becomes MoE"):
        upcycle(str(tmp_path / "dense"), tmp_path / "out", experts=4, topk=2, every=8)


def test_upcycle_hf_llama_then_export_to_mlx_lm(tmp_path):
    """Dense Llama (HF) -> tinymoe MoE with its HF tokenizer -> Mixtral directory -> mlx-lm."""
    pytest.importorskip("mlx_lm")
    from tinymoe.interop.export import export_hf
    from tinymoe.interop.upcycle import upcycle
    from tinymoe.io.loader import load_model

    src = build_hf_dir(tmp_path / "llama", "llama")
    report = upcycle(str(src), tmp_path / "moe", experts=4, topk=2, context=64)
    assert report["identity_check"]["max_abs_logit_diff"] < 1e-4 and report["tokenizer"] == "hf"
    model, manifest, tokenizer, _ = load_model(tmp_path / "moe")
    assert model.cfg.context == 64 and tokenizer.kind == "hf" and tokenizer.vocab_size == 300
    text = "hello lazy experts"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert int(tokenizer.token_byte_lengths()[tokenizer.encode(text)].sum()) == len(text.encode())
    out = export_hf(str(tmp_path / "moe"), tmp_path / "hf")
    assert out["architecture"] == "mixtral" and out["mlx_lm_max_abs_logit_diff"] < TOL
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["eos_token"] == "<eos>"


def test_hub_source_offline_is_one_clear_line(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from tinymoe.interop.hub import resolve_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(TinyMoeError, match="no such local directory, and no Hugging Face hub repository"):
        resolve_source("tinymoe-tests/no-such-model")
    with pytest.raises(TinyMoeError, match="no such directory"):
        resolve_source(str(tmp_path / "missing" / "dir"))


