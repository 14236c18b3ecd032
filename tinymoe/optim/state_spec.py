"""What a saved optimizer state must hold for a model: checked before resuming and by validate.

Each optimizer keeps state per trainable weight (frozen weights, such as the sigmoid-bias
router's balancing bias, have none), plus `step` (an integer count) and `learning_rate`:

- `adamw` (mlx.optimizers.AdamW): `<w>.m` and `<w>.v`, shaped like the weight;
- `sparse-adamw`: the same for non-expert weights; an expert tensor (E, ...) has state only for
  the experts that have been used: `<w>.expert<e>.m`/`.v` shaped like one expert, and `.t`;
- `adafactor`: `<w>.vr`/`.vc` (factored over the last two dims) or `<w>.v` (vectors); experts
  as sparse-adamw, with those statistics per expert.

An optimizer restored from a state lacking an entry either crashes in its first update or,
worse, silently starts that moment from zero (mlx's AdamW re-initialises missing weights), so
the resume would not be the run it continues. `state_problems` lists every missing, unexpected,
misshapen or wrongly typed entry, working only from names, shapes and dtypes (the manifest's
tensor index): nothing is loaded.
"""

from __future__ import annotations

import re

from tinymoe.optim.adafactor import _stat_shapes
from tinymoe.names import OPTIMIZERS
from tinymoe.optim.lazy import is_expert_param

FLOATS = ("float32", "float16", "bfloat16")
INTEGERS = ("uint64", "int64", "uint32", "int32")
_EXPERT_KEY = re.compile(r"(.+)\.expert(\d+)\.(\w+)")  # <param>.expert<E>.<part>


def _layout(kind: str, weights: dict, trainable: set) -> tuple[dict, dict]:
    """(required: name -> (shape, dtypes), lazy: expert weight -> (E, {part: (shape, dtypes)}))."""
    required = {"step": ([], INTEGERS), "learning_rate": ([], FLOATS)}
    lazy = {}
    for name in sorted(trainable):
        shape = list(weights[name])
        if kind == "adamw" or (kind == "sparse-adamw" and not is_expert_param(name)):
            required.update({f"{name}.m": (shape, FLOATS), f"{name}.v": (shape, FLOATS)})
        elif kind == "sparse-adamw":
            lazy[name] = (shape[0], {"m": (shape[1:], FLOATS), "v": (shape[1:], FLOATS), "t": ([], INTEGERS)})
        elif not is_expert_param(name):  # adafactor
            required.update({f"{name}.{k}": (list(s), FLOATS) for k, s in _stat_shapes(tuple(shape)).items()})
        else:
            parts = {k: (list(s), FLOATS) for k, s in _stat_shapes(tuple(shape[1:])).items()}
            lazy[name] = (shape[0], {**parts, "t": ([], INTEGERS)})
    return required, lazy


def state_problems(kind: str, weights: dict, trainable: set, state: dict) -> list[str]:
    """Problems (one line each, without a file prefix) of optimizer state `state` (name ->
    (shape, dtype)) for optimizer `kind` and weights `weights` (name -> shape), of which the
    names in `trainable` are trained."""
    if kind not in OPTIMIZERS:
        return [f"unknown optimizer '{kind}' in the train config (choose from {', '.join(OPTIMIZERS)})"]
    required, lazy = _layout(kind, weights, trainable)
    problems, groups = [], {}

    def check(name, shape, dtype, want):
        want_shape, dtypes = want
        if list(shape) != want_shape:
            problems.append(f"'{name}' has shape {list(shape)}, {kind} needs {want_shape}")
        elif dtype not in dtypes:
            problems.append(f"'{name}' has dtype {dtype}, {kind} needs one of {', '.join(dtypes)}")

    for name, (shape, dtype) in state.items():
        if name in required:
            check(name, shape, dtype, required[name])
            continue
        m = _EXPERT_KEY.fullmatch(name)
        if m and m.group(1) in lazy and int(m.group(2)) < lazy[m.group(1)][0] and m.group(3) in lazy[m.group(1)][1]:
            param, e, part = m.group(1), int(m.group(2)), m.group(3)
            check(name, shape, dtype, lazy[param][1][part])
            groups.setdefault((param, e), set()).add(part)
            continue
        problems.append(f"'{name}' is not state that {kind} keeps for this model")
    for name in required:
        if name not in state:
            problems.append(f"'{name}' is missing ({kind} keeps it for every trainable weight)")
    for (param, e), parts in sorted(groups.items()):
        for part in sorted(set(lazy[param][1]) - parts):
            problems.append(f"'{param}.expert{e}.{part}' is missing (the other state of expert {e} is there)")
    return problems
