"""Reading `manifest.json` and checking its structure before anything trusts it.

`read_manifest` returns a manifest only when every field the loaders use has the right type:
format name and a version this code knows, the model and tokenizer objects, a file list of plain
file names with sizes and sha256 digests, and a tensor index whose entries name a listed file and
carry a known dtype, a non-negative integer shape, byte offsets whose span equals shape x item
size, and a digest (plus, optionally, one digest per expert: `slice_sha256`). Anything else is a one-line `CheckpointError` naming the file and the field,
so no later `KeyError`, `TypeError` or huge allocation can come from a damaged manifest.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from tinymoe.errors import CheckpointError
from tinymoe.io.safetensors_io import ITEM_BYTES, MAX_RANK

FORMAT_NAME = "tinymoe-checkpoint"
FORMAT_VERSION = 2  # the newest version this code reads
# Version 2 adds quantized weights (a `quantization` record). Float checkpoints are still written
# as version 1, which every tinymoe reads; a quantized one is version 2, so a tinymoe that
# predates quantization says "upgrade" instead of failing on packed integer weights.
QUANTIZED_VERSION = 2
# Settings `tinymoe quantize` writes (tinymoe.nn.quantized: BITS, GROUP_SIZES), checked here
# without importing MLX.
QUANT_BITS, QUANT_GROUP_SIZES = (4, 8), (32, 64, 128)


def version_for(manifest: dict) -> int:
    """The format version a checkpoint with this manifest is written as."""
    return QUANTIZED_VERSION if "quantization" in manifest else 1
FILES = ("model.safetensors", "experts.safetensors", "optimizer.safetensors")
MAX_MANIFEST_BYTES = 64 * 2**20  # a real manifest is well under 1 MiB even for large models
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")  # no separators, nothing hidden


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_manifest(ckpt: Path) -> dict:
    """The parsed, structure-checked manifest of checkpoint directory `ckpt`."""
    path = Path(ckpt) / "manifest.json"
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, too large to be a manifest")
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: not valid JSON ({str(exc)[:80]})") from None
    problem = structure_problem(manifest)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return manifest


def structure_problem(manifest) -> str | None:
    """The first structural problem of a parsed manifest, or None."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        return f"not a {FORMAT_NAME} manifest"
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return f"format version {version!r} is not a positive integer"
    if version > FORMAT_VERSION:
        return (f"format version {version} is newer than this tinymoe reads ({FORMAT_VERSION}); "
                f"upgrade tinymoe")
    for key in ("model", "tokenizer", "files", "tensors", "step"):
        if key not in manifest:
            return f"missing '{key}'"
    if not _is_count(manifest["step"]):
        return f"'step' must be a non-negative integer, got {manifest['step']!r}"
    for key in ("model", "tokenizer", "files", "tensors"):
        if not isinstance(manifest[key], dict):
            return f"'{key}' must be an object"
    return _tokenizer_problem(manifest["tokenizer"]) or _files_problem(manifest["files"]) \
        or _tensors_problem(manifest["tensors"], manifest["files"]) or quantization_problem(manifest)


def quantization_problem(manifest: dict) -> str | None:
    """The optional `quantization` record: {mode, bits, group_size, modules, keep_float}."""
    if "quantization" not in manifest:
        return None
    q = manifest["quantization"]
    if manifest["version"] < QUANTIZED_VERSION:
        return f"'quantization' needs format version {QUANTIZED_VERSION}, the manifest says {manifest['version']}"
    if not isinstance(q, dict):
        return "'quantization' must be an object"
    if q.get("mode") != "affine":
        return f"quantization mode {q.get('mode')!r} is not 'affine'"
    if q.get("bits") not in QUANT_BITS or isinstance(q.get("bits"), bool):
        return f"quantization 'bits' {q.get('bits')!r} is not one of {QUANT_BITS}"
    if q.get("group_size") not in QUANT_GROUP_SIZES or isinstance(q.get("group_size"), bool):
        return f"quantization 'group_size' {q.get('group_size')!r} is not one of {QUANT_GROUP_SIZES}"
    for key in ("modules", "keep_float"):
        value = q.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return f"quantization '{key}' must be a list of strings"
    return None


def _tokenizer_problem(tok: dict) -> str | None:
    if not isinstance(tok.get("kind"), str):
        return "tokenizer 'kind' must be a string"
    if "file" in tok and not (isinstance(tok["file"], str) and _PLAIN_NAME.fullmatch(tok["file"])):
        return f"tokenizer 'file' {tok['file']!r} must be a plain file name"
    if "vocab_size" in tok and not _is_count(tok["vocab_size"]):
        return f"tokenizer 'vocab_size' {tok['vocab_size']!r} must be a non-negative integer"
    return None


def _files_problem(files: dict) -> str | None:
    for fname in FILES:
        if fname not in files:
            return f"file list lacks '{fname}'"
    for fname, entry in files.items():
        if not _PLAIN_NAME.fullmatch(fname):
            return f"file list names {fname!r}, which is not a plain file name"
        if not isinstance(entry, dict) or not _is_count(entry.get("bytes")):
            return f"file '{fname}': 'bytes' must be a non-negative integer"
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            return f"file '{fname}': 'sha256' must be 64 lowercase hex digits"
    return None


def _tensors_problem(tensors: dict, files: dict) -> str | None:
    seen = set()
    for key, e in tensors.items():
        where = f"tensor '{key}'"
        if not isinstance(e, dict):
            return f"{where}: entry must be an object"
        fname, name = e.get("file"), e.get("name")
        if not isinstance(fname, str) or fname not in files or not fname.endswith(".safetensors"):
            return f"{where}: 'file' {fname!r} is not a listed safetensors file"
        if not isinstance(name, str):
            return f"{where}: 'name' must be a string"
        # Keys are the names, optimizer ones prefixed, so the index cannot hide a tensor twice.
        expected_key = ("optimizer." + name) if fname == "optimizer.safetensors" else name
        if key != expected_key or (fname, name) in seen:
            return f"{where}: key does not match its name '{name}' in {fname}"
        seen.add((fname, name))
        if fname in ("model.safetensors", "experts.safetensors") and \
                (".moe.experts." in name) != (fname == "experts.safetensors"):
            return f"{where}: stored in the wrong file ({fname})"
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("offsets")
        if not isinstance(dtype, str) or dtype not in ITEM_BYTES:
            return f"{where}: unknown dtype {dtype!r}"
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_count(d) for d in shape):
            return f"{where}: shape {shape!r} is not a list of non-negative integers"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            return f"{where}: offsets {offsets!r} are not [begin, end] byte positions"
        if offsets[1] - offsets[0] != math.prod(shape) * ITEM_BYTES[dtype]:
            return f"{where}: {dtype}{shape} does not fit offsets {offsets}"
        if not isinstance(e.get("sha256"), str) or not _SHA256.fullmatch(e["sha256"]):
            return f"{where}: 'sha256' must be 64 lowercase hex digits"
        # Optional (expert tensors, written since the reader learned to verify mapped experts):
        # one digest per slice of the first axis.
        if "slice_sha256" in e:
            parts = e["slice_sha256"]
            if not (shape and isinstance(parts, list) and len(parts) == shape[0]
                    and all(isinstance(d, str) and _SHA256.fullmatch(d) for d in parts)):
                return f"{where}: 'slice_sha256' must list one sha256 per slice of the first axis"
    return None


def entries_in(manifest: dict, fname: str) -> list[tuple[str, dict]]:
    """(key, entry) of the manifest's tensors stored in file `fname`, in index order."""
    return [(k, e) for k, e in manifest["tensors"].items() if e["file"] == fname]
