"""The one checkpoint reader: every path verifies what it reads, and "valid" means "loads".

Damaged checkpoints here are re-saved *consistently* (every file and tensor re-hashed by
`checkpoint.save`), so only the reader's semantic checks can catch them: a wrong dtype, a missing
optimizer moment, NaN weights. Corruptions of bytes, by contrast, keep the manifest as it was.
"""

import hashlib
import json

import numpy as np
import pytest
from debug_run import write_corpus
from click.testing import CliRunner

from tinymoe.cli.main import cli
from tinymoe.config import TrainConfig, load_preset
from tinymoe.errors import CheckpointError
from tinymoe.io import checkpoint, safetensors_io
from tinymoe.io.loader import load_model, load_training_state
from tinymoe.io.validate import validate_checkpoint

TRAINING_FIELDS = ("format", "version", "step", "saved_at", "files", "tensors")


def train_run(root, corpus, **train):
    """A real resumable run of the debug preset (MoE, 4 experts), 2 steps."""
    from tinymoe.train.trainer import Trainer

    model_cfg, tr = load_preset("debug")
    tr = TrainConfig(**{**tr.__dict__, "data": [str(corpus)], "steps": 2, "eval_every": 0, "log_every": 1, **train})
    Trainer(model_cfg, tr, root, progress=False).run()
    return checkpoint.resolve(root)


def resave(src, dst_run, weights=None, optimizer=None):
    """Checkpoint `src` saved again into run `dst_run` after `weights(dict)`/`optimizer(dict)`
    changed its tensors: consistently hashed, so only a semantic check can object."""
    ckpt = checkpoint.resolve(src)
    manifest = checkpoint.read_manifest(ckpt)
    w = checkpoint.load_tensors(ckpt, manifest, ("model.safetensors", "experts.safetensors"))
    o = checkpoint.load_tensors(ckpt, manifest, ("optimizer.safetensors",))
    if weights:
        weights(w)
    if optimizer:
        optimizer(o)
    base = {k: v for k, v in manifest.items() if k not in TRAINING_FIELDS}
    return checkpoint.save(dst_run, manifest["step"], w, o, base)


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), 80)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    return train_run(tmp_path_factory.mktemp("trained") / "run", corpus)


def copy_of(ckpt, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(ckpt, dst)
    return dst


def one_line_cli_error(args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# ----------------------------------------------------------------------------- hashes on every path


def test_offloaded_sampling_refuses_a_damaged_model_file(trained, tmp_path):
    # Before: `sample --resident-experts` skipped every hash and sampled from the damaged weights.
    from tinymoe.infer.offload import load_model_offloaded

    bad = copy_of(trained, tmp_path)
    manifest = checkpoint.read_manifest(bad)
    embed = manifest["tensors"]["embed.weight"]["offsets"]
    flip_byte(bad / "model.safetensors", embed[0] + 100)
    with pytest.raises(CheckpointError, match=r"model.safetensors: sha256 does not match"):
        load_model_offloaded(bad, 2, "grouped")
    line = one_line_cli_error(["sample", bad, "--resident-experts", "2", "--max-tokens", "4"])
    assert "model.safetensors: sha256 does not match the manifest (corrupted)" in line


def test_sampling_hashes_what_it_reads_and_validate_still_sees_the_rest(trained, tmp_path):
    """A damaged optimizer file does not stop sampling, which never reads it (hashing it would cost
    reading twice the model's size), but resume and validate, which do rely on it, refuse it."""
    from tinymoe.infer.offload import load_model_offloaded
    from tinymoe.io.loader import load_model, load_training_state
    from tinymoe.io.validate import validate_checkpoint

    bad = copy_of(trained, tmp_path)
    size = (bad / "optimizer.safetensors").stat().st_size
    flip_byte(bad / "optimizer.safetensors", size - 3)
    load_model_offloaded(bad, 2, "grouped")
    load_model(bad)
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors: sha256 does not match"):
        load_training_state(bad)
    assert any("optimizer.safetensors: sha256 does not match" in p for p in validate_checkpoint(bad)["problems"])


def test_a_mapped_expert_is_verified_when_it_is_first_copied(trained, tmp_path):
    from tinymoe.io.mmap_experts import load_model_mapped, open_mapped

    bad = copy_of(trained, tmp_path)
    manifest = checkpoint.read_manifest(bad)
    name = "blocks.1.moe.experts.w_down"
    entry = manifest["tensors"][name]
    assert len(entry["slice_sha256"]) == 4  # written by every save since the reader verifies experts
    stride = (entry["offsets"][1] - entry["offsets"][0]) // 4
    flip_byte(bad / "experts.safetensors", entry["offsets"][0] + 2 * stride + 7)  # inside expert 2
    _, mapped, *_ = open_mapped(bad, "grouped")  # opening reads no expert byte: fine
    mapped.expert(name, 1)
    mapped.expert(name, 3)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' expert 2 sha256 does not match"):
        mapped.expert(name, 2)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' sha256 does not match"):
        load_model_mapped(bad, "grouped")
    report = validate_checkpoint(bad)
    assert any(f"tensor '{name}' expert 2 sha256" in p for p in report["problems"]), report["problems"]
    assert not any(f"expert {e} sha256" in p for p in report["problems"] for e in (0, 1, 3))


def test_each_file_is_hashed_once_per_load(trained, monkeypatch):
    calls = []
    real = safetensors_io.digests
    monkeypatch.setattr(safetensors_io, "digests", lambda path, ranges: calls.append(path) or real(path, ranges))
    load_training_state(trained)
    assert sorted(calls) == sorted(str(trained / f) for f in checkpoint.read_manifest(trained)["files"])
    calls.clear()
    assert validate_checkpoint(trained)["valid"]
    assert len(calls) == len(set(calls)) == len(checkpoint.read_manifest(trained)["files"])


# ----------------------------------------------------------------------------- validate == loads


@pytest.mark.parametrize("optimizer", ["adamw", "sparse-adamw", "adafactor"])
def test_real_checkpoints_of_every_optimizer_validate_and_resume(tmp_path, corpus, optimizer):
    """No false alarms: the optimizer-state check knows what each optimizer really saves,
    including a frozen weight without state (the sigmoid-bias router's bias)."""
    ckpt = train_run(tmp_path / "run", corpus, optimizer=optimizer)
    assert validate_checkpoint(ckpt)["problems"] == []
    assert set(load_training_state(ckpt)["optimizer"])


def test_a_frozen_weight_needs_no_optimizer_state(tmp_path, corpus):
    from tinymoe.train.trainer import Trainer

    model_cfg, tr = load_preset("debug")
    model_cfg.router = "sigmoid-bias"
    tr = TrainConfig(**{**tr.__dict__, "data": [str(corpus)], "steps": 2, "eval_every": 0})
    Trainer(model_cfg, tr, tmp_path / "run", progress=False).run()
    manifest = checkpoint.read_manifest(checkpoint.resolve(tmp_path / "run"))
    assert "blocks.0.moe.router.selection_bias" in manifest["tensors"]
    assert validate_checkpoint(tmp_path / "run")["problems"] == []


def test_integer_weights_are_reported_and_refused_in_one_line(trained, tmp_path):
    # Before: validate said ok, then sample and --resume crashed in the first matmul (traceback).
    import mlx.core as mx

    def to_int8(w):
        w["blocks.0.attn.wq.weight"] = w["blocks.0.attn.wq.weight"].astype(mx.int8)

    bad = resave(trained, tmp_path / "bad", weights=to_int8)
    problem = f"{bad / 'model.safetensors'}: weight 'blocks.0.attn.wq.weight' has dtype int8"
    assert any(p.startswith(problem) for p in validate_checkpoint(bad)["problems"])
    for load in (load_model, load_training_state):
        with pytest.raises(CheckpointError, match="has dtype int8; weights must be one of float32"):
            load(bad)
    assert "has dtype int8" in one_line_cli_error(["sample", bad, "--max-tokens", "2"])


def test_a_missing_optimizer_moment_is_reported_and_refused(trained, tmp_path):
    # Before: validate said ok and the resume crashed (or silently restarted the moment at zero).
    bad = resave(trained, tmp_path / "bad", optimizer=lambda o: o.pop("blocks.1.ffn_norm.weight.v"))
    want = f"{bad / 'optimizer.safetensors'}: 'blocks.1.ffn_norm.weight.v' is missing (adamw keeps it"
    assert any(p.startswith(want) for p in validate_checkpoint(bad)["problems"])
    with pytest.raises(CheckpointError, match=r"'blocks.1.ffn_norm.weight.v' is missing"):
        load_training_state(bad)
    load_model(bad)  # sampling does not need the optimizer state


def test_misshapen_or_unexpected_optimizer_state_is_reported(trained, tmp_path):
    import mlx.core as mx

    def damage(o):
        o["norm.weight.m"] = mx.zeros((3,))
        o["norm.weight.extra"] = mx.zeros((1,))

    problems = validate_checkpoint(resave(trained, tmp_path / "bad", optimizer=damage))["problems"]
    assert any("'norm.weight.m' has shape [3], adamw needs [32]" in p for p in problems), problems
    assert any("'norm.weight.extra' is not state that adamw keeps" in p for p in problems), problems


def test_lazy_optimizer_expert_state_must_be_complete():
    from tinymoe.optim.state_spec import state_problems

    weights = {"e.moe.experts.w_up": [4, 8, 2], "n.weight": [2]}
    trainable = set(weights)
    base = {"step": ([], "uint64"), "learning_rate": ([], "float32"),
            "n.weight.m": ([2], "float32"), "n.weight.v": ([2], "float32")}
    ok = {**base, "e.moe.experts.w_up.expert3.m": ([8, 2], "float32"),
          "e.moe.experts.w_up.expert3.v": ([8, 2], "bfloat16"), "e.moe.experts.w_up.expert3.t": ([], "uint32")}
    assert state_problems("sparse-adamw", weights, trainable, ok) == []
    partial = {k: v for k, v in ok.items() if not k.endswith("expert3.t")}
    assert state_problems("sparse-adamw", weights, trainable, partial) == \
        ["'e.moe.experts.w_up.expert3.t' is missing (the other state of expert 3 is there)"]
    beyond = {**base, "e.moe.experts.w_up.expert4.m": ([8, 2], "float32")}
    assert state_problems("sparse-adamw", weights, trainable, beyond) == \
        ["'e.moe.experts.w_up.expert4.m' is not state that sparse-adamw keeps for this model"]
    factored = {"step": ([], "uint64"), "learning_rate": ([], "float32"), "n.weight.v": ([2], "float32"),
                "e.moe.experts.w_up.expert0.vr": ([8], "float32"), "e.moe.experts.w_up.expert0.vc": ([2], "float32"),
                "e.moe.experts.w_up.expert0.t": ([], "uint32")}
    assert state_problems("adafactor", weights, trainable, factored) == []


def test_non_finite_weights_are_reported_and_refused_on_resume(trained, tmp_path, monkeypatch):
    # Before: validate called a NaN checkpoint ok and a resume trained on from NaN.
    import mlx.core as mx

    def poison(w):
        w["blocks.1.moe.experts.w_up"] = w["blocks.1.moe.experts.w_up"] * mx.array(float("nan"))

    monkeypatch.setattr(checkpoint, "nonfinite_arrays", lambda arrays: [])  # save refuses NaN now
    bad = resave(trained, tmp_path / "bad", weights=poison)
    monkeypatch.undo()
    problems = validate_checkpoint(bad)["problems"]
    assert problems == [f"{bad / 'experts.safetensors'}: weight 'blocks.1.moe.experts.w_up' holds NaN or inf values"]
    with pytest.raises(CheckpointError, match=r"weight 'blocks.1.moe.experts.w_up' holds NaN or inf values; resume"):
        load_training_state(bad)


def test_bfloat16_infinity_is_found_in_files(tmp_path):
    from tinymoe.io.finite import nonfinite_in_file

    arrays = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([0x3F80, 0x7F80], np.uint16)}
    index = safetensors_io.write(str(tmp_path / "x.safetensors"), arrays)
    entries = [{"name": "a", **index["a"]}, {"name": "b", **index["b"], "dtype": "bfloat16"}]
    assert nonfinite_in_file(tmp_path / "x.safetensors", entries) == ["b"]


def test_checkpoints_without_expert_digests_still_load(trained, tmp_path):
    """Checkpoints written before `slice_sha256` existed: mapped experts are checked by header."""
    from tinymoe.infer.offload import load_model_offloaded

    old = copy_of(trained, tmp_path)
    manifest = json.loads((old / "manifest.json").read_text())
    for entry in manifest["tensors"].values():
        entry.pop("slice_sha256", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert validate_checkpoint(old)["valid"]
    load_model_offloaded(old, 1, "grouped")


def test_slice_digests_are_those_of_each_expert(trained):
    manifest = checkpoint.read_manifest(trained)
    entry = manifest["tensors"]["blocks.0.moe.experts.w_gate"]
    raw = (trained / "experts.safetensors").read_bytes()[entry["offsets"][0]:entry["offsets"][1]]
    stride = len(raw) // 4
    assert entry["slice_sha256"] == [hashlib.sha256(raw[i * stride:(i + 1) * stride]).hexdigest() for i in range(4)]
