"""Every dispatch backend equals the dense reference, forward and all gradients, edges included."""

import mlx.core as mx
import numpy as np
import pytest

from tinymoe.nn.dispatch import BACKENDS, make_plan, run_experts
from tinymoe.nn.moe import MoELayer

SPARSE = [b for b in BACKENDS if b != "dense"]


def routed_problem(T, E, K, D=8, H=6, seed=0, indices=None):
    mx.random.seed(seed)
    x = mx.random.normal((T, D))
    if indices is None:  # distinct experts per token, like a real top-k
        indices = mx.argsort(mx.random.uniform(shape=(T, E)), axis=-1)[:, :K]
    gates = mx.softmax(mx.random.normal((T, K)), axis=-1)
    w = [mx.random.normal(s) * 0.3 for s in ((E, H, D), (E, H, D), (E, D, H))]
    return x, mx.array(indices).astype(mx.uint32), gates, w


def value_and_grads(backend, x, idx, gates, w):
    probe = mx.random.normal((x.shape[0], x.shape[1]), key=mx.random.key(7))

    def f(x, gates, wg, wu, wd):
        return mx.sum(run_experts(backend, x, idx, gates, wg, wu, wd) * probe)

    value, grads = mx.value_and_grad(f, argnums=(0, 1, 2, 3, 4))(x, gates, *w)
    return value, grads


CASES = {
    "random": dict(T=37, E=8, K=2),
    "k=1": dict(T=16, E=4, K=1),
    "k=E": dict(T=9, E=4, K=4),
    "single token (decode)": dict(T=1, E=8, K=2),
    "an expert gets no token": dict(T=12, E=5, K=2, indices=[[t % 2, 2 + t % 2] for t in range(12)]),
    "all slots to one expert": dict(T=10, E=6, K=1, indices=[[3]] * 10),
    "last expert only": dict(T=3, E=4, K=1, indices=[[3]] * 3),
    # `grouped` writes its weight gradients one of two ways, by whether rows N = T*K exceed E*D
    # (D = 8 here); both with an idle expert:
    "idle expert, N > E*D (stacked)": dict(T=40, E=4, K=1, indices=[[t % 3] for t in range(40)]),
    "idle experts, N < E*D (segmented)": dict(T=5, E=16, K=2),
}


@pytest.mark.parametrize("backend", SPARSE)
@pytest.mark.parametrize("case", list(CASES))
def test_backend_equals_dense_forward_and_gradients(backend, case):
    x, idx, gates, w = routed_problem(**CASES[case])
    ref_v, ref_g = value_and_grads("dense", x, idx, gates, w)
    v, g = value_and_grads(backend, x, idx, gates, w)
    assert np.allclose(np.array(v), np.array(ref_v), rtol=1e-5, atol=1e-4)
    for name, a, b in zip(["x", "gates", "w_gate", "w_up", "w_down"], g, ref_g):
        assert a.shape == b.shape, name
        assert np.allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("backend", SPARSE)
def test_padding_rows_do_not_disturb_real_tokens(backend):
    """A batch padded with zero rows: real tokens' outputs are those of the unpadded batch."""
    layer = MoELayer(d_model=8, num_experts=4, top_k=2, d_hidden=6)
    layer.dispatch = backend
    x = mx.random.normal((2, 5, 8))
    padded = mx.concatenate([x, mx.zeros((2, 3, 8))], axis=1)
    y, _ = layer(x)
    yp, _ = layer(padded)
    assert np.allclose(np.array(yp[:, :5]), np.array(y), atol=1e-5)


@pytest.mark.parametrize("backend", SPARSE)
def test_router_weight_gradient_matches_dense_through_the_layer(backend):
    mx.random.seed(1)
    layer = MoELayer(d_model=8, num_experts=6, top_k=2, d_hidden=4)
    x = mx.random.normal((20, 8))

    def loss(w, name):
        layer.router.weight = w
        layer.dispatch = name
        y, losses = layer(x)
        return mx.sum(y * y) + losses["balance_loss"]

    w0 = mx.array(layer.router.weight)
    ref = mx.grad(loss)(w0, "dense")
    got = mx.grad(loss)(w0, backend)
    assert np.allclose(np.array(got), np.array(ref), rtol=1e-4, atol=1e-6)


def test_router_gradient_matches_finite_differences():
    """The analytic router gradient (through the gates) against central differences."""
    mx.random.seed(2)
    layer = MoELayer(d_model=4, num_experts=4, top_k=2, d_hidden=3)
    x = mx.random.normal((6, 4))
    w0 = np.array(layer.router.weight, dtype=np.float64)

    def loss_np(w):
        layer.router.weight = mx.array(w.astype(np.float32))
        return float(mx.sum(layer(x)[0] ** 2).item())

    layer.router.weight = mx.array(w0.astype(np.float32))
    grad = np.array(mx.grad(lambda w: (setattr(layer.router, "weight", w), mx.sum(layer(x)[0] ** 2))[1])(
        mx.array(w0.astype(np.float32))))
    eps = 1e-2
    for i, j in [(0, 0), (1, 2), (3, 1)]:
        up, down = w0.copy(), w0.copy()
        up[i, j] += eps
        down[i, j] -= eps
        numeric = (loss_np(up) - loss_np(down)) / (2 * eps)
        assert grad[i, j] == pytest.approx(numeric, rel=2e-2, abs=1e-3)


def test_plan_is_a_sort_by_expert_with_its_inverse():
    idx = mx.array([[2, 0], [1, 2], [0, 1]], dtype=mx.uint32)
    plan = make_plan(idx, 4)
    flat = np.array(idx).reshape(-1)
    order = np.array(plan.order)
    assert list(np.array(plan.expert_of_row)) == sorted(flat)
    assert list(flat[order]) == sorted(flat)
    assert np.array_equal(order[np.array(plan.pos).reshape(-1)], np.arange(6))
    assert list(np.array(plan.counts)) == [2, 2, 2, 0]
    assert list(np.array(plan.token_of_row)) == list(order // 2)
