"""The MoE layer: a hand-worked example, router losses, and gradient flow."""

import math

import mlx.core as mx
import numpy as np
import pytest

from tinymoe.nn.moe import MoELayer, router_losses


def silu(v):
    return v / (1 + math.exp(-v))


def hand_built_layer(top_k=2, norm=True):
    """D=2, E=3, H=1: weights chosen so the answer can be worked out on paper."""
    layer = MoELayer(d_model=2, num_experts=3, top_k=top_k, d_hidden=1, norm=norm)
    layer.router.weight = mx.array([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # logits (2x, x, 0)
    e = layer.experts
    e.w_gate = mx.array([[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]])  # (E, H, D)
    e.w_up = mx.array([[[2.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]])
    e.w_down = mx.array([[[1.0], [0.0]], [[0.0], [3.0]], [[5.0], [5.0]]])  # (E, D, H)
    return layer


@pytest.mark.parametrize("dispatch", ["dense", "gather", "grouped", "metal"])
def test_hand_built_moe_matches_paper(dispatch):
    layer = hand_built_layer()
    layer.dispatch = dispatch
    y, losses = layer(mx.array([[1.0, 0.0]]))
    # logits (2, 1, 0) -> top-2 = experts 0 and 1, renormalised gates e/(e+1) and 1/(e+1).
    g0, g1 = math.e / (math.e + 1), 1 / (math.e + 1)
    y0 = [2 * silu(1.0), 0.0]  # expert 0: silu(1) * 2, down -> (h, 0)
    y1 = [0.0, 3 * silu(1.0)]  # expert 1: silu(1) * 1, down -> (0, 3h)
    expected = [g0 * y0[0] + g1 * y1[0], g0 * y0[1] + g1 * y1[1]]
    assert np.allclose(np.array(y)[0], expected, atol=1e-6)
    # Load: one token, two slots -> experts 0 and 1 get half each.
    assert np.allclose(np.array(losses["load"]), [0.5, 0.5, 0.0])


def test_unnormalised_gates_are_the_softmax_probabilities():
    layer = hand_built_layer(top_k=1, norm=False)
    y, _ = layer(mx.array([[1.0, 0.0]]))
    p0 = math.exp(2) / (math.exp(2) + math.exp(1) + 1)
    assert np.allclose(np.array(y)[0], [p0 * 2 * silu(1.0), 0.0], atol=1e-6)


def test_balance_loss_is_one_for_uniform_routing_and_grows_with_imbalance():
    E, K, T = 4, 2, 8
    # Uniform: equal logits, and slots spread evenly (each expert gets T*K/E slots).
    logits = mx.zeros((T, E))
    probs = mx.softmax(logits, axis=-1)
    idx = mx.array([[t % E, (t + 1) % E] for t in range(T)])
    uniform = router_losses(logits, probs, idx, E)["balance_loss"].item()
    assert uniform == pytest.approx(1.0, abs=1e-6)
    previous = uniform
    for skew in (1.0, 3.0, 10.0):  # ever more mass (and all top-1 slots) on expert 0
        logits = mx.array([[skew, skew / 2, 0.0, 0.0]] * T)
        probs = mx.softmax(logits, axis=-1)
        idx = mx.array([[0, 1]] * T)
        value = router_losses(logits, probs, idx, E)["balance_loss"].item()
        # By hand: f = (1/2, 1/2, 0, 0), so loss = E * (p0 + p1) / 2.
        p = np.array(probs[0])
        assert value == pytest.approx(E * (p[0] + p[1]) / 2, rel=1e-5)
        assert value > previous
        previous = value
    assert previous < E + 1e-6  # upper bound: everything on the routed experts


def test_z_loss_by_hand():
    logits = mx.array([[0.0, math.log(3.0)], [1.0, 1.0]])
    probs = mx.softmax(logits, axis=-1)
    z = router_losses(logits, probs, mx.array([[1], [0]]), 2)["z_loss"].item()
    expected = (math.log(1 + 3) ** 2 + (1 + math.log(2)) ** 2) / 2
    assert z == pytest.approx(expected, rel=1e-6)


def test_router_gets_gradient_through_gates_only():
    layer = hand_built_layer()
    x = mx.array([[1.0, 0.0], [0.3, -0.2]])
    w0 = mx.array(layer.router.weight)

    def output_sum(w):
        layer.router.weight = w
        return mx.sum(layer(x)[0])

    def indices_as_float(w):
        layer.router.weight = w
        return layer.router(x).indices.astype(mx.float32)

    assert np.abs(np.array(mx.grad(output_sum)(w0))).sum() > 0  # gates carry gradient
    _, (g_indices,) = mx.vjp(indices_as_float, [w0], [mx.ones((2, 2))])
    assert np.all(np.array(g_indices) == 0)  # stop_gradient'ed top-k indices carry none
