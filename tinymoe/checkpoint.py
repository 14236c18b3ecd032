"""Checkpoint directories: save atomically, load with checks, find the latest in a run.

A run directory holds `metrics.jsonl`, `checkpoints/step-NNNNNNN/` (one directory per saved
step) and `latest` (the name of the newest complete one). A checkpoint directory holds
`manifest.json`, `model.safetensors` (non-expert weights), `experts.safetensors` (stacked expert
weights, each tensor 16 KiB-aligned), `optimizer.safetensors` and, for a sentencepiece tokenizer,
`tokenizer.model`. See docs/checkpoint-format.md.

Atomicity: a checkpoint is written into a hidden temporary sibling, every file fsynced, the
manifest written last, the directory renamed into place, then `latest` is replaced by rename. A
crash at any moment leaves the previous checkpoint and `latest` loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from tinymoe import safetensors_io
from tinymoe.errors import CheckpointError

FORMAT_NAME = "tinymoe-checkpoint"
FORMAT_VERSION = 1
FILES = ("model.safetensors", "experts.safetensors", "optimizer.safetensors")


def is_expert_tensor(name: str) -> bool:
    return ".moe.experts." in name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_dirname(step: int) -> str:
    return f"step-{step:07d}"


def save(run_dir: Path, step: int, weights: dict, optimizer_state: dict, manifest: dict,
         tokenizer=None, keep: int = 0) -> Path:
    """Write checkpoint `step` of `run_dir` atomically and point `latest` at it.

    weights / optimizer_state: flat name -> mx.array. manifest: everything but the tensor index
    and file list, which are added here. Older step directories beyond `keep` are removed only
    after the new one is complete.
    """
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_dirname(step)
    tmp = ckpt_root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    groups = {
        "model.safetensors": ({k: v for k, v in weights.items() if not is_expert_tensor(k)}, 1),
        "experts.safetensors": ({k: v for k, v in weights.items() if is_expert_tensor(k)},
                                safetensors_io.ALIGN_EXPERTS),
        "optimizer.safetensors": (optimizer_state, 1),
    }
    tensors, files = {}, {}
    for fname, (arrays, align) in groups.items():
        index = safetensors_io.write(str(tmp / fname), arrays, {"format": FORMAT_NAME}, align)
        prefix = "optimizer." if fname == "optimizer.safetensors" else ""
        for name, entry in index.items():
            tensors[prefix + name] = {"file": fname, "name": name, **entry}
        files[fname] = _file_entry(tmp / fname)
    if tokenizer is not None and getattr(tokenizer, "kind", "bytes") == "sp":
        tokenizer.save(tmp / "tokenizer.model")
        files["tokenizer.model"] = _file_entry(tmp / "tokenizer.model")
    full = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **manifest, "step": step,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files, "tensors": tensors}
    _write_json_atomic(tmp / "manifest.json", full)
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. after resume): move the old one aside first
        old = ckpt_root / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    (run_dir / ".latest.tmp").write_text(final.name + "\n")
    os.replace(run_dir / ".latest.tmp", run_dir / "latest")
    _fsync_dir(run_dir)
    _prune(ckpt_root, keep, final.name)
    return final


def _file_entry(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _prune(ckpt_root: Path, keep: int, latest: str) -> None:
    steps = sorted(p.name for p in ckpt_root.iterdir() if p.name.startswith("step-") and p.name != latest)
    for name in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(ckpt_root / name, ignore_errors=True)


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint path or a run directory (its latest)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run directory")
    if (p / "manifest.json").is_file():
        return p
    latest = p / "latest"
    if latest.is_file():
        cand = p / "checkpoints" / latest.read_text().strip()
        if (cand / "manifest.json").is_file():
            return cand
    done = sorted(c for c in (p / "checkpoints").glob("step-*") if (c / "manifest.json").is_file()) \
        if (p / "checkpoints").is_dir() else []
    if done:
        return done[-1]
    raise CheckpointError(f"{p}: not a tinymoe checkpoint (no manifest.json) nor a run with checkpoints")


def read_manifest(ckpt: Path) -> dict:
    path = ckpt / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a {FORMAT_NAME} manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version!r} is newer than this tinymoe reads ({FORMAT_VERSION}); upgrade tinymoe")
    for key in ("model", "tokenizer", "files", "tensors", "step"):
        if key not in manifest:
            raise CheckpointError(f"{path}: missing '{key}'")
    return manifest


def check_files(ckpt: Path, manifest: dict, verify_hashes: bool = True) -> list[str]:
    """Problems found (empty list = consistent): presence, sizes, hashes of every listed file."""
    problems = []
    for fname, entry in manifest["files"].items():
        path = ckpt / fname
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != entry.get("bytes"):
            problems.append(f"{path}: {size} bytes, manifest says {entry.get('bytes')} (truncated or changed)")
        elif verify_hashes and _file_entry(path)["sha256"] != entry.get("sha256"):
            problems.append(f"{path}: sha256 does not match the manifest (corrupted)")
    return problems


def load_tensors(ckpt: Path, manifest: dict, files=FILES, verify_hashes: bool = True) -> dict:
    """Flat name -> mx.array for the tensors in `files`, checked against the manifest index."""
    import mlx.core as mx

    problems = check_files(ckpt, manifest, verify_hashes)
    if problems:
        raise CheckpointError(problems[0] + (f" (+{len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    out = {}
    for fname in files:
        if fname not in manifest["files"]:
            continue
        try:
            loaded = mx.load(str(ckpt / fname))
        except Exception as exc:  # MLX raises plain RuntimeError/ValueError on bad files
            raise CheckpointError(f"{ckpt / fname}: unreadable safetensors ({exc})") from None
        for key, entry in manifest["tensors"].items():
            if entry.get("file") != fname:
                continue
            name = entry["name"]
            arr = loaded.get(name)
            if arr is None:
                raise CheckpointError(f"{ckpt / fname}: tensor '{name}' listed in the manifest is missing")
            if list(arr.shape) != entry["shape"] or str(arr.dtype).split(".")[-1] != entry["dtype"]:
                raise CheckpointError(f"{ckpt / fname}: tensor '{name}' is {arr.dtype}{list(arr.shape)}, "
                                      f"manifest says {entry['dtype']}{entry['shape']}")
            out[name] = arr
    return out
