"""Which files a run trains on: absolute specs and a content record checked again on resume.

A run stores its `--data` specs with absolute paths, so `eval`, `inspect` and `--resume` find the
data from any working directory, and records every file it reads (path, size, sha256) in reading
order. Resuming recomputes the record and compares contents, not paths: the same bytes in the same
order train the same run (a moved bundled corpus included), while an edited, added or removed
file would silently break the bit-for-bit resume and is refused unless the user allows it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tinymoe.data.corpus import expand_specs, split_domain_tag
from tinymoe.errors import TinyMoeError


def absolute_spec(spec: str) -> str:
    """`spec` with its path made absolute; a DOMAIN= tag and glob characters are kept."""
    tag, path_text = split_domain_tag(spec)
    path = os.path.abspath(os.path.expanduser(path_text))
    return f"{tag}={path}" if tag is not None else path


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_record(specs: list[str]) -> list[dict]:
    """[{"path", "bytes", "sha256"}] of every file the specs name, in reading order."""
    record = []
    for path, _, _ in expand_specs(specs):
        try:
            record.append({"path": str(Path(path).resolve()), "bytes": path.stat().st_size, "sha256": file_sha256(path)})
        except OSError as exc:
            raise TinyMoeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return record


def record_change(recorded: list, current: list) -> str | None:
    """The first difference in content between two records, in words, or None when the same
    bytes are read in the same order."""
    if not isinstance(recorded, list) or not all(isinstance(r, dict) for r in recorded):
        return "the recorded list of data files is malformed"
    for i, (old, new) in enumerate(zip(recorded, current)):
        if (old.get("bytes"), old.get("sha256")) != (new["bytes"], new["sha256"]):
            return f"{new['path']} differs from the recorded {old.get('path')} (file {i + 1}: size or content changed)"
    if len(recorded) != len(current):
        extra = current[len(recorded):] or recorded[len(current):]
        verb = "was added" if len(current) > len(recorded) else "is missing"
        return f"{extra[0].get('path')} {verb} ({len(recorded)} files recorded, {len(current)} found now)"
    return None
