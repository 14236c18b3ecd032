"""Checkpoint directories: bit-exact round trip, layout, atomic replacement, refusals."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tinymoe.io import checkpoint, safetensors_io
from tinymoe.errors import CheckpointError
from tinymoe.nn.model import Model


def save_model(tmp_path, cfg, step=1):
    mx.random.seed(3)
    model = Model(cfg, "dense")
    weights = dict(tree_flatten(model.parameters()))
    opt = {"step": mx.array(5, dtype=mx.uint64), "blocks.0.attn.wq.weight.m": mx.ones((4, 4), dtype=mx.bfloat16)}
    manifest = {"model": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                          "n_kv_heads": cfg.n_kv_heads, "context": cfg.context, "d_ff": cfg.d_ff,
                          "moe_experts": cfg.moe_experts, "moe_topk": cfg.moe_topk},
                "tokenizer": {"kind": "bytes", "vocab_size": 256}}
    path = checkpoint.save(tmp_path, step, weights, opt, manifest)
    return model, weights, opt, path


def test_round_trip_is_bit_exact_and_logits_identical(tmp_path, debug_cfg):
    from tinymoe.io.loader import load_model

    model, weights, opt, path = save_model(tmp_path, debug_cfg)
    manifest = checkpoint.read_manifest(path)
    loaded = checkpoint.load_tensors(path, manifest)
    for name, arr in {**weights, **opt}.items():
        assert loaded[name].dtype == arr.dtype
        assert np.array_equal(np.array(loaded[name].view(mx.uint16) if arr.dtype == mx.bfloat16 else loaded[name]),
                              np.array(arr.view(mx.uint16) if arr.dtype == mx.bfloat16 else arr))
    model2, _, _, _ = load_model(tmp_path, "dense")  # run directory -> latest checkpoint
    tokens = mx.random.randint(0, 256, (2, 10))
    assert np.array_equal(np.array(model(tokens)[0]), np.array(model2(tokens)[0]))


def test_layout_experts_aligned_and_indexed(tmp_path, debug_cfg):
    _, weights, _, path = save_model(tmp_path, debug_cfg)
    manifest = checkpoint.read_manifest(path)
    experts = {k: v for k, v in manifest["tensors"].items() if v["file"] == "experts.safetensors"}
    assert experts and all(".moe.experts." in k for k in experts)
    assert not any(".moe.experts." in k for k, v in manifest["tensors"].items() if v["file"] == "model.safetensors")
    raw = (path / "experts.safetensors").read_bytes()
    for name, entry in experts.items():
        begin, end = entry["offsets"]
        assert begin % safetensors_io.ALIGN_EXPERTS == 0
        # One expert is a contiguous byte range: expert e of a stacked (E, ...) tensor.
        E = entry["shape"][0]
        stride = (end - begin) // E
        e1 = np.frombuffer(raw[begin + stride : begin + 2 * stride], dtype=np.float32)
        assert np.array_equal(e1, np.array(weights[name][1]).reshape(-1))
    data_start, header = safetensors_io.read_header(str(path / "experts.safetensors"))
    assert data_start % safetensors_io.ALIGN_EXPERTS == 0
    # data_offsets tile the data section with no holes (strict readers require it).
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] == len(raw) - data_start


def test_saving_again_replaces_latest_and_prunes(tmp_path, debug_cfg):
    save_model(tmp_path, debug_cfg, step=1)
    save_model(tmp_path, debug_cfg, step=2)
    assert (tmp_path / "latest").read_text().strip() == "step-0000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002"]
    assert checkpoint.resolve(tmp_path).name == "step-0000002"


def test_truncated_file_is_refused(tmp_path, debug_cfg):
    _, _, _, path = save_model(tmp_path, debug_cfg)
    f = path / "experts.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="experts.safetensors.*truncated"):
        checkpoint.load_tensors(path, checkpoint.read_manifest(path))


def test_corrupted_bytes_are_refused(tmp_path, debug_cfg):
    _, _, _, path = save_model(tmp_path, debug_cfg)
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.load_tensors(path, checkpoint.read_manifest(path))


@pytest.mark.parametrize("edit, message", [
    (lambda m: {**m, "version": 99}, "newer"),
    (lambda m: {**m, "format": "other"}, "not a tinymoe-checkpoint"),
    (lambda m: {k: v for k, v in m.items() if k != "tensors"}, "missing 'tensors'"),
])
def test_bad_manifests_are_refused(tmp_path, debug_cfg, edit, message):
    _, _, _, path = save_model(tmp_path, debug_cfg)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(edit(manifest)))
    with pytest.raises(CheckpointError, match=message):
        checkpoint.read_manifest(path)


def test_invalid_json_manifest(tmp_path, debug_cfg):
    _, _, _, path = save_model(tmp_path, debug_cfg)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.read_manifest(path)


def test_mlx_reads_our_padded_files(tmp_path):
    arrays = {"a": mx.arange(5, dtype=mx.float32), "b": mx.ones((3, 7), dtype=mx.float16)}
    safetensors_io.write(str(tmp_path / "x.safetensors"), arrays, align=4096)
    loaded = mx.load(str(tmp_path / "x.safetensors"))
    assert set(loaded) - {"a", "b"} <= {k for k in loaded if k.startswith(safetensors_io.PAD_PREFIX)}
    for k, v in arrays.items():
        assert np.array_equal(np.array(loaded[k]), np.array(v))
