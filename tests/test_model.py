"""The transformer: causality, KV-cache decoding, parameter counts, layer placement."""

import mlx.core as mx
import numpy as np
import pytest

from tinymoe.config import ModelConfig
from tinymoe.nn.model import Model, count_params


def make_model(cfg, dispatch="dense", seed=0):
    mx.random.seed(seed)
    model = Model(cfg, dispatch)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("experts", [1, 4])
def test_changing_a_future_token_never_changes_earlier_logits(debug_cfg, experts):
    debug_cfg.moe_experts = experts
    model = make_model(debug_cfg)
    tokens = mx.random.randint(0, 256, (2, 16))
    logits, _ = model(tokens)
    for t in (5, 15):
        changed = tokens.tolist()
        changed[0][t] = (changed[0][t] + 7) % 256
        logits2, _ = model(mx.array(changed))
        assert np.array_equal(np.array(logits[:, :t]), np.array(logits2[:, :t]))
        assert not np.allclose(np.array(logits[0, t]), np.array(logits2[0, t]))


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_kv_cache_decode_equals_full_forward(debug_cfg, n_kv_heads):
    debug_cfg.n_kv_heads = n_kv_heads
    model = make_model(debug_cfg)
    tokens = mx.random.randint(0, 256, (1, 12))
    full, _ = model(tokens)
    caches = model.make_caches()
    prefill, _ = model(tokens[:, :5], caches)  # prompt, then one token at a time
    steps = [prefill]
    for t in range(5, 12):
        out, _ = model(tokens[:, t : t + 1], caches)
        steps.append(out)
    cached = mx.concatenate(steps, axis=1)
    assert np.allclose(np.array(cached), np.array(full), atol=1e-5)
    # A multi-token chunk after a non-empty cache uses the offset mask.
    caches = model.make_caches()
    a, _ = model(tokens[:, :4], caches)
    b, _ = model(tokens[:, 4:12], caches)
    assert np.allclose(np.array(mx.concatenate([a, b], axis=1)), np.array(full), atol=1e-5)


def test_parameter_counts_by_hand():
    cfg = ModelConfig(vocab_size=10, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, context=16, d_ff=12,
                      moe_experts=4, moe_topk=2, expert_hidden=6, moe_every=2)
    model = make_model(cfg)
    dh = 4
    attn = 8 * 8 + 2 * (8 * dh) + 8 * 8  # wq, wk + wv (one kv head), wo
    norms = 2 * 8
    dense_ffn = 3 * 8 * 12
    expert = 3 * 8 * 6
    moe = 4 * expert + 4 * 8  # experts + router
    total = 10 * 8 + (attn + norms + dense_ffn) + (attn + norms + moe) + 8  # tied embeddings, final norm
    counts = count_params(model)
    assert model.moe_layers() == [1]
    assert counts["total"] == total
    assert counts["active"] == total - 2 * expert


def test_layer_placement_options():
    cfg = ModelConfig(n_layers=6, moe_experts=4, moe_topk=1)
    assert [cfg.layer_is_moe(i) for i in range(6)] == [True] * 6
    cfg.moe_every = 2
    assert [i for i in range(6) if cfg.layer_is_moe(i)] == [1, 3, 5]
    cfg.moe_every, cfg.moe_first_dense = 1, 2
    assert [i for i in range(6) if cfg.layer_is_moe(i)] == [2, 3, 4, 5]
    cfg.moe_experts = 1
    assert not any(cfg.layer_is_moe(i) for i in range(6))
