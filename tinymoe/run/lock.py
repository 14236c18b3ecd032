"""One writer per run folder: `train.lock`, an advisory lock that names its holder.

A trainer holds an exclusive `flock` on `RUN/train.lock` for as long as it writes the run, and
the file says who holds it (pid, host, start time) so a refusal can name them. The kernel drops
the lock when its process dies, however it dies: a lock file whose lock can be taken is stale
(left by a crash) and is simply taken over. Readers (`sample`, `eval`, `inspect`, `export`) take
no lock; they cope with checkpoints being replaced under them (tinymoe.run.readers).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from tinymoe.errors import TinyMoeError
from tinymoe.io.folders import LOCK_FILE  # noqa: F401  (re-exported: the lock's file name)


class RunLock:
    """Exclusive lock on a run folder; use as a context manager or acquire()/release()."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise TinyMoeError(f"{self.path}: cannot create the run lock: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(fd)
            os.close(fd)
            raise TinyMoeError(f"{self.path.parent} is being trained by {holder}; wait for it to finish or "
                               f"stop it first (one trainer per run folder)") from None
        except OSError as exc:  # a filesystem without flock support
            os.close(fd)
            raise TinyMoeError(f"{self.path}: cannot lock the run folder: {exc.strerror or exc}") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
        finally:
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {record['pid']} on {record['host']} since {record['since']}"
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "another process"
