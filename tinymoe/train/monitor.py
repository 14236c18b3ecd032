"""Training health: count skipped (non-finite) steps, stop after too many in a row, flag spikes.

The trainer skips the update of a step whose loss or gradient norm is not finite (the weights and
optimizer state stay exactly as they were) and reports it here. `HealthMonitor.bad` says when the
run has had `max_bad_steps` such steps in a row and must stop. `HealthMonitor.good` records a
finite loss and says whether it is a spike: more than `spike_factor` times the mean of the last
`spike_window` finite losses (at least `MIN_HISTORY` of them; spike_factor 0 turns this off).
Its state goes into the checkpoint so a resumed run flags exactly what the straight run would.
"""

from __future__ import annotations

from tinymoe.errors import TinyMoeError

MIN_HISTORY = 5  # losses needed before a spike can be called: the first steps move fast


class HealthMonitor:
    def __init__(self, max_bad_steps: int = 5, spike_factor: float = 3.0, spike_window: int = 20):
        self.max_bad_steps, self.spike_factor, self.spike_window = max_bad_steps, spike_factor, spike_window
        self.skipped_steps = 0  # over the whole run
        self.consecutive_bad = 0
        self.recent: list[float] = []  # last spike_window finite losses, oldest first

    def bad(self) -> bool:
        """Count a skipped step; True when the run has reached max_bad_steps in a row."""
        self.skipped_steps += 1
        self.consecutive_bad += 1
        return self.consecutive_bad >= self.max_bad_steps

    def good(self, loss: float) -> float | None:
        """Record a finite loss; the recent mean it exceeds when it is a spike, else None."""
        self.consecutive_bad = 0
        mean = sum(self.recent) / len(self.recent) if self.recent else 0.0
        spike = (self.spike_factor > 0 and len(self.recent) >= min(MIN_HISTORY, self.spike_window)
                 and loss > self.spike_factor * mean)
        self.recent = (self.recent + [loss])[-self.spike_window:]
        return mean if spike else None

    def state(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "consecutive_bad": self.consecutive_bad,
                "recent_losses": list(self.recent)}

    def load_state(self, state: dict) -> None:
        try:
            self.skipped_steps = int(state.get("skipped_steps", 0))
            self.consecutive_bad = int(state.get("consecutive_bad", 0))
            self.recent = [float(v) for v in state.get("recent_losses", [])][-self.spike_window:]
        except (AttributeError, TypeError, ValueError) as exc:
            raise TinyMoeError(f"training health state is malformed: {exc!r}") from None
