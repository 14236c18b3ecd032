"""Training stages: a plan of consecutive stages read from a TOML file, checked, with defaults resolved.

A stage file holds `[[stage]]` tables. Each stage trains for `steps` optimizer steps on its own
`data` (data specs, as `--data` takes them) mixed by `weights` (the chance a training window is
drawn from each entry; equal when omitted), trains only the parameter `train` groups (the others
stay bit-identical: no gradient, no optimizer-state update, no weight decay), scales the peak
learning rate by `lr_scale` with its own linear `warmup` and cosine decay over the stage, computes
the LM loss over `loss_on` tokens, and may set the router options that can change while training:
`aux_loss_weight`, `z_loss_weight`, `capacity_factor`. Unset values come from the run's config, and
the resolved plan (every value explicit) is what a checkpoint stores, so a resumed run compares
plans, not files. No MLX here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from tinymoe.config import tomllib
from tinymoe.errors import TinyMoeError
from tinymoe.names import LOSS_ON, PARAM_GROUPS

# Settings of the model config a stage may change (no effect on the weights' shapes).
ROUTER_SETTINGS = ("aux_loss_weight", "z_loss_weight", "capacity_factor")
MAX_STAGES = 1000


@dataclass
class Stage:
    name: str
    steps: int
    data: list
    weights: list
    train: list = field(default_factory=lambda: ["all"])
    lr_scale: float = 1.0
    warmup: int = 0
    loss_on: str = "all"
    aux_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    capacity_factor: float = 0.0


_KEYS = [f.name for f in dataclasses.fields(Stage)]  # in order, for messages


def group_of(param_name: str) -> str:
    """The parameter group of a weight, by its checkpoint name (`blocks.3.moe.router.weight`)."""
    parts = param_name.split(".")
    if parts[0] in ("embed", "lm_head", "norm"):
        return "embeddings"  # the input embedding, the output head and the final norm before it
    if parts[0] == "blocks" and len(parts) > 2:
        if parts[2] in ("attn", "attn_norm"):
            return "attention"
        if parts[2] in ("ffn", "ffn_norm"):
            return "ffn"  # dense FFN layers, and the norm in front of every FFN or MoE layer
        if parts[2] == "moe" and len(parts) > 3 and parts[3] in ("router", "experts", "shared"):
            return parts[3]
    raise TinyMoeError(f"weight '{param_name}' belongs to no parameter group")


def trains(stage: Stage, param_name: str) -> bool:
    return "all" in stage.train or group_of(param_name) in stage.train


def _fail(where: str, message: str):
    raise TinyMoeError(f"{where}: {message}")


def _number(value, kind, where: str, key: str):
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            _fail(where, f"'{key}' must be an integer, got {value!r}")
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        _fail(where, f"'{key}' must be a finite number, got {value!r}")
    return float(value)


def _strings(value, where: str, key: str) -> list:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(where, f"'{key}' must be a list of strings, got {value!r}")
    return list(value)


def _stage(raw, index: int, source: str, model, train) -> Stage:
    where = f"{source}: stage {index + 1}"
    if not isinstance(raw, dict):
        _fail(where, f"expected a table ([[stage]]), got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        _fail(where, f"unknown setting '{unknown[0]}' (known: {', '.join(_KEYS)})")
    name = raw.get("name", f"stage{index + 1}")
    if not isinstance(name, str) or not name.strip() or "\n" in name:
        _fail(where, f"'name' must be a non-empty one-line string, got {name!r}")
    where = f"{source}: stage {index + 1} ({name})"
    if "steps" not in raw:
        _fail(where, "no 'steps' (how many optimizer steps the stage trains)")
    steps = _number(raw["steps"], int, where, "steps")
    if not 0 < steps <= 2**31 - 1:
        _fail(where, f"'steps' must be positive, got {steps}")
    data = _strings(raw.get("data", []), where, "data")
    if not data or not all(d.strip() for d in data):
        _fail(where, "no 'data' (a list of files, directories, globs or DOMAIN=PATH specs)")
    if "weights" in raw:
        weights = raw["weights"]
        if not isinstance(weights, list):
            _fail(where, f"'weights' must be a list of numbers, got {weights!r}")
        weights = [_number(w, float, where, "weights") for w in weights]
        if len(weights) != len(data):
            _fail(where, f"{len(weights)} weights for {len(data)} data entries; give one weight per entry")
        if any(w < 0 for w in weights) or not sum(weights) > 0:
            _fail(where, f"'weights' must be >= 0 with a positive sum, got {weights}")
    else:
        weights = [1.0] * len(data)
    groups = _strings(raw.get("train", ["all"]), where, "train")
    for group in groups:
        if group not in PARAM_GROUPS:
            _fail(where, f"unknown parameter group '{group}' in 'train' (choose from {', '.join(PARAM_GROUPS)})")
    if not groups:
        _fail(where, "'train' names no parameter group")
    lr_scale = _number(raw.get("lr_scale", 1.0), float, where, "lr_scale")
    if not lr_scale > 0:
        _fail(where, f"'lr_scale' must be positive, got {lr_scale}")
    warmup = _number(raw.get("warmup", min(train.warmup_steps, steps)), int, where, "warmup")
    if not 0 <= warmup <= steps:
        _fail(where, f"'warmup' must be in [0, steps = {steps}], got {warmup}")
    loss_on = raw.get("loss_on", train.loss_on)
    if loss_on not in LOSS_ON:
        _fail(where, f"'loss_on' must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    router = {}
    for key in ROUTER_SETTINGS:
        value = _number(raw.get(key, getattr(model, key)), float, where, key)
        if value < 0:
            _fail(where, f"'{key}' must be >= 0, got {value}")
        router[key] = value
    if router["capacity_factor"] and not model.is_moe:
        _fail(where, "'capacity_factor' needs an MoE model (moe_experts > 1)")
    return Stage(name.strip(), steps, data, [w / sum(weights) for w in weights], groups, lr_scale, warmup, loss_on,
                 **router)


def parse_stages(raw: dict, source: str, model, train) -> list[Stage]:
    """The checked plan of a parsed stage file: `{"stage": [table, ...]}`."""
    if not isinstance(raw, dict):
        _fail(source, "not a table of [[stage]] entries")
    unknown = sorted(set(raw) - {"stage"})
    if unknown:
        _fail(source, f"unknown section '{unknown[0]}' (a stage file holds [[stage]] tables)")
    tables = raw.get("stage")
    if not isinstance(tables, list) or not tables:
        _fail(source, "no [[stage]] tables")
    if len(tables) > MAX_STAGES:
        _fail(source, f"{len(tables)} stages; at most {MAX_STAGES}")
    stages = [_stage(t, i, source, model, train) for i, t in enumerate(tables)]
    if sum(s.steps for s in stages) > 2**31 - 1:
        _fail(source, "the stages' steps add up to more than 2**31 - 1")
    return stages


def load_stages(path: str, model, train) -> list[Stage]:
    """Read and check stage file `path` against the run's model and train config."""
    file = Path(path)
    if not file.is_file():
        raise TinyMoeError(f"stage file not found: {path}")
    try:
        raw = tomllib.loads(file.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise TinyMoeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise TinyMoeError(f"{path}: invalid TOML: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise TinyMoeError(f"{path}: invalid TOML: {exc}") from None
    return parse_stages(raw, str(path), model, train)


# ----------------------------------------------------------------------------- the plan at run time


def total_steps(stages: list[Stage]) -> int:
    return sum(s.steps for s in stages)


def starts(stages: list[Stage]) -> list[int]:
    """The global step each stage starts at."""
    out, at = [], 0
    for s in stages:
        out.append(at)
        at += s.steps
    return out


def stage_at(stages: list[Stage], step: int) -> int:
    """The index of the stage that trains global step `step` (0-based; the last one past the end)."""
    for i, start in enumerate(starts(stages)):
        if step < start + stages[i].steps:
            return i
    return len(stages) - 1


def all_specs(stages: list[Stage]) -> list[str]:
    """Every data spec of the plan once, in order of first use."""
    seen = []
    for s in stages:
        seen.extend(d for d in s.data if d not in seen)
    return seen


def to_dicts(stages: list[Stage]) -> list[dict]:
    return [dataclasses.asdict(s) for s in stages]


def from_dicts(raw, where: str) -> list[Stage]:
    """The plan a checkpoint stored (`to_dicts`), checked like a stage file's."""
    if not isinstance(raw, list) or not raw or not all(isinstance(r, dict) for r in raw):
        raise TinyMoeError(f"{where}: the stored stage plan is malformed")
    try:
        return [Stage(**r) for r in raw]
    except TypeError as exc:
        raise TinyMoeError(f"{where}: the stored stage plan is malformed ({exc})") from None


def plan_change(old: list[Stage], new: list[Stage], step: int) -> str | None:
    """Why `new` cannot continue a run planned as `old` that is at global `step`, or None: the
    stages already begun (the current one included) must be the same."""
    begun = stage_at(old, step) + 1 if step < total_steps(old) else len(old)
    for i in range(begun):
        if i >= len(new):
            return f"stage {i + 1} ({old[i].name}) has begun or finished but is missing from the new stage file"
        if old[i] != new[i]:
            diff = next(k for k in _KEYS if getattr(old[i], k) != getattr(new[i], k))
            return (f"stage {i + 1} ({old[i].name}) has begun or finished and its '{diff}' changed "
                    f"({getattr(old[i], diff)!r} -> {getattr(new[i], diff)!r}); only later stages may change")
    return None


def history(stages: list[Stage], step: int) -> list[dict]:
    """Per stage: name, its first and last global step, status (done, current, planned)."""
    out, start = [], 0
    for s in stages:
        end = start + s.steps
        status = "done" if step >= end else "current" if step >= start else "planned"
        out.append({"name": s.name, "first_step": start + 1, "last_step": end, "status": status,
                    "train": list(s.train), "loss_on": s.loss_on})
        start = end
    return out
