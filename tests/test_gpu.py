"""Checks that need a GPU default device (Metal on a Mac, or MLX's CUDA build): the real kernels
pass their first-use check, `auto` picks the path docs/kernels.md promises, and a training step
runs on the GPU. Skipped where there is no GPU (`gpu` marker, tests/conftest.py); run them with
`pytest -m gpu` on a Mac or through benchmarks/gpu.sh on a CUDA machine. The rest of the suite
also runs with the GPU as default device there.
"""

import mlx.core as mx
import numpy as np
import pytest

from tinymoe.nn import dispatch, selftest
from tinymoe.nn.kernels import dispatch as kd
from tinymoe.nn.kernels import launch, trust

pytestmark = pytest.mark.gpu


def test_the_kernels_run_here_and_pass_their_first_use_check():
    backend = launch.device_backend()
    assert backend in ("metal", "cuda")
    v = trust.verdict(refresh=True)
    assert v.ok, f"{v.failed} of {v.checks} comparisons failed, first: {v.failure}"
    assert v.origin == "checked now" and trust.cache_path(trust.verdict_key(backend)).exists()


def test_auto_picks_the_documented_path():
    want = "metal" if launch.metal_available() else "gather"
    assert dispatch.resolve_backend("auto") == want


def test_ops_launch_kernels_in_every_dtype_and_match_the_references():
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        rows = selftest.check_kernel_ops(selftest.KERNEL_CASES[0], dtype=dtype)
        assert all(r.implementation.endswith("kernel") for r in rows)
        assert all(r.passed for r in rows), [(r.op, r.max_abs_err, r.worst) for r in rows if not r.passed]


def test_a_grid_with_a_partial_last_threadgroup_and_a_decode_step():
    rng = np.random.default_rng(0)
    for T, K, D in ((1, 2, 4096), (1000, 8, 37)):
        x = mx.array(rng.standard_normal((T, D)).astype(np.float32)).astype(mx.bfloat16)
        order = mx.array(rng.permutation(T * K).astype(np.uint32))
        y = kd.gather_rows(x, order, K)
        np.testing.assert_array_equal(np.array(y.astype(mx.float32)),
                                      np.array(x.astype(mx.float32))[np.array(order) // K])


def test_a_training_step_runs_on_the_gpu(debug_cfg):
    from tinymoe.nn.model import Model

    model = Model(debug_cfg, "auto")
    tokens = mx.array(np.random.default_rng(1).integers(0, 256, (2, 32)))

    def loss(params):
        model.update(params)
        logits, _ = model(tokens[:, :-1])
        return mx.mean(mx.logsumexp(logits, axis=-1) - mx.take_along_axis(
            logits, tokens[:, 1:, None], axis=-1).squeeze(-1))

    value, grads = mx.value_and_grad(loss)(model.parameters())
    mx.eval(value, grads)
    assert np.isfinite(value.item())
