"""Strict JSON for everything tinymoe writes: metrics.jsonl, manifests, config files, `--json`.

Python's `json.dumps` writes `NaN` and `Infinity` by default. That is not JSON: `jq`, JavaScript,
Go and most other readers reject the whole file, and a single diverged loss would make a run's
metrics unreadable. The docs promise `null` for a number that is not finite, so every writer goes
through `dumps` here: `strict` turns non-finite floats (and numpy scalars) into plain JSON values,
then `allow_nan=False` makes any value that still slips through fail here, loudly, rather than in
somebody's reader. No numpy or MLX import.
"""

from __future__ import annotations

import json
import math


def strict(obj):
    """A copy of `obj` with every non-finite float replaced by None, tuples as lists, and numpy
    scalars and arrays as Python numbers and lists."""
    if isinstance(obj, float):  # also numpy.float64, a float subclass
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {key: strict(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(value) for value in obj]
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):  # np.float32, np.int64, ndarray
        return strict(obj.tolist())
    return obj  # anything else: json.dumps decides (and raises TypeError for what it cannot write)


def dumps(obj, **kwargs) -> str:
    """`json.dumps` of `strict(obj)` that can only produce valid JSON (NaN/inf are null)."""
    try:  # the common case, nothing to replace: no second walk over a large `route --json` answer
        return json.dumps(obj, allow_nan=False, **kwargs)
    except (ValueError, TypeError):  # a non-finite float, or a numpy scalar
        return json.dumps(strict(obj), allow_nan=False, **kwargs)
