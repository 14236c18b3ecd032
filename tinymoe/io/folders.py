"""Output folders that tinymoe may replace, and only those: the marker, the checks, staged writes.

Every folder a command creates as a whole (a run folder, an export) carries `tinymoe.json`, a
marker written at creation that names its kind (`run` or `export`). `--overwrite` replaces a
folder only when its marker names the same kind, and only after the new command's inputs have
been checked; any other non-empty folder (a user's project, a run of an older tinymoe without a
marker, an export where a run is asked for) is refused with one line naming what is there.
Checkpoint directories inside a run are recognised by their own manifest (tinymoe.io.checkpoint).

Folders written in one go (export, upcycle, import) are built in a hidden sibling
(`.NAME.tmp-PID`) and renamed into place at the end, like checkpoints: a crash at any moment
leaves either the previous folder or none at all, never a partial one under the real name.
Hidden leftovers of a crashed writer (its pid no longer alive) are removed by the next write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from tinymoe.errors import TinyMoeError
from tinymoe.io.checkpoint import pid_alive

MARKER = "tinymoe.json"
KINDS = ("run", "export")
MARKER_FORMAT = 1
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)")


def read_marker(folder: Path) -> dict | None:
    """The folder's marker when it is a well-formed tinymoe marker, else None."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("kind") not in KINDS or marker.get("created_by") != "tinymoe":
        return None
    return marker


def write_marker(folder: Path, kind: str, **fields) -> dict:
    """Create or replace the marker atomically; `fields` are kind-specific settings."""
    from tinymoe import __version__

    if kind not in KINDS:
        raise ValueError(f"unknown folder kind {kind!r}")
    old = read_marker(folder) or {}
    marker = {"created_by": "tinymoe", "kind": kind, "format": MARKER_FORMAT,
              "created": old.get("created", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
              "tinymoe_version": __version__, **fields}
    path = Path(folder) / MARKER
    tmp = path.with_name(f".{MARKER}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(marker, indent=1, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return marker


def _what_is_there(folder: Path) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError:
        return "unreadable contents"
    shown = ", ".join(names[:4]) + (f", ... ({len(names)} entries)" if len(names) > 4 else "")
    return f"it holds {shown}"


def _is_empty_dir(folder: Path) -> bool:
    try:
        return folder.is_dir() and not any(folder.iterdir())
    except OSError:
        return False


def check_output(out: Path, kind: str, overwrite: bool, source: str | Path | None = None,
                 resume_hint: bool = False) -> bool:
    """Whether `out` holds an earlier `kind` folder that --overwrite will replace; False when it is
    absent or empty. Refuses (one line) a file, the source's own folder, and any non-empty folder
    that is not a marked `kind` folder or comes without --overwrite. Deletes nothing."""
    out = Path(out)
    if source is not None and Path(source).exists():
        src, dst = Path(source).resolve(), out.resolve()
        if src == dst or dst in src.parents:
            raise TinyMoeError(f"{out}: the output directory holds the source {source}; choose another --out")
    if out.exists() and not out.is_dir():
        raise TinyMoeError(f"{out}: exists and is not a folder; --out needs a folder to create")
    if not out.exists() or _is_empty_dir(out):
        return False
    marker = read_marker(out)
    if marker is None or marker["kind"] != kind:
        if marker:
            what = f"a tinymoe {marker['kind']} folder"
        elif (out / "checkpoints").is_dir() and (out / "latest").is_file():
            what = "a run without the tinymoe.json marker (from an older tinymoe?): delete it yourself to reuse the name"
        else:
            what = f"not a folder tinymoe created ({_what_is_there(out)})"
        verb = "refusing to replace it" if overwrite else "choose another --out"
        raise TinyMoeError(f"{out} already exists and is not empty: it is {what}; {verb}")
    if not overwrite:
        hint = f"use --resume {out} to continue it or " if resume_hint else "use "
        raise TinyMoeError(f"{out} already exists and is not empty; {hint}--overwrite to replace it")
    return True


def remove_marked(out: Path, kind: str) -> None:
    """Delete a folder whose marker names `kind` (re-checked here, just before deleting)."""
    out = Path(out)
    marker = read_marker(out)
    if marker is None or marker["kind"] != kind:
        raise TinyMoeError(f"{out}: not a tinymoe {kind} folder; refusing to delete it")
    doomed = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, doomed)  # invisible under its real name at once, then deleted
    shutil.rmtree(doomed, ignore_errors=True)


def clean_leftovers(out: Path) -> None:
    """Remove hidden `.NAME.tmp-PID` / `.NAME.old-PID` siblings of `out` left by dead writers; an
    `.old` one comes back as `out` when a writer died after moving it aside but before the new
    folder took its place."""
    out = Path(out)
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return
    for path in siblings:
        m = _LEFTOVER.fullmatch(path.name)
        if not (m and m.group("name") == out.name and not pid_alive(int(m.group("pid")))):
            continue
        if m.group("what") == "old" and not out.exists():  # killed between the two renames of a swap
            try:
                os.replace(path, out)
                continue
            except OSError:
                pass
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staged_output(out: Path, kind: str, overwrite: bool, source: str | Path | None = None):
    """Yield a hidden sibling folder to write into; on success it is marked and renamed to `out`
    (replacing an earlier marked `kind` folder), on any failure it is removed."""
    out = Path(out)
    check_output(out, kind, overwrite, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        write_marker(tmp, kind)
        _commit(tmp, out, kind, overwrite, source)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, out: Path, kind: str, overwrite: bool, source) -> None:
    replace = check_output(out, kind, overwrite, source)  # again: the folder may have changed meanwhile
    if replace:
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    _fsync_dir(out.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
