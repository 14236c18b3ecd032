"""tinymoe.nn.rope.RoPE computes exactly what nn.RoPE (mx.fast.rope) does, values and gradients,
at every offset and length a model uses, and adds nothing to the model's parameters."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from tinymoe.config import apply_overrides, load_preset
from tinymoe.nn.model import Model
from tinymoe.nn.rope import TABLE_STEP, RoPE


@pytest.mark.parametrize("dims,base,dtype", [(32, 10000.0, mx.float32), (40, 10000.0, mx.float32),
                                             (64, 500000.0, mx.float32), (32, 1e6, mx.bfloat16),
                                             (16, 10000.0, mx.float16)])
def test_rope_is_bitwise_nn_rope(dims, base, dtype):
    ours, ref = RoPE(dims, base=base), nn.RoPE(dims, base=base)
    mx.random.seed(0)
    # Offsets across a table growth (TABLE_STEP) and lengths of decoding and prefill.
    for offset in [0, 1, 5, 37, TABLE_STEP - 1, TABLE_STEP, TABLE_STEP + 3, 2 * TABLE_STEP + 11]:
        for length in (1, 2, 7, 33):
            x = (mx.random.normal((2, 3, length, dims)) * 4).astype(dtype)
            assert mx.array_equal(ours(x, offset), ref(x, offset=offset)).item(), (offset, length)
            k = (mx.random.normal((2, 1, length, dims)) * 4).astype(dtype)
            q2, k2 = ours.pair(x, k, offset)
            assert mx.array_equal(q2, ref(x, offset=offset)).item()
            assert mx.array_equal(k2, ref(k, offset=offset)).item()


def test_rope_gradient_equals_nn_rope():
    ours, ref = RoPE(32), nn.RoPE(32)
    x, w = mx.random.normal((2, 4, 40, 32)), mx.random.normal((2, 4, 40, 32))
    g_ours = mx.grad(lambda a: mx.sum(ours(a, 3) * w))(x)
    g_ref = mx.grad(lambda a: mx.sum(ref(a, offset=3) * w))(x)
    assert mx.array_equal(g_ours, g_ref).item()


def test_traditional_and_partial_rotation_defer_to_mx_fast_rope():
    x = mx.random.normal((1, 2, 5, 32))
    assert mx.array_equal(RoPE(32, traditional=True)(x, 4), nn.RoPE(32, traditional=True)(x, offset=4)).item()
    assert mx.array_equal(RoPE(16)(x, 4), nn.RoPE(16)(x, offset=4)).item()


def test_tables_are_not_parameters():
    cfg, _ = load_preset("debug")
    model = Model(apply_overrides(cfg, {"d_model": 32, "d_ff": 64}), "dense")
    before = sorted(name for name, _ in tree_flatten(model.parameters()))
    model(mx.array([[1, 2, 3]]))  # builds the tables
    assert sorted(name for name, _ in tree_flatten(model.parameters())) == before
    assert not any("rope" in name for name in before)
