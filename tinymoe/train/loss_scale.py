"""Dynamic loss scaling for float16 training.

float16's smallest normal number is 2^-14 (subnormals reach 2^-24): many gradient entries of a
language model are smaller and would flush to zero. The loss is multiplied by `scale` before the
backward pass, so every gradient is `scale` times larger, and the gradients are divided by it
(in float32) before clipping and the update. When a scaled gradient overflows (a non-finite
gradient norm while the loss itself is finite), the step is skipped without touching the weights
or the optimizer, the scale halves, and the run goes on: an overflow is the scaler's probe, not a
bad step, so it does not count towards `max_bad_steps`. A non-finite loss, or an overflow at the
smallest scale, is a bad step as before (tinymoe.train.step's guard). After `growth_interval`
good steps in a row the scale doubles again. The state (scale, good steps) is saved in each
checkpoint's manifest so a resumed run scales exactly as an uninterrupted one.
"""

from __future__ import annotations

INITIAL_SCALE = 2.0**15
MIN_SCALE = 1.0
MAX_SCALE = 2.0**24
GROWTH_INTERVAL = 1000  # good steps in a row before the scale doubles


class LossScaler:
    def __init__(self, scale: float = INITIAL_SCALE, growth_interval: int = GROWTH_INTERVAL):
        self.scale, self.good_steps, self.growth_interval = float(scale), 0, growth_interval

    def overflowed(self) -> bool:
        """A scaled gradient overflowed: halve the scale. False when already at the smallest
        scale (the overflow is then a genuine non-finite gradient, the guard's business)."""
        if self.scale <= MIN_SCALE:
            return False
        self.scale, self.good_steps = max(MIN_SCALE, self.scale / 2), 0
        return True

    def good(self) -> None:
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale, self.good_steps = min(MAX_SCALE, self.scale * 2), 0

    def state(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
