"""Each router on constructed logits: indices, gates and losses worked out by hand; gradients reach
the router through gates only; training noise comes from the key alone; causality as documented."""

import dataclasses
import math

import mlx.core as mx
import numpy as np
import pytest

from tinymoe.nn.capacity import apply_capacity, expert_capacity
from tinymoe.config import load_preset, validate
from tinymoe.errors import TinyMoeError
from tinymoe.nn.model import Model
from tinymoe.nn.moe import MoELayer
from tinymoe.nn.routers import make_router, router_losses
from tinymoe.infer.sample import generate


def with_logits(router, logits):
    """Make `router` produce exactly `logits` (T, E) for x = identity (T, T): weight = logits^T."""
    L = np.asarray(logits, dtype=np.float32)
    router.weight = mx.array(L.T)
    router.train(False)
    return mx.eye(L.shape[0])


def softmax(v):
    e = np.exp(np.asarray(v, dtype=np.float64) - np.max(v))
    return e / e.sum()


def sigmoid(v):
    return 1 / (1 + np.exp(-np.asarray(v, dtype=np.float64)))


LOGITS = [[2.0, 1.0, 0.0], [0.0, 0.5, 3.0]]  # T=2, E=3


@pytest.mark.parametrize("order", ["softmax-topk", "topk-softmax"])
def test_topk_both_orders_by_hand(order):
    r = make_router("topk", 2, 3, 2, router_order=order)
    info = r(with_logits(r, LOGITS))
    idx, gates = info.indices, info.gates
    assert np.array(idx).tolist() == [[0, 1], [2, 1]]
    for t, row in enumerate(LOGITS):
        p = softmax(row)
        k = np.array(idx)[t]
        assert np.allclose(np.array(gates)[t], p[k] / p[k].sum(), atol=1e-6)  # sums to 1
    # Losses by hand: f = slots per expert / (T*K) = (1/4, 2/4, 1/4); P = mean probability.
    P = (softmax(LOGITS[0]) + softmax(LOGITS[1])) / 2
    assert info.balance_loss.item() == pytest.approx(3 * np.dot([0.25, 0.5, 0.25], P), rel=1e-5)
    lse = [math.log(sum(math.exp(v) for v in row)) for row in LOGITS]
    assert info.z_loss.item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-5)
    H = [-(softmax(row) * np.log(softmax(row))).sum() for row in LOGITS]
    assert info.entropy_loss.item() == pytest.approx(math.log(3) - np.mean(H), rel=1e-5)


def test_topk_without_norm_gates_are_probabilities_and_do_not_sum_to_one():
    r = make_router("topk", 2, 3, 2, norm=False)
    gates = r(with_logits(r, LOGITS)).gates
    p = softmax(LOGITS[0])
    assert np.allclose(np.array(gates)[0], [p[0], p[1]], atol=1e-6)
    assert np.array(gates).sum(axis=1).max() < 0.999


def test_switch_is_top1_with_the_probability_as_gate():
    r = make_router("switch", 2, 3, 1)
    out = r(with_logits(r, LOGITS))
    idx, gates = out.indices, out.gates
    assert np.array(idx).tolist() == [[0], [2]]
    assert np.allclose(np.array(gates)[:, 0], [softmax(LOGITS[0])[0], softmax(LOGITS[1])[2]], atol=1e-6)


def test_noisy_adds_softplus_scaled_noise_from_the_key_only_while_training():
    r = make_router("noisy", 2, 3, 2, noise_scale=0.7)
    x = with_logits(r, LOGITS)
    clean_idx = r(x, mx.random.key(3)).indices  # eval mode: no noise at all
    assert np.array(clean_idx).tolist() == [[0, 1], [2, 1]]
    r.train(True)
    key = mx.random.key(3)
    # W_noise starts at 0, so the noise std is softplus(0) = ln 2 on every logit.
    noisy = np.array(LOGITS) + 0.7 * math.log(2) * np.array(mx.random.normal((2, 3), key=key))
    out = r(x, key)
    idx, gates = out.indices, out.gates
    for t in range(2):
        k = np.argsort(-noisy[t])[:2]
        assert np.array(idx)[t].tolist() == k.tolist()
        assert np.allclose(np.array(gates)[t], softmax(noisy[t][k]), atol=1e-5)  # softmax over the k
    again = r(x, mx.random.key(3)).gates
    assert np.array_equal(np.array(again), np.array(gates))  # same key, same noise
    assert not np.allclose(np.array(r(x, mx.random.key(4)).gates), np.array(gates))


def test_noisy_without_norm_keeps_the_full_softmax_probabilities():
    r = make_router("noisy", 2, 3, 2, norm=False)
    gates = r(with_logits(r, LOGITS)).gates  # eval mode: no noise
    p = softmax(LOGITS[0])
    assert np.allclose(np.array(gates)[0], [p[0], p[1]], atol=1e-6)


@pytest.mark.parametrize("name", ["jitter", "smart"])
def test_input_jitter_is_bounded_keyed_and_off_in_eval(name):
    r = make_router(name, 4, 3, 2, jitter_eps=0.1)
    x = mx.array([[1.0, -2.0, 0.5, 3.0]])
    r.train(False)
    clean = np.array(r.logits(x, mx.random.key(0)))
    assert np.allclose(clean, np.array(x @ r.weight.T), atol=1e-6)
    r.train(True)
    key = mx.random.key(5)
    u = np.array(mx.random.uniform(0.9, 1.1, (1, 4), key=key))
    assert np.allclose(np.array(r.logits(x, key)), (np.array(x) * u) @ np.array(r.weight).T, atol=1e-5)


def test_smart_temperature_scales_the_logits_and_is_learned():
    r = make_router("smart", 2, 3, 2)
    x = with_logits(r, LOGITS)
    r.log_temperature = mx.array([math.log(2.0)])
    probs = r(x).probs
    assert np.allclose(np.array(probs)[0], softmax(np.array(LOGITS[0]) / 2), atol=1e-6)

    def loss(log_t):
        r.log_temperature = log_t
        out = r(x)
        return mx.sum(out.gates[:, 0]) + out.entropy_loss

    assert abs(mx.grad(loss)(mx.array([0.3])).item()) > 1e-4


def test_sigmoid_bias_steers_selection_but_not_gates_and_updates_from_load():
    r = make_router("sigmoid-bias", 2, 3, 2, bias_rate=0.25)
    x = with_logits(r, [[0.0, 1.0, 2.0]])
    r.selection_bias = mx.array([5.0, 0.0, 0.0])
    out = r(x)
    idx, gates, probs = out.indices, out.gates, out.probs
    assert np.array(idx).tolist() == [[0, 2]]  # the bias lifts expert 0 over expert 1
    s = sigmoid([0.0, 1.0, 2.0])
    assert np.allclose(np.array(gates)[0], [s[0], s[2]] / (s[0] + s[2]), atol=1e-6)  # unbiased scores
    assert np.allclose(np.array(probs)[0], s / s.sum(), atol=1e-6)
    r.after_step(mx.array([0.5, 0.5, 0.0]))  # mean 1/3: experts 0, 1 over, 2 under
    assert np.allclose(np.array(r.selection_bias), [4.75, -0.25, 0.25])
    assert "selection_bias" not in dict(__import__("mlx.utils").utils.tree_flatten(r.trainable_parameters()))
    assert "selection_bias" in dict(__import__("mlx.utils").utils.tree_flatten(r.parameters()))


def test_node_limited_groups_pick_the_best_group_first():
    # Groups {0,1} and {2,3}; group score = sum of its two best sigmoid scores: 1.22 vs 1.00, so the
    # token stays in group 0 although expert 2 has the single best score.
    r = make_router("sigmoid-bias", 2, 4, 2, router_groups=2, router_group_topk=1)
    idx = r(with_logits(r, [[0.5, 0.4, 2.2, -2.2]])).indices
    assert np.array(idx).tolist() == [[0, 1]]
    r2 = make_router("topk", 2, 4, 2, router_groups=2, router_group_topk=2)
    assert np.array(r2(with_logits(r2, [[0.5, 0.4, 2.2, -2.2]])).indices).tolist() == [[2, 0]]


def test_dynamic_uses_the_fewest_experts_reaching_the_threshold():
    probs = np.array([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25], [0.34, 0.33, 0.33]])
    r = make_router("dynamic", 3, 3, 3, k_min=1, k_max=3, dynamic_threshold=0.7)
    info = r(with_logits(r, np.log(probs)))
    gates = info.gates
    sel = np.array(info.selected)
    # 0.6 < 0.7 -> 2 experts; 0.4, 0.75 -> 2; 0.34, 0.67, 1.0 -> 3.
    assert sel.tolist() == [[True, True, False], [True, True, False], [True, True, True]]
    assert np.allclose(np.array(gates)[0], [0.6 / 0.9, 0.3 / 0.9, 0.0], atol=1e-5)
    assert np.allclose(np.array(gates).sum(axis=1), 1.0, atol=1e-5)
    # Load over the 7 selected slots: expert 0 three, expert 1 three, expert 2 one.
    assert np.allclose(np.array(info.load), [3 / 7, 3 / 7, 1 / 7], atol=1e-6)
    layer = MoELayer(3, 3, 3, 2, router="dynamic", k_min=2, k_max=3, dynamic_threshold=0.1)
    layer.train(False)
    _, stats = layer(mx.array(np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)))
    assert stats["mean_k"].item() == pytest.approx(2.0)  # k_min wins over a low threshold


def test_expert_choice_each_expert_takes_its_top_tokens():
    # T=4, E=2, K=1: capacity C = 4 * 1 / 2 = 2 tokens per expert.
    logits = [[2.0, 0.0], [1.0, 0.0], [0.0, 0.5], [0.0, 3.0]]
    layer = MoELayer(4, 2, 1, 3, router="expert-choice")
    layer.train(False)
    x = with_logits(layer.router, logits)
    info = layer.router(x)
    idx, gates = info.indices, info.gates
    p = np.array([softmax(row) for row in logits])
    # Expert 0's best tokens: 0 (0.88), 1 (0.73); expert 1's: 3 (0.95), 2 (0.62).
    assert np.array(info.tokens_EC).tolist() == [[0, 1], [3, 2]]
    assert np.array(info.selected).tolist() == [[True, False], [True, False], [False, True], [False, True]]
    assert np.allclose(np.array(gates), p * np.array(info.selected), atol=1e-6)
    assert info.balance_loss.item() == pytest.approx(1.0, abs=1e-6)  # balanced by construction
    # The expert pass equals the dense reference with these (T, E) gates.
    from tinymoe.nn.dispatch import dense

    e = layer.experts
    y, stats = layer(x)
    want = dense(x, idx, gates, e.w_gate, e.w_up, e.w_down)
    assert np.allclose(np.array(y), np.array(want), atol=1e-5)
    assert stats["mean_k"].item() == 1.0 and stats["drop_rate"].item() == 0.0


def test_capacity_drops_late_slots_first_choices_first():
    idx = mx.array([[0, 1], [0, 2], [0, 1], [1, 0]])
    assert expert_capacity(0.75, 4, 2, 3) == 2 and expert_capacity(0.0, 4, 2, 3) == 0
    kept = np.array(apply_capacity(idx, None, 3, 2))
    # Queue of expert 0: first choices of t0, t1, t2, then t3's second choice -> t2 and t3 drop.
    assert kept.tolist() == [[True, True], [True, True], [False, False], [True, False]]


def test_dropped_token_passes_through_with_zero_output_and_is_counted():
    layer = MoELayer(3, 3, 1, 2, capacity_factor=1.0)  # C = ceil(1 * 3 * 1 / 3) = 1
    x = with_logits(layer.router, [[3.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    layer.train(True)
    routing = []
    y, stats = layer(x, routing)
    assert np.array(routing[0]["kept"])[:, 0].tolist() == [True, False, True]  # token 1 lost the queue
    assert np.allclose(np.array(y)[1], 0.0) and np.abs(np.array(y)[0]).sum() > 0
    assert stats["drop_rate"].item() == pytest.approx(1 / 3) and stats["mean_k"].item() == pytest.approx(2 / 3)
    layer.train(False)  # eval capacity 0 = dropless
    assert layer(x)[1]["drop_rate"].item() == 0.0


ROUTERS = {"topk": {}, "switch": {"moe_topk": 1}, "noisy": {}, "jitter": {}, "sigmoid-bias": {},
           "expert-choice": {}, "smart": {}, "dynamic": {"k_max": 3}}


@pytest.mark.parametrize("name", list(ROUTERS))
def test_gradient_reaches_the_router_through_gates_only(name):
    cfg = ROUTERS[name]
    layer = MoELayer(6, 4, cfg.get("moe_topk", 2), 5, router=name, **{k: v for k, v in cfg.items() if k != "moe_topk"})
    x = mx.array(np.random.default_rng(1).normal(size=(8, 6)).astype(np.float32))
    key = mx.random.key(0)
    w0 = mx.array(layer.router.weight)

    def out(w):
        layer.router.weight = w
        return mx.sum(layer(x, None, key)[0] ** 2)

    def indices(w):
        layer.router.weight = w
        return layer.router(x, key).indices.astype(mx.float32)

    # Without stop_gradient on the indices MLX refuses this gradient (VJP of a gather's indices).
    assert np.abs(np.array(mx.grad(out)(w0))).sum() > 0
    _, (g_idx,) = mx.vjp(indices, [w0], [mx.ones(indices(w0).shape)])
    assert np.all(np.array(g_idx) == 0)


def test_sampling_refuses_a_router_that_is_not_causal():
    """Which routers are causal is checked against the model in test_router_registry; here, that
    generation refuses one that is not (expert-choice: later tokens change earlier outputs)."""
    base, _ = load_preset("debug")
    cfg = dataclasses.replace(base, router="expert-choice", **ROUTERS["expert-choice"])
    validate(cfg)
    model = Model(cfg, "dense")
    model.train(False)
    with pytest.raises(TinyMoeError, match="not causal"):
        next(generate(model, [1, 2, 3], 2))


def test_router_losses_count_only_selected_slots():
    logits = mx.zeros((2, 2))
    probs = mx.softmax(logits, axis=-1)
    idx = mx.array([[0, 1], [0, 1]])
    sel = mx.array([[True, False], [True, False]])
    # Only expert 0 selected: f = (1, 0), P = (1/2, 1/2) -> 2 * 1/2 = 1; all slots: f = (1/2, 1/2) -> 1.
    assert router_losses(logits, probs, idx, 2, sel)["balance_loss"].item() == pytest.approx(1.0)
    assert np.allclose(np.array(router_losses(logits, probs, idx, 2, sel)["load"]), [1.0, 0.0])


@pytest.mark.parametrize("change, message", [
    ({"router": "bogus"}, "unknown router 'bogus' \\(choose from: topk, switch"),
    ({"router": "switch"}, "set moe_topk 1"),
    ({"bias_rate": 0.01}, "bias_rate applies to router sigmoid-bias, not 'topk'"),
    ({"router": "dynamic", "k_min": 3, "k_max": 2}, "k_min <= k_max"),
    ({"router_order": "topk-softmax", "router_norm": False}, "always normalises"),
    ({"router_groups": 3}, "divide moe_experts"),
    ({"capacity_factor": -1.0}, "capacity_factor must be >= 0"),
    ({"entropy_weight": -0.5}, "entropy_weight must be >= 0"),
    ({"moe_experts": 1, "moe_topk": 1, "shared_experts": 1}, "needs an MoE model"),
])
def test_bad_router_settings_are_one_line_errors(change, message):
    base, _ = load_preset("debug")
    with pytest.raises(TinyMoeError, match=message):
        validate(dataclasses.replace(base, **change))


def test_shared_experts_are_always_active_and_named_for_model_safetensors():
    from mlx.utils import tree_flatten

    from tinymoe.io.checkpoint import is_expert_tensor
    from tinymoe.nn.model import count_params

    base, _ = load_preset("debug")
    plain, shared = Model(base, "dense"), Model(dataclasses.replace(base, shared_experts=2), "dense")
    names = {k: v.shape for k, v in tree_flatten(shared.parameters()) if ".moe.shared." in k}
    H, D = base.expert_d_ff, base.d_model
    assert names["blocks.0.moe.shared.w_gate.weight"] == (2 * H, D)
    assert not any(is_expert_tensor(k) for k in names)
    extra = sum(int(np.prod(s)) for s in names.values())
    a, b = count_params(plain), count_params(shared)
    assert b["total"] - a["total"] == extra and b["active"] - a["active"] == extra
