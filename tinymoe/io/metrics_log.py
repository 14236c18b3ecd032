"""Reading a run's `metrics.jsonl`: one JSON object with an integer `step` per line.

The trainer appends one line per logged step and flushes it, so a crash (kill -9, power loss)
can leave the last line half-written; that is expected, and every reader drops a malformed last
line silently. A malformed line anywhere else was not torn by a crash (later lines were written
after it): readers skip it with a `warning:` line on stderr naming the file and line number,
so a damaged log never stops a resume or a plot. `trim` (on resume) rewrites the log without the
torn line, the malformed ones and every record past the resumed step, so that appending
continues a clean file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

FILE_NAME = "metrics.jsonl"


def _record(line: str) -> dict | None:
    """The record a line holds, or None when it is not one."""
    try:
        rec = json.loads(line)
    except ValueError:  # JSONDecodeError, and invalid UTF-8 surrogates
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or isinstance(rec["step"], bool):
        return None
    return rec


def read_records(path: str | Path, warn: bool = True) -> list[tuple[str, dict]]:
    """(line, record) for every well-formed line of the metrics file at `path`, in order; a
    malformed last line is dropped, other malformed lines are skipped with a warning."""
    path = Path(path)
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the newline that ends a complete last line
        lines.pop()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = _record(line)
        if rec is None:
            if n < len(lines) and warn:  # the last line may be torn by a crash: no warning
                print(f"warning: {path}:{n}: not a metrics record (malformed line); skipped", file=sys.stderr)
            continue
        out.append((line, rec))
    return out


def trim(path: str | Path, step: int) -> None:
    """Rewrite the metrics file keeping only well-formed records up to `step` (a resume from
    checkpoint `step` drops what was logged after it). Atomic: written aside, then renamed."""
    path = Path(path)
    if not path.exists():
        return
    kept = [line for line, rec in read_records(path) if rec["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
