"""Quantized models: the error bound of MLX affine quantization (checked with numpy), every
dispatch backend against the dequantized float model, the checkpoint (format, validate, one
expert readable alone, eval), and bad input to `tinymoe quantize` as one `error:` line."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from debug_run import invoke, ok
from tinymoe.config import ModelConfig, apply_overrides, load_preset
from tinymoe.nn.model import Model, count_params
from tinymoe.nn.quantize import float_weights, quantize_model, record_of
from tinymoe.nn.quantized import BITS, GROUP_SIZES, QuantizedSwiGLUExperts
from tinymoe.names import DISPATCH_BACKENDS


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def small_cfg(**over) -> ModelConfig:
    """debug, made wide enough for every group size (d_model 128, expert width 256)."""
    cfg, _ = load_preset("debug")
    return apply_overrides(cfg, {"d_model": 128, "d_ff": 256, "moe_experts": 4, "moe_topk": 2, **over})


def random_model(cfg, seed=0):
    mx.random.seed(seed)
    model = Model(cfg, "dense")
    mx.eval(model.parameters())
    model.train(False)
    return model


def dequantized_twin(model):
    """The float model holding the quantized model's dequantized weights: the reference."""
    ref = Model(model.cfg, "dense")
    ref.update(tree_unflatten(list(float_weights(model).items())))
    ref.train(False)
    return ref


# ----------------------------------------------------------------------------- the numbers


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_dequantized_weights_are_within_one_step_of_their_group(bits, group_size):
    """Every weight comes back within one quantization step, range / (2^bits - 1), of its group
    (range measured with numpy); 8 bits are 17x closer than 4."""
    rng = np.random.default_rng(bits * group_size)
    w = rng.standard_normal((3, 16, 256)).astype(np.float32) * rng.uniform(0.01, 2, (3, 16, 1)).astype(np.float32)
    packed, scales, biases = mx.quantize(mx.array(w), group_size, bits)
    back = np.array(mx.dequantize(packed, scales, biases, group_size, bits))
    groups = w.reshape(3, 16, -1, group_size)
    step = (groups.max(-1) - groups.min(-1)) / (2**bits - 1)  # (3, 16, G)
    err = np.abs(back - w).reshape(groups.shape).max(-1)
    assert (err <= step * 1.001 + 1e-7).all()
    assert packed.dtype == mx.uint32 and packed.shape == (3, 16, 256 * bits // 32)


def test_each_expert_quantizes_alone():
    """Expert e of the quantized stack is exactly expert e quantized by itself: one expert is one
    slice of the packed weights, scales and biases."""
    experts = random_model(small_cfg()).blocks[0].moe.experts
    q = QuantizedSwiGLUExperts.from_float(experts, 64, 4)
    for e in range(q.num_experts):
        alone = mx.quantize(experts.w_down[e], 64, 4)
        for got, want in zip((q.w_down[e], q.w_down_scales[e], q.w_down_biases[e]), alone):
            assert mx.array_equal(got, want).item()
    assert q.params_per_expert() == experts.params_per_expert()


@pytest.mark.parametrize("dispatch", DISPATCH_BACKENDS)
@pytest.mark.parametrize("tokens", [1, 5, 40])  # decoding, a few tokens, a sorted prefill (>= 64 rows)
def test_quantized_forward_equals_the_dequantized_model(dispatch, tokens):
    cfg = small_cfg(shared_experts=1)
    model = random_model(cfg, seed=1)
    quantize_model(model, 4, 64)
    ref = dequantized_twin(model)
    model.set_dispatch(dispatch)
    ids = mx.array(np.random.default_rng(tokens).integers(0, 256, (2, tokens)).astype(np.int32))
    got, want = model(ids)[0], ref(ids)[0]
    assert float(mx.max(mx.abs(got - want)).item()) < 1e-3 * max(1.0, float(mx.max(mx.abs(want)).item()))


def test_routers_norms_and_kept_patterns_stay_float():
    model = random_model(small_cfg())
    total = count_params(model)
    record = quantize_model(model, 8, 32, keep_float=("blocks.1.*",))
    names = dict(tree_flatten(model.parameters()))
    assert names["blocks.0.moe.router.weight"].dtype == mx.float32
    assert names["blocks.0.attn_norm.weight"].dtype == mx.float32
    assert names["blocks.0.moe.experts.w_up"].dtype == mx.uint32
    assert names["blocks.1.moe.experts.w_up"].dtype == mx.float32  # kept by the pattern
    assert "blocks.0.moe.experts" in record["modules"] and not any(m.startswith("blocks.1.") for m in record["modules"])
    assert count_params(model) == total  # a packed weight counts as what it stands for
    assert record_of(model) == record


# ----------------------------------------------------------------------------- the checkpoint


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    from tinymoe.interop.import_hf import write_checkpoint
    from tinymoe.tokenizers.builtin import ByteTokenizer

    model = random_model(small_cfg(), seed=2)
    out = tmp_path_factory.mktemp("quant") / "float"
    write_checkpoint(out, model.cfg, dict(tree_flatten(model.parameters())), ByteTokenizer(), {"kind": "test"})
    return out


@pytest.fixture(scope="module")
def q4(float_ckpt):
    out = float_ckpt.parent / "q4"
    report = json.loads(ok("quantize", float_ckpt, "--bits", 4, "--group-size", 64, "--out", out, "--json").output)
    assert report["weight_bytes_after"] < report["weight_bytes_before"] / 4
    return out


def test_quantized_checkpoint_validates_and_loads_as_quantized_in_memory(float_ckpt, q4):
    from tinymoe.io.loader import load_model
    from tinymoe.io.reader import open_checkpoint

    assert json.loads(ok("validate", q4, "--json").output)["valid"]
    loaded, manifest, _, _ = load_model(q4, "dense")
    assert manifest["version"] == 2 and manifest["quantization"]["bits"] == 4
    assert manifest["params"] == open_checkpoint(float_ckpt).manifest["params"]
    fresh, *_ = load_model(float_ckpt, "dense")
    quantize_model(fresh, 4, 64)
    for (name, a), (_, b) in zip(tree_flatten(loaded.parameters()), tree_flatten(fresh.parameters())):
        assert a.dtype == b.dtype and mx.array_equal(a, b).item(), name


def test_one_quantized_expert_is_readable_alone(q4):
    from tinymoe.io.loader import load_model
    from tinymoe.io.mmap_experts import open_mapped

    full, *_ = load_model(q4, "dense")
    _, mapped, manifest, _, _ = open_mapped(q4)
    for suffix in ("w_gate", "w_gate_scales", "w_gate_biases"):
        name = f"blocks.1.moe.experts.{suffix}"
        assert len(manifest["tensors"][name]["slice_sha256"]) == 4
        assert mx.array_equal(mapped.expert(name, 3), getattr(full.blocks[1].moe.experts, suffix)[3]).item()


def test_eval_of_the_quantized_checkpoint_is_that_of_its_dequantized_twin(float_ckpt, q4, tmp_path):
    from tinymoe.interop.import_hf import write_checkpoint
    from tinymoe.io.loader import load_model

    quantized, _, tokenizer, _ = load_model(q4, "dense")
    write_checkpoint(tmp_path / "deq", quantized.cfg, float_weights(quantized), tokenizer, {"kind": "test"})
    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    a, b, c = (json.loads(ok("eval", ckpt, "--data", data, "--json").output)
               for ckpt in (float_ckpt, q4, tmp_path / "deq"))
    assert a["tokens"] == b["tokens"] == c["tokens"]
    assert abs(b["loss"] - c["loss"]) < 1e-4  # the same function, computed from packed weights
    assert abs(a["loss"] - b["loss"]) < 0.02 * a["loss"]  # and close to the float model


def test_training_a_quantized_checkpoint_is_refused(q4, tmp_path):
    line = one_error_line(invoke("train", "--init", q4, "--preset", "debug", "--steps", 1, "--out", tmp_path / "r",
                                 "--quiet"))
    assert "quantized" in line


# ----------------------------------------------------------------------------- bad input


def test_bits_three_is_refused(float_ckpt, tmp_path):
    assert "--bits" in one_error_line(invoke("quantize", float_ckpt, "--bits", 3, "--out", tmp_path / "x"))


def test_a_group_size_that_does_not_divide_a_width_is_refused(tmp_path):
    from tinymoe.interop.import_hf import write_checkpoint
    from tinymoe.tokenizers.builtin import ByteTokenizer

    cfg, _ = load_preset("debug")  # d_model 32: group size 64 cannot divide it
    model = random_model(cfg)
    write_checkpoint(tmp_path / "d", cfg, dict(tree_flatten(model.parameters())), ByteTokenizer(), {"kind": "test"})
    line = one_error_line(invoke("quantize", tmp_path / "d", "--group-size", 64, "--out", tmp_path / "x"))
    assert "does not divide the width 32" in line
    assert not (tmp_path / "x").exists()


def test_quantizing_twice_is_refused(q4, tmp_path):
    assert "already quantized" in one_error_line(invoke("quantize", q4, "--out", tmp_path / "again"))


def test_the_cli_choices_match_the_library():
    from tinymoe.cli.quantize import BITS as CLI_BITS, GROUP_SIZES as CLI_GROUPS
    from tinymoe.io.manifest import QUANT_BITS, QUANT_GROUP_SIZES

    assert tuple(map(int, CLI_BITS)) == BITS == QUANT_BITS
    assert tuple(map(int, CLI_GROUPS)) == GROUP_SIZES == QUANT_GROUP_SIZES


def test_plan_sizes_quantized_weights_as_the_checkpoint_stores_them(q4):
    """tinymoe plan --bits: the weight bytes it plans are the bytes of the quantized tensors."""
    from tinymoe.io.loader import load_model
    from tinymoe.planner import plan

    model, manifest, *_ = load_model(q4, "dense")
    stored = sum(e["offsets"][1] - e["offsets"][0] for e in manifest["tensors"].values()
                 if e["file"] in ("model.safetensors", "experts.safetensors"))
    planned = plan(model.cfg, mode="sample", quant_bits=4, group_size=64)["bytes"]["weights"]
    assert planned == stored
