"""Fuzzing checkpoint loading with hypothesis: mutated manifests and safetensors files.

Every example copies a valid checkpoint, damages it (a JSON edit anywhere in the manifest or in a
safetensors header, flipped or appended bytes, truncation, a forged header length), sometimes
re-records the damaged file's size and sha256 in the manifest so the damage reaches the header
and tensor checks instead of stopping at the file hash, and then loads it. The only acceptable
outcomes: the load succeeds with exactly the original tensors, or it raises TinyMoeError with a
one-line message (and `validate` reports a problem too). Any other exception fails the test; a
hang is cut off by a watchdog, and the peak memory of the whole run is bounded.
"""

import faulthandler
import hashlib
import json
import resource
import shutil
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten

import ckpt_factory as factory
from tinymoe.io import checkpoint, safetensors_io
from tinymoe.errors import TinyMoeError
from tinymoe.io.loader import load_model
from tinymoe.io.validate import validate_checkpoint

SMALL = {"vocab_size": 256, "d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
         "context": 8, "d_ff": 32, "moe_experts": 2, "moe_topk": 1}
SAFETENSORS = ("model.safetensors", "experts.safetensors", "optimizer.safetensors")
COUNTS = {"manifest": 0, "safetensors": 0, "header": 0, "loaded": 0, "refused": 0}
FUZZ = settings(derandomize=True, database=None, deadline=timedelta(seconds=10),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SPECIAL_INTS = [-1, 0, 1, 2, 3, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63,
                2**64, 10**30, -(2**63)]
LEAF = st.one_of(st.none(), st.booleans(), st.sampled_from(SPECIAL_INTS), st.integers(-1000, 1000),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
VALUE = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=8)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    base = factory.bases(factory.param_shapes(SMALL))
    ckpt = factory.save_version(root / "run", base, SMALL, 1)
    return Pristine((ckpt, *factory.state(base, 1)))


class Pristine(tuple):
    """(checkpoint dir, weights, optimizer state); a short repr keeps failure reports readable."""

    def __repr__(self):
        return f"Pristine({self[0]})"


@pytest.fixture(scope="module", autouse=True)
def watchdog_and_memory():
    """No hang (the process dies with a traceback after 5 minutes) and no huge allocation."""
    faulthandler.dump_traceback_later(300, exit=True)
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    faulthandler.cancel_dump_traceback_later()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb) / 1024
    assert grown_mb < 300, f"peak memory grew by {grown_mb:.0f} MB while fuzzing"
    print(f"\nfuzz examples: {COUNTS}")


def mutate_tree(data, tree) -> None:
    """One random edit at a random depth of a JSON tree (dicts and lists, edited in place)."""
    parent, key, node = None, None, tree
    while isinstance(node, (dict, list)) and node:
        keys = sorted(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, data.draw(st.sampled_from(keys))
        node = node[key]
        if data.draw(st.integers(0, 3)) == 0:  # stop here a quarter of the time
            break
    if parent is None:
        return
    op = data.draw(st.sampled_from(["delete", "replace", "nudge", "wrap", "stringify"]))
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = data.draw(VALUE)
    elif op == "nudge" and isinstance(node, int) and not isinstance(node, bool):
        parent[key] = node + data.draw(st.sampled_from([-1, 1, 8, -(2**20), 2**20, 2**40, -node, 2**64]))
    elif op == "nudge" and isinstance(node, list):
        if node and data.draw(st.booleans()):
            node.pop(data.draw(st.integers(0, len(node) - 1)))
        else:
            node.append(data.draw(st.sampled_from(SPECIAL_INTS)))
    elif op == "wrap":
        parent[key] = [node]
    else:
        parent[key] = json.dumps(node)


def copy_of(ckpt) -> Path:
    work = Path(tempfile.mkdtemp(prefix="fuzz-")) / "ckpt"
    shutil.copytree(ckpt, work)
    return work


def rerecord(work: Path, fname: str) -> None:
    """Make the manifest agree with a file's new size and sha256."""
    manifest = json.loads((work / "manifest.json").read_text())
    raw = (work / fname).read_bytes()
    manifest["files"][fname] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (work / "manifest.json").write_text(json.dumps(manifest))


def outcome(work: Path, weights: dict, opt: dict) -> str:
    report = validate_checkpoint(work)  # must not raise either
    try:
        model, manifest, _, _ = load_model(work, "dense")
        loaded_opt = checkpoint.load_tensors(work, manifest, ("optimizer.safetensors",))
    except TinyMoeError as exc:
        assert str(exc) and "\n" not in str(exc)
        assert not report["valid"], f"validate passed what loading refused: {exc}"
        COUNTS["refused"] += 1
        return "refused"
    got = dict(tree_flatten(model.parameters()))
    assert got.keys() == weights.keys() and loaded_opt.keys() == opt.keys()
    for name, arr in weights.items():
        assert np.array_equal(np.array(got[name]), arr), name
    for name, arr in opt.items():
        assert np.array_equal(np.array(loaded_opt[name]), arr), name
    COUNTS["loaded"] += 1
    return "loaded"


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_mutated_manifest_loads_correctly_or_fails_cleanly(pristine, data):
    ckpt, weights, opt = pristine
    work = copy_of(ckpt)
    try:
        path = work / "manifest.json"
        if data.draw(st.integers(0, 4)) == 0:  # damage the text itself
            raw = bytearray(path.read_bytes())
            pos = data.draw(st.integers(0, len(raw) - 1))
            raw = raw[:pos] if data.draw(st.booleans()) else raw[:pos] + bytes([raw[pos] ^ 0x55]) + raw[pos + 1:]
            path.write_bytes(bytes(raw))
        else:
            manifest = json.loads(path.read_text())
            for _ in range(data.draw(st.integers(1, 3))):
                # Mostly the parts loading depends on in detail: the tensor index, the model config.
                where = data.draw(st.sampled_from(["tensors", "tensors", "tensors", "model", "files", "whole"]))
                part = manifest.get(where) if isinstance(manifest, dict) else None
                # An earlier round may have deleted or replaced that part: mutate the whole then.
                mutate_tree(data, part if isinstance(part, (dict, list)) and where != "whole" else manifest)
            path.write_text(json.dumps(manifest))
        COUNTS["manifest"] += 1
        outcome(work, weights, opt)
    finally:
        shutil.rmtree(work.parent)


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_mutated_safetensors_loads_correctly_or_fails_cleanly(pristine, data):
    ckpt, weights, opt = pristine
    work = copy_of(ckpt)
    try:
        fname = data.draw(st.sampled_from(SAFETENSORS))
        raw = bytearray((work / fname).read_bytes())
        (n,) = struct.unpack("<Q", raw[:8])
        op = data.draw(st.sampled_from(["flip", "truncate", "header_length", "header_json", "header_json", "append"]))
        if op == "flip":
            for _ in range(data.draw(st.integers(1, 4))):  # mostly in the header, sometimes anywhere
                pos = data.draw(st.integers(0, min(len(raw) - 1, 8 + n + 16)) | st.integers(0, len(raw) - 1))
                raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "truncate":
            raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
        elif op == "header_length":
            forged = data.draw(st.sampled_from([0, 1, n - 1, n + 1, len(raw), 2**63, 2**64 - 1, 100 * 2**20 + 1])
                               | st.integers(0, 2**64 - 1))
            raw[:8] = struct.pack("<Q", forged)
        elif op == "header_json":
            header = json.loads(bytes(raw[8:8 + n]))
            mutate_tree(data, header)
            text = json.dumps(header).encode()
            text += b" " * max(0, n - len(text))  # same length when it fits: the data stays in place
            raw = bytearray(struct.pack("<Q", len(text)) + text + raw[8 + n:])
        else:
            raw += data.draw(st.binary(min_size=1, max_size=64))
        (work / fname).write_bytes(bytes(raw))
        if data.draw(st.booleans()):
            rerecord(work, fname)
        COUNTS["safetensors"] += 1
        outcome(work, weights, opt)
    finally:
        shutil.rmtree(work.parent)


@settings(FUZZ, max_examples=100)
@given(raw=st.binary(max_size=300) | st.builds(
    lambda n, body: struct.pack("<Q", n) + body,
    st.sampled_from([0, 2, 30, 2**31, 2**63, 2**64 - 1]) | st.integers(0, 400), st.binary(max_size=300)))
def test_read_index_on_arbitrary_bytes_raises_only_header_error(tmp_path_factory, raw):
    path = tmp_path_factory.getbasetemp() / "arbitrary.safetensors"
    path.write_bytes(raw)
    COUNTS["header"] += 1
    try:
        _, index = safetensors_io.read_index(str(path))
    except safetensors_io.HeaderError as exc:
        assert str(exc)
        return
    for entry in index.values():  # whatever it accepts lies inside the file and is self-consistent
        begin, end = entry["offsets"]
        assert 8 <= begin <= end <= len(raw)
        assert end - begin == int(np.prod(entry["shape"], dtype=object)) * safetensors_io.ITEM_BYTES[entry["dtype"]]


def test_examples_ran():
    """Runs after the fuzz tests in this file: they generated what they were asked to."""
    assert COUNTS["manifest"] >= 100 and COUNTS["safetensors"] >= 120 and COUNTS["header"] >= 80, COUNTS
    assert COUNTS["loaded"] + COUNTS["refused"] == COUNTS["manifest"] + COUNTS["safetensors"]
