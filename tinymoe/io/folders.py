"""Output folders that tinymoe may replace, and only those: the marker, the checks, staged writes.

Every folder a command creates as a whole (a run folder, an export) carries `tinymoe.json`, a
marker written at creation that names its kind (`run` or `export`). `--overwrite` replaces a
folder only when its marker names the same kind, and only after the new command's inputs have
been checked; any other non-empty folder (a user's project, a run of an older tinymoe without a
marker, an export where a run is asked for) is refused with one line naming what is there.
Checkpoint directories inside a run are recognised by their own manifest (tinymoe.io.checkpoint).

Folders written in one go (export, upcycle, import) are built in a hidden sibling
(`.NAME.tmp-PID`, marked from its creation) and renamed into place at the end, like checkpoints:
a crash at any moment leaves either the previous folder or none at all, never a partial one
under the real name. A replaced folder is renamed aside and deleted only after the new one has
taken its name. Hidden leftovers of a crashed writer (its pid no longer alive) are removed by the
next write, and only when they carry the marker; deletion removes the marker last, so a deletion
cut short leaves a folder that is still marked (or empty) and the next write finishes it.
Nothing here deletes a non-empty folder that does not carry the marker.
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

MARKER = "tinymoe.json"
LOCK_FILE = "train.lock"  # a run's writer lock (tinymoe.run.lock), named here for the readers in io
KINDS = ("run", "export", "teacher-cache", "sweep")
MARKER_FORMAT = 1
# Hidden siblings: .NAME.tmp-PID (being written), .old-PID (moved aside), .del-PID (being deleted).
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<what>tmp|old|del)-(?P<pid>\d+)")
_MARKER_SCRAP = re.compile(r"\.tinymoe\.json\.tmp-\d+")  # what write_marker leaves if cut short


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
        if resume_hint and kind == "run" and not has_checkpoints(out):
            raise TinyMoeError(f"{out} already exists: it holds a run that stopped before its first checkpoint "
                               f"(nothing to resume); use --overwrite to start it again")
        if resume_hint and kind == "run" and _finished(out, marker):
            raise TinyMoeError(f"{out} already exists: it holds a finished run; use --resume {out} --extend-steps N "
                               f"to train it longer or --overwrite to replace it")
        hint = f"use --resume {out} to continue it or " if resume_hint else "use "
        raise TinyMoeError(f"{out} already exists and is not empty; {hint}--overwrite to replace it")
    return True


def _finished(run_dir: Path, marker: dict) -> bool:
    """Whether the run's latest checkpoint is at its planned last step (then plain --resume has
    nothing to do)."""
    try:
        name = (Path(run_dir) / "latest").read_text().strip()
        return int(name.split("-", 1)[1]) >= int(marker.get("steps") or 0) > 0
    except (OSError, UnicodeDecodeError, IndexError, ValueError, TypeError):
        return False


def has_checkpoints(run_dir: Path) -> bool:
    """Whether a run folder holds any checkpoint (complete or being replaced)."""
    root = Path(run_dir) / "checkpoints"
    try:
        return (Path(run_dir) / "latest").is_file() or any(root.iterdir())
    except OSError:
        return False


def remove_marked(out: Path, kind: str) -> None:
    """Delete a folder whose marker names `kind` (re-checked here, just before deleting)."""
    out = Path(out)
    marker = read_marker(out)
    if marker is None or marker["kind"] != kind:
        raise TinyMoeError(f"{out}: not a tinymoe {kind} folder; refusing to delete it")
    doomed = out.with_name(f".{out.name}.del-{os.getpid()}")
    try:
        os.replace(out, doomed)  # invisible under its real name at once, then deleted
    except OSError as exc:
        raise TinyMoeError(f"{out}: cannot move it aside to replace it: {exc.strerror or exc}") from None
    delete_marked(doomed)


def delete_marked(folder: Path) -> None:
    """Delete a folder tinymoe made, its marker last: a deletion cut short (kill -9) leaves it still
    marked, or empty, never an unmarked folder with contents. Best effort, like any cleanup."""
    for child in list(folder.iterdir()):
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            try:
                child.unlink()
            except OSError:
                pass
    for last in (lambda: (folder / MARKER).unlink(), folder.rmdir):
        try:
            last()
        except OSError:
            pass


def _is_scrap(folder: Path) -> bool:
    """An empty folder, or one holding only what an interrupted write_marker leaves."""
    try:
        return all(_MARKER_SCRAP.fullmatch(child.name) for child in folder.iterdir())
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """Whether another process with this pid runs (ours counts as gone: an earlier, failed attempt)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete folder `tmp` to `final`. An existing `final` is renamed aside first
    (`.NAME.old-PID`) and deleted only once `tmp` has its name: a crash between the two renames
    leaves the old folder under the hidden name, which the next writer brings back."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)
            raise
        fsync_dir(final.parent)
        doomed = final.with_name(f".{final.name}.del-{os.getpid()}")
        os.replace(old, doomed)  # from here on it is garbage, never to be brought back
        delete_marked(doomed)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def clean_leftovers(out: Path) -> None:
    """Remove the hidden siblings of `out` that dead writers left and that carry the marker (or
    are empty); an intact `.old` one comes back as `out` when a writer died after moving it aside
    but before the new folder took its place."""
    out = Path(out)
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return
    for path in siblings:
        m = _LEFTOVER.fullmatch(path.name)
        if not (m and m.group("name") == out.name and not pid_alive(int(m.group("pid")))):
            continue
        if read_marker(path) is None:
            if path.is_dir() and _is_scrap(path):  # cut short before its marker was written, or after it went
                delete_marked(path)
            continue  # otherwise not ours to delete, whatever its name
        if m.group("what") == "old" and not out.exists():  # killed between the two renames of a swap
            try:
                os.replace(path, out)
                continue
            except OSError:
                pass
        delete_marked(path)


@contextmanager
def staged_output(out: Path, kind: str, overwrite: bool, source: str | Path | None = None):
    """Yield a hidden, marked sibling folder to write into; on success it is renamed to `out`
    (replacing an earlier marked `kind` folder), on any failure it is removed."""
    out = Path(out)
    check_output(out, kind, overwrite, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir()
    except OSError as exc:  # e.g. an unmarked folder of that name: not ours to remove
        raise TinyMoeError(f"{tmp}: cannot create the staging folder: {exc.strerror or exc}") from None
    try:
        write_marker(tmp, kind)  # from the start, so a crash leaves a leftover the next write may remove
        yield tmp
        if not check_output(out, kind, overwrite, source) and out.is_dir():  # again: it may have changed
            out.rmdir()  # empty, as just checked
        swap_into_place(tmp, out)
    except OSError as exc:
        delete_marked(tmp)
        raise TinyMoeError(f"{out}: cannot write it: {exc.strerror or exc}") from None
    except BaseException:
        delete_marked(tmp)  # our own staging folder, created just above
        raise


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
