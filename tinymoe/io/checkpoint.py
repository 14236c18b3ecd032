"""Checkpoint directories: save atomically, load with checks, find the latest in a run.

A run directory holds `metrics.jsonl`, `checkpoints/step-NNNNNNN/` (one directory per saved
step) and `latest` (the name of the newest complete one). A checkpoint directory holds
`manifest.json`, `model.safetensors` (non-expert weights), `experts.safetensors` (stacked expert
weights, each tensor 16 KiB-aligned), `optimizer.safetensors` and, for a tokenizer that is a
file, that file (`tokenizer.model`, `tokenizer.json`). See docs/checkpoint-format.md.

Atomicity: a checkpoint is written into a hidden temporary sibling (`.step-N.tmp-PID`), every file
fsynced, the manifest written last, the directory renamed into place, then `latest` is replaced by
rename. Old step directories are renamed to a hidden name before they are deleted, so a
half-deleted directory is never visible as a checkpoint. A crash at any moment therefore leaves a
complete checkpoint that `resolve` finds; hidden leftovers of a crash are removed by the next
save. A write that fails (disk full, read-only) removes its temporary directory and raises a
one-line `CheckpointError`; the previous checkpoint is untouched.

A save refuses weights or optimizer state holding NaN or inf (tinymoe.io.finite): such a state
can never train again, so it must not become the checkpoint a run resumes from.

Loading (`load_tensors`) checks the manifest's structure (tinymoe.io.manifest), every file's size
and sha256, and every safetensors header against the manifest before `mx.load` reads a byte, and
returns nothing unless everything is consistent. `file_problem`, `header_problems` and `hash_problems`
are the per-file parts of those checks, which tinymoe.io.reader runs at most once per opened checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from tinymoe.io import safetensors_io
from tinymoe.errors import CheckpointError
from tinymoe.jsonutil import dumps
from tinymoe.io.finite import nonfinite_arrays
from tinymoe.io.folders import LOCK_FILE, fsync_dir, pid_alive, read_marker, swap_into_place
from tinymoe.io.manifest import FILES, FORMAT_NAME, FORMAT_VERSION, entries_in, read_manifest, version_for  # noqa: F401

_STEP_NAME = re.compile(r"step-(\d+)")
# Hidden leftovers: .step-N.tmp-PID (being written), .old-PID (replaced), .del-PID (being deleted).
_HIDDEN_NAME = re.compile(r"\.(step-\d+)\.(tmp|old|del)-(\d+)")


def is_expert_tensor(name: str) -> bool:
    return ".moe.experts." in name


def step_dirname(step: int) -> str:
    return f"step-{step:07d}"


def _step_of(name: str) -> int:
    return int(name.split("-", 1)[1])


def step_of(ckpt: str | Path) -> int:
    """The step of a checkpoint directory named step-N; -1 for any other name."""
    m = _STEP_NAME.fullmatch(Path(ckpt).name)
    return int(m.group(1)) if m else -1


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _why(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


# ----------------------------------------------------------------------------- saving


def save(run_dir: Path, step: int, weights: dict, optimizer_state: dict, manifest: dict,
         tokenizer=None, keep: int = 0) -> Path:
    """Write checkpoint `step` of `run_dir` atomically and point `latest` at it.

    weights / optimizer_state: flat name -> mx.array (or numpy array). manifest: everything but
    the tensor index and file list, which are added here. Older step directories beyond `keep`
    are removed only after the new one is complete and `latest` names it.
    """
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / step_dirname(step)
    tmp = ckpt_root / f".{final.name}.tmp-{os.getpid()}"
    # A NaN or inf never heals, so such a state is not worth keeping, let alone as the latest.
    bad = [f"weight '{n}'" for n in nonfinite_arrays(weights)] + \
        [f"optimizer state '{n}'" for n in nonfinite_arrays(optimizer_state)]
    if bad:
        raise CheckpointError(f"{final}: refusing to save: {first_problem(bad)} holds NaN or inf values; "
                              f"the previous checkpoint is untouched")
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        clean_leftovers(ckpt_root)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_checkpoint(tmp, step, weights, optimizer_state, manifest, tokenizer)
        swap_into_place(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{final}: cannot save checkpoint: {_why(exc)}; "
                              f"the previous checkpoint is untouched") from None
    except BaseException:  # interrupted: leave no partial directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _write_bytes_atomic(run_dir / "latest", (final.name + "\n").encode())
        fsync_dir(run_dir)
    except OSError as exc:
        raise CheckpointError(f"{run_dir / 'latest'}: cannot point it at {final.name}: {_why(exc)}; "
                              f"the checkpoint itself is complete") from None
    _prune(ckpt_root, keep, final.name)
    return final


def _write_checkpoint(tmp: Path, step: int, weights: dict, optimizer_state: dict, manifest: dict,
                      tokenizer) -> None:
    groups = {
        "model.safetensors": ({k: v for k, v in weights.items() if not is_expert_tensor(k)}, 1),
        "experts.safetensors": ({k: v for k, v in weights.items() if is_expert_tensor(k)},
                                safetensors_io.ALIGN_EXPERTS),
        "optimizer.safetensors": (optimizer_state, 1),
    }
    tensors, files = {}, {}
    for fname, (arrays, align) in groups.items():
        # Per-expert digests let a reader that maps experts verify each one as it copies it.
        index = safetensors_io.write(str(tmp / fname), arrays, {"format": FORMAT_NAME}, align,
                                     slice_hashes=fname == "experts.safetensors")
        prefix = "optimizer." if fname == "optimizer.safetensors" else ""
        for name, entry in index.items():
            tensors[prefix + name] = {"file": fname, "name": name, **entry}
        files[fname] = _file_entry(tmp / fname)
    # A tokenizer that is a file (sentencepiece's tokenizer.model, an imported tokenizer.json).
    tok_file = getattr(tokenizer, "file_name", None) if tokenizer is not None else None
    if tok_file:
        tokenizer.save(tmp / tok_file)
        files[tok_file] = _file_entry(tmp / tok_file)
    full = {"format": FORMAT_NAME, "version": version_for(manifest), **manifest, "step": step,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files, "tensors": tensors}
    # The manifest goes last: its presence marks the directory as complete.
    _write_bytes_atomic(tmp / "manifest.json", dumps(full, indent=1).encode())
    fsync_dir(tmp)


def _file_entry(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def clean_leftovers(ckpt_root: Path) -> None:
    """Remove what crashed saves left behind; bring back a replaced step whose successor is gone.

    Best effort: a leftover that cannot be removed is only wasted space, never a wrong checkpoint.
    """
    try:
        entries = list(ckpt_root.iterdir())
    except OSError:
        return
    for path in entries:
        m = _HIDDEN_NAME.fullmatch(path.name)
        if not m:
            continue
        step_name, kind, pid = m.group(1), m.group(2), int(m.group(3))
        if kind == "tmp" and pid_alive(pid):
            continue  # another process is saving right now
        try:
            if kind == "old" and not (ckpt_root / step_name).exists() and (path / "manifest.json").is_file():
                os.replace(path, ckpt_root / step_name)
                continue
        except OSError:
            pass
        shutil.rmtree(path, ignore_errors=True)


def _prune(ckpt_root: Path, keep: int, latest: str) -> None:
    """Best effort, after the new checkpoint is complete: a failure here only leaves extra steps."""
    try:
        steps = sorted((p.name for p in ckpt_root.iterdir() if _STEP_NAME.fullmatch(p.name) and p.name != latest),
                       key=_step_of)
    except OSError:
        return
    for name in steps[: max(0, len(steps) - keep)]:
        doomed = ckpt_root / f".{name}.del-{os.getpid()}"
        try:
            os.replace(ckpt_root / name, doomed)  # atomically invisible first, then deleted
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)


# ----------------------------------------------------------------------------- locating


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint path or a run directory (its latest).

    `latest` wins when it names a complete checkpoint; otherwise (a crash between the rename and
    the `latest` update, or a hand-edited file) the newest complete step directory is used.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run directory")
    if (p / "manifest.json").is_file():
        return p
    if not p.is_dir():
        raise CheckpointError(f"{p}: is a file, not a checkpoint or run directory")
    root = p / "checkpoints"
    try:
        name = (p / "latest").read_text().strip() if (p / "latest").is_file() else ""
    except (OSError, UnicodeDecodeError):
        name = ""
    if _STEP_NAME.fullmatch(name) and (root / name / "manifest.json").is_file():
        return root / name
    found = []
    if root.is_dir():
        for c in root.iterdir():
            m = _HIDDEN_NAME.fullmatch(c.name)
            visible = _STEP_NAME.fullmatch(c.name)
            # A replaced step (.old) counts only if its replacement never arrived.
            if visible or (m and m.group(2) == "old" and not (root / m.group(1)).exists()):
                if (c / "manifest.json").is_file():
                    found.append((_step_of(m.group(1) if m else c.name), not visible, c))
    if found:
        return max(found)[2]
    marker = read_marker(p) if p.is_dir() else None
    if marker is not None and marker.get("kind") == "run":
        if _training_now(p):
            raise CheckpointError(f"{p}: this run is training and has not saved its first checkpoint yet")
        raise CheckpointError(f"{p}: a run that stopped before its first checkpoint (none to load or resume); "
                              f"start it again with the same train command plus --overwrite")
    raise CheckpointError(f"{p}: not a tinymoe checkpoint (no manifest.json) nor a run with checkpoints")


def _training_now(run_dir: Path) -> bool:
    """Whether the run's lock record names a live process on this host (the trainer holds it
    while running and empties it when it stops)."""
    try:
        record = json.loads((run_dir / LOCK_FILE).read_text() or "{}")
        return record.get("host") == socket.gethostname() and pid_alive(int(record["pid"]))
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return False


# ----------------------------------------------------------------------------- loading


def check_files(ckpt: Path, manifest: dict, verify_hashes: bool = True) -> list[str]:
    """Every problem of the listed files (empty list = consistent), one line each: presence,
    size, safetensors header against the manifest, sha256 of each file, of each tensor and of
    each expert slice the manifest lists."""
    problems = []
    for fname, entry in manifest["files"].items():
        problem = file_problem(ckpt / fname, entry)
        if problem:  # missing or the wrong size: nothing more to learn from its bytes
            problems.append(problem)
            continue
        structure = header_problems(ckpt / fname, manifest, fname)[0] if fname.endswith(".safetensors") else []
        problems.extend(structure)
        if verify_hashes:
            problems.extend(hash_problems(ckpt, manifest, fname, tensors=not structure))
    return problems


def hash_problems(ckpt: Path, manifest: dict, fname: str, tensors: bool = True) -> list[str]:
    """sha256 problems of one listed file, in a single read: the whole file and, with `tensors`
    (only when its header agrees with the manifest, so the ranges are known to be sane), every
    tensor and every expert slice (`slice_sha256`) the manifest lists."""
    path = ckpt / fname
    ranges = []  # (begin, end, what): a tensor and its slices nest, digests() allows that
    if tensors and fname.endswith(".safetensors"):
        for _, e in entries_in(manifest, fname):
            begin, end = e["offsets"]
            ranges.append((begin, end, f"tensor '{e['name']}'", e["sha256"]))
            slices = e.get("slice_sha256") or []
            stride = (end - begin) // len(slices) if slices else 0
            ranges.extend((begin + i * stride, begin + (i + 1) * stride, f"tensor '{e['name']}' expert {i}", d)
                          for i, d in enumerate(slices))
        ranges.sort(key=lambda r: (r[0], r[1]))
    try:
        whole, parts = safetensors_io.digests(str(path), [r[:2] for r in ranges])
    except OSError as exc:
        return [f"{path}: unreadable: {_why(exc)}"]
    problems = []
    if whole != manifest["files"][fname]["sha256"]:
        problems.append(f"{path}: sha256 does not match the manifest (corrupted)")
    problems.extend(f"{path}: {what} sha256 does not match the manifest (corrupted)"
                    for (_, _, what, want), digest in zip(ranges, parts) if digest != want)
    return problems


def file_problem(path: Path, entry: dict) -> str | None:
    """A listed file that is missing or has the wrong size, or None."""
    if not path.is_file():
        return f"{path}: missing"
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"{path}: unreadable: {_why(exc)}"
    if size != entry["bytes"]:
        return f"{path}: {size} bytes, manifest says {entry['bytes']} (truncated or changed)"
    return None


def header_problems(path: Path, manifest: dict, fname: str) -> tuple[list[str], dict]:
    """(problems, header index) comparing a safetensors header with the manifest's entries."""
    try:
        _, index = safetensors_io.read_index(str(path))
    except safetensors_io.HeaderError as exc:
        return [f"{path}: bad safetensors header: {exc}"], {}
    except OSError as exc:
        return [f"{path}: unreadable: {_why(exc)}"], {}
    problems = []
    listed = set()
    for _, entry in entries_in(manifest, fname):
        name = entry["name"]
        listed.add(name)
        got = index.get(name)
        if got is None:
            problems.append(f"{path}: tensor '{name}' listed in the manifest is missing")
        elif (got["dtype"], got["shape"], got["offsets"]) != (entry["dtype"], entry["shape"], entry["offsets"]):
            problems.append(f"{path}: tensor '{name}' is {got['dtype']}{got['shape']} at {got['offsets']}, "
                            f"manifest says {entry['dtype']}{entry['shape']} at {entry['offsets']}")
    for name in sorted(set(index) - listed):
        problems.append(f"{path}: tensor '{name}' is not listed in the manifest")
    return problems, index


def first_problem(problems: list[str]) -> str:
    """The first of several problems, saying how many more there are (one line)."""
    more = len(problems) - 1
    return problems[0] + (f" (+{more} more problem{'s' if more > 1 else ''})" if more else "")


def load_tensors(ckpt: Path, manifest: dict, files=FILES, verify_hashes: bool = True) -> dict:
    """Flat name -> evaluated mx.array for the tensors in `files`, checked against the manifest.

    `manifest` must come from `read_manifest` (its structure is checked there). Every listed file
    is checked first (`check_files`; hashes only with verify_hashes), so `mx.load` only ever sees
    headers that were validated. Raises CheckpointError for the first problem, returns nothing
    partial. (tinymoe.io.reader does the same checks once per opened checkpoint.)
    """
    problems = check_files(ckpt, manifest, verify_hashes)
    if problems:
        raise CheckpointError(first_problem(problems))
    return read_tensors(ckpt, manifest, files)


def read_tensors(ckpt: Path, manifest: dict, files) -> dict:
    """Flat name -> evaluated mx.array for the tensors in `files`, whose headers the caller has
    checked against the manifest; each must read back with the manifest's dtype and shape."""
    import mlx.core as mx

    out = {}
    for fname in files:
        path = ckpt / fname
        try:
            loaded = mx.load(str(path))
        except Exception as exc:  # MLX raises plain RuntimeError/ValueError on bad files
            raise CheckpointError(f"{path}: unreadable safetensors ({exc})") from None
        for _, entry in entries_in(manifest, fname):
            name = entry["name"]
            arr = loaded.get(name)
            if arr is None or list(arr.shape) != entry["shape"] or str(arr.dtype).split(".")[-1] != entry["dtype"]:
                raise CheckpointError(f"{path}: tensor '{name}' does not read back as "
                                      f"{entry['dtype']}{entry['shape']}")
            out[name] = arr
    try:
        mx.eval(list(out.values()))  # read now, so a file that changes later cannot half-load
    except Exception as exc:
        raise CheckpointError(f"{ckpt}: reading tensors failed ({exc})") from None
    return out
