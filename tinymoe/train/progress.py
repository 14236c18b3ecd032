"""A dependency-free progress line: step, loss, tokens/s and ETA.

On a terminal it redraws one line in place; otherwise (logs, CI, pipes) it prints a plain line
every `every` steps so the output stays readable.
"""

from __future__ import annotations

import sys
import time


ESTIMATE_AFTER = 4  # steps timed (after the first) for the early estimate


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True, every: int = 10, stream=None):
        self.total, self.initial, self.enabled, self.every = total, initial, enabled, max(1, every)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self._first_done: float | None = None

    def update(self, step: int, **fields) -> None:
        self._early_estimate(step)
        if not self.enabled or (not self.tty and step % self.every and step != self.total):
            return
        done = step - self.initial
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - step) if done else 0.0
        width = 24
        filled = int(width * step / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
        line = f"[{bar}] {step}/{self.total} " + " | ".join(parts) + f" | eta {format_duration(eta)}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        else:
            self.stream.write(line + "\n")

    def _early_estimate(self, step: int) -> None:
        """Once, a few steps in: how long the rest will take. The first step is left out of the
        rate (it compiles), so the estimate holds from the start of a long run."""
        done = step - self.initial
        if done == 1:
            self._first_done = time.perf_counter()
        elif done == 1 + ESTIMATE_AFTER and self.total - step > ESTIMATE_AFTER and self._first_done is not None:
            per_step = (time.perf_counter() - self._first_done) / ESTIMATE_AFTER
            self.message(f"estimate: about {format_duration(per_step * (self.total - step))} for the remaining "
                         f"{self.total - step} steps ({per_step:.2f} s/step)")

    def message(self, text: str) -> None:
        """A line that must not be overwritten (eval results, checkpoint saved)."""
        if not self.enabled:
            return
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
