"""Lean routing (what sampling runs) chooses the same experts with the same gates as the full
routing of eval mode, for every router in the registry and the settings that change its
computation; MoE layers and models asked for no statistics give the same outputs; generate runs
the model in eval mode and hands it back in the caller's mode."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from tinymoe.config import apply_overrides, load_preset
from tinymoe.infer.sample import generate
from tinymoe.nn.model import Model
from tinymoe.nn.moe import MoELayer
from tinymoe.nn.routers import make_router
from tinymoe.router_registry import ROUTERS, spec_of

D, E, T = 16, 8, 12


def variants(name):
    """(top_k, norm, options) worth comparing for router `name`."""
    options = spec_of(name).options
    ks = [1] if name == "switch" else [1, 2, 3]
    orders = ["softmax-topk", "topk-softmax"] if "router_order" in options else [None]
    groups = [1, 2] if "router_groups" in options else [1]
    for k, norm, order, g in itertools.product(ks, [True, False], orders, groups):
        opt = {"router_groups": g, "router_group_topk": 1, "k_max": k + 1 if name == "dynamic" else 0}
        if order:
            opt["router_order"] = order
        yield k, norm, opt


def dense_gates(route, shape):
    """(T, E) gate of each expert per token (0 where not chosen or slot unused)."""
    idx, gates = np.array(route.indices), np.array(route.gates)
    if route.selected is not None:
        gates = np.where(np.array(route.selected), gates, 0.0)
    out = np.zeros(shape, np.float64)
    np.add.at(out, (np.arange(shape[0])[:, None], idx), gates)
    return out


def make(name, k, norm, opt, seed):
    mx.random.seed(seed)
    r = make_router(name, D, E, k, norm, **opt)
    if name == "sigmoid-bias":  # a balancing bias that changes the choice
        r.selection_bias = mx.random.normal((E,)) * 0.05
    if name == "smart":
        r.log_temperature = mx.array([0.4])
    r.train(False)
    return r


@pytest.mark.parametrize("name", ROUTERS)
def test_lean_routing_picks_the_same_experts_and_gates(name):
    for seed, (k, norm, opt) in enumerate(variants(name)):
        r = make(name, k, norm, opt, seed)
        x = mx.random.normal((T, D)) * 2
        full, lean = r(x), r(x, lean=True)
        assert lean.probs is None and lean.balance_loss is None and lean.load is None
        assert lean.indices.shape == full.indices.shape
        idx_full, idx_lean = np.array(full.indices), np.array(lean.indices)
        if k > 2 or name == "dynamic":  # best first, as the full result
            assert np.array_equal(idx_full, idx_lean), (k, norm, opt)
        else:  # two slots: any order
            assert np.array_equal(np.sort(idx_full, axis=1), np.sort(idx_lean, axis=1)), (k, norm, opt)
        np.testing.assert_allclose(dense_gates(lean, (T, E)), dense_gates(full, (T, E)), rtol=1e-6, atol=1e-7)
        if full.selected is not None:
            assert np.array_equal(np.array(lean.selected), np.array(full.selected))
        if full.tokens_EC is not None:
            assert np.array_equal(np.array(lean.tokens_EC), np.array(full.tokens_EC))
            assert np.array_equal(np.array(lean.gates_EC), np.array(full.gates_EC))


@pytest.mark.parametrize("name", ROUTERS)
def test_training_mode_ignores_lean(name):
    k, norm, opt = next(variants(name))
    r = make(name, k, norm, opt, 0)
    r.train(True)
    out = r(mx.random.normal((T, D)), mx.random.key(1), lean=True) if r.random else \
        r(mx.random.normal((T, D)), lean=True)
    assert out.probs is not None and out.balance_loss is not None


def tiny_cfg(**over):
    cfg, _ = load_preset("debug")
    return apply_overrides(cfg, {"d_model": 32, "d_ff": 64, "moe_experts": 6, "moe_topk": 2, **over})


@pytest.mark.parametrize("dispatch", ["dense", "gather", "grouped"])
@pytest.mark.parametrize("over", [{}, {"router": "dynamic", "k_max": 3}, {"router": "sigmoid-bias"},
                                  {"shared_experts": 1}, {"moe_topk": 3, "router_order": "topk-softmax"}])
def test_moe_layer_without_stats_gives_the_same_output(dispatch, over):
    mx.random.seed(3)
    layer = MoELayer.from_config(tiny_cfg(**over))
    layer.dispatch = layer.decode_dispatch = dispatch
    layer.train(False)
    for tokens in (1, 20):  # a decoded token, a prefill
        x = mx.random.normal((1, tokens, 32))
        want, stats = layer(x)
        got, none = layer(x, stats=False)
        assert stats is not None and none is None
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


def test_model_without_stats_same_logits_and_no_aux_and_full_path_where_needed():
    mx.random.seed(0)
    model = Model(tiny_cfg(), "gather")
    mx.eval(model.parameters())
    tokens = mx.array(np.random.default_rng(0).integers(0, 256, (2, 24)))
    model.train(False)
    want, aux = model(tokens)
    got, none = model(tokens, stats=False)
    assert none == {} and len(aux["load"]) == len(model.moe_layers())
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    routing = []  # a routing record needs the distribution: the full path runs
    model(tokens, routing=routing, stats=False)
    assert routing and "probs" in routing[0]
    model.train(True)  # training always gets its losses
    assert "balance_loss" in model(tokens, stats=False)[1]


def test_generate_runs_eval_mode_and_restores_the_callers_mode():
    mx.random.seed(1)
    model = Model(tiny_cfg(router="jitter"), "gather")  # training-mode jitter would change tokens
    mx.eval(model.parameters())
    model.train(False)
    want = list(generate(model, [1, 2, 3], 12, temperature=0))
    model.train(True)
    assert list(generate(model, [1, 2, 3], 12, temperature=0)) == want
    assert model.training and model.blocks[0].moe.router.training
