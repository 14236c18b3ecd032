"""Memory-mapped expert loading and expert offloading against plain, fully loaded models."""

import numpy as np
import pytest
from click.testing import CliRunner

from tinymoe.config import ModelConfig, to_dict


def _cfg():
    return ModelConfig(d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, context=48, d_ff=64,
                       moe_experts=8, moe_topk=2, moe_first_dense=1)


def _save(tmp_path, dtype: str):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from tinymoe.io import checkpoint
    from tinymoe.nn.model import Model

    mx.random.seed(3)
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(Model(_cfg(), "dense").parameters())}
    manifest = {"model": to_dict(_cfg()), "tokenizer": {"kind": "bytes", "vocab_size": 256}}
    return checkpoint.save(tmp_path / f"run-{dtype}", 1, weights, {}, manifest)


def _bytes(arr) -> bytes:
    import mlx.core as mx

    if arr.dtype == mx.bfloat16:
        arr = arr.view(mx.uint16)
    return np.array(arr).tobytes()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("mm"), "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mapped_load_is_bit_identical_to_plain_load(tmp_path, dtype):
    from mlx.utils import tree_flatten

    from tinymoe.io.loader import load_model
    from tinymoe.io.mmap_experts import load_model_mapped

    path = _save(tmp_path, dtype)
    plain = dict(tree_flatten(load_model(path, "dense")[0].parameters()))
    mapped = dict(tree_flatten(load_model_mapped(path, "dense")[0].parameters()))
    assert plain.keys() == mapped.keys()
    for name in plain:
        assert plain[name].dtype == mapped[name].dtype and plain[name].shape == mapped[name].shape, name
        assert _bytes(plain[name]) == _bytes(mapped[name]), name


def test_one_mapped_expert_is_that_slice(ckpt):
    from tinymoe.io import checkpoint
    from tinymoe.io.mmap_experts import MappedExperts

    plain = checkpoint.load_tensors(ckpt, checkpoint.read_manifest(ckpt), ("experts.safetensors",))
    mapped = MappedExperts(ckpt, checkpoint.read_manifest(ckpt))
    assert sorted(mapped.names()) == sorted(plain)
    for name in plain:
        for e in (0, 5, 7):
            assert _bytes(mapped.expert(name, e)) == _bytes(plain[name][e])


def test_mapped_open_rejects_a_changed_header(ckpt, tmp_path):
    import shutil

    from tinymoe.errors import CheckpointError
    from tinymoe.io.mmap_experts import open_mapped

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    with open(bad / "experts.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"[")  # the header is no longer a JSON object
    with pytest.raises(CheckpointError, match="experts.safetensors"):
        open_mapped(bad)


# cpu: identical tokens need bitwise-equal logits from the full and the offloaded expert
# stacks; a GPU may round matmuls over differently shaped stacks differently.
@pytest.mark.cpu
@pytest.mark.parametrize("dispatch", ["grouped", "gather"])
@pytest.mark.parametrize("resident", [1, 3])
def test_offloaded_sampling_gives_identical_tokens(ckpt, dispatch, resident):
    from tinymoe.io.loader import load_model
    from tinymoe.infer.offload import cache_stats, load_model_offloaded
    from tinymoe.infer.sample import generate

    prompt = list(b"The experts are")
    full = load_model(ckpt, dispatch)[0]
    want = list(generate(full, prompt, 40, temperature=0.0))  # 40 > context/2: also a cache rebuild
    model, *_, caches = load_model_offloaded(ckpt, resident, dispatch)
    got = list(generate(model, prompt, 40, temperature=0.0))
    assert got == want
    sampled_full = list(generate(full, prompt, 20, temperature=1.0, seed=5))
    assert list(generate(model, prompt, 20, temperature=1.0, seed=5)) == sampled_full
    stats = cache_stats(caches)
    assert stats["misses"] > 0 and stats["resident_per_layer_max"] <= resident
    assert all(len(c.resident) <= resident for c in caches.values())


def test_sample_cli_reports_the_expert_cache(ckpt):
    import json

    from tinymoe.cli.main import cli

    out = CliRunner().invoke(cli, ["sample", str(ckpt), "--max-tokens", "8", "--temperature", "0",
                                   "--resident-experts", "2", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["tokens"] == 8 and 0 <= data["expert_cache"]["hit_rate"] <= 1
    full = json.loads(CliRunner().invoke(cli, ["sample", str(ckpt), "--max-tokens", "8", "--temperature", "0",
                                               "--json"]).output)
    assert full["text"] == data["text"]
    bad = CliRunner().invoke(cli, ["sample", str(ckpt), "--resident-experts", "2", "--show-routing"])
    assert bad.exit_code == 2 and "error:" in bad.output
