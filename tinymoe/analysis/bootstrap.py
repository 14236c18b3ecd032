"""Bootstrap confidence intervals for bits per byte, with numpy and a seed (reproducible tables).

Bits per byte over a set of windows is a ratio of sums, sum(nats) / (ln 2 x sum(bytes)), so a
replicate resamples *windows* with replacement and recomputes that ratio (not a mean of
per-window ratios, which would weight a short window like a long one). Runs scored on the same
windows are resampled with the same indices, so a paired difference keeps its pairing: the
noise the two runs share (a hard window is hard for both) cancels, and the interval of the
difference is much narrower than the two intervals side by side suggest.

With several seeds of one configuration, a replicate resamples seeds too (two-level bootstrap:
seeds with replacement, then the shared windows), so the interval covers both the choice of
held-out text and the run-to-run variation of training. With 2-3 seeds that part is itself a
rough estimate; the table says how many seeds each interval rests on.

Intervals are percentile intervals (the 2.5th and 97.5th percentile of the replicates for 95%).
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_REPLICATES = 1000
DEFAULT_SEED = 0
LEVEL = 0.95


def window_indices(n_windows: int, replicates: int = DEFAULT_REPLICATES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """(B, W) window indices drawn with replacement; one draw shared by every run compared."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.integers(0, n_windows, size=(replicates, n_windows))


def seed_indices(n_seeds: int, replicates: int, seed: int) -> np.ndarray:
    """(B, S) seed indices drawn with replacement (a stream of its own, so adding a configuration
    does not change the windows drawn for the others)."""
    rng = np.random.Generator(np.random.PCG64([seed, n_seeds, 1]))
    return rng.integers(0, n_seeds, size=(replicates, n_seeds))


def ratio(num_W: np.ndarray, den_W: np.ndarray) -> float:
    den = float(np.sum(den_W))
    return float(np.sum(num_W)) / den if den > 0 else math.nan


def ratio_replicates(num_W: np.ndarray, den_W: np.ndarray, idx_BW: np.ndarray) -> np.ndarray:
    """(B,) sum(num[idx]) / sum(den[idx]) for each replicate's windows."""
    num = np.asarray(num_W, dtype=np.float64)[idx_BW].sum(axis=1)
    den = np.asarray(den_W, dtype=np.float64)[idx_BW].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def seed_mean_replicates(num_SW: np.ndarray, den_SW: np.ndarray, idx_BW: np.ndarray,
                         seeds_BS: np.ndarray) -> np.ndarray:
    """(B,) mean over resampled seeds of each seed's ratio over the resampled windows."""
    per_seed = np.stack([ratio_replicates(n, d, idx_BW) for n, d in zip(num_SW, den_SW)])  # (S, B)
    picked = per_seed[seeds_BS.T, np.arange(idx_BW.shape[0])]  # (S, B): seed seeds_BS[b, s] in replicate b
    return picked.mean(axis=0)


def percentile_interval(replicates_B: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """(low, high) percentile interval of the finite replicates; NaNs when there are none."""
    values = np.asarray(replicates_B, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def standard_error(replicates_B: np.ndarray) -> float:
    values = np.asarray(replicates_B, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.std(ddof=1)) if values.size > 1 else math.nan
