"""The plan of a sweep: grid points, their dense twins and seeds, as a list of named runs.

No MLX here: a plan is arithmetic on configs (tinymoe.config, tinymoe.planner), so `tinymoe sweep
--dry-run` answers at once and the twin matching can be tested without building a model.

A grid is `{config key: [values]}`; its points are the Cartesian product, each applied to the
preset with `--set` semantics (tinymoe.config.apply_overrides). A dense point (moe_experts 1)
drops every MoE-only setting, so `moe_experts=1,8 x moe_topk=1,2` has one dense point, not two.

Twin matching. For each MoE point, `match` adds a dense twin: the same settings with one expert
and the FFN width `d_ff` chosen so the twin's active (`active-params`) or total (`total-params`)
parameter count is nearest to the MoE point's *without its router weights* (E x d_model per MoE
layer, which a dense model has no counterpart for). Parameter counts are linear in d_ff, so the
nearest integer width is found in closed form and then checked with the planner's own count. Twins
that come out identical to another run (top-1 points whose experts are as wide as the dense FFN
share one twin: the dense model) are run once.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

from tinymoe.config import ModelConfig, TrainConfig, apply_overrides, load_preset, to_dict, validate
from tinymoe.errors import TinyMoeError
from tinymoe.planner import param_counts
from tinymoe.router_registry import router_params

MATCHES = ("active-params", "total-params", "none")

# Settings that mean nothing to a dense model: a dense point keeps the preset's (default) values.
MOE_ONLY = ("moe_topk", "expert_hidden", "moe_every", "moe_first_dense", "router_norm", "aux_loss_weight",
            "z_loss_weight", "router", "router_order", "noise_scale", "jitter_eps", "bias_rate", "router_groups",
            "router_group_topk", "entropy_weight", "capacity_factor", "eval_capacity_factor", "k_min", "k_max",
            "dynamic_threshold", "shared_experts")

# Keys a grid may not vary: they decide where and how the sweep itself runs.
NOT_GRID = ("data", "seed", "steps", "teacher_cache")


@dataclasses.dataclass
class PlannedRun:
    name: str  # folder name under the sweep
    overrides: dict  # config key -> value, on top of the preset (and the sweep's fixed settings)
    role: str  # "point" (from the grid) or "twin" (added by matching)
    point: str  # the name without its seed: runs that differ only in seed share it
    seed: int
    twin_of: list = dataclasses.field(default_factory=list)  # points whose twin this run is

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def split_keys(overrides: dict) -> tuple[dict, dict]:
    """(model overrides, train overrides); an unknown key is an error."""
    model, train = {}, {}
    for key, value in overrides.items():
        if key in ModelConfig.__dataclass_fields__:
            model[key] = value
        elif key in TrainConfig.__dataclass_fields__:
            train[key] = value
        else:
            raise TinyMoeError(f"--grid/--set: unknown setting '{key}' (a [model] or [train] key of a preset)")
    return model, train


def configs(preset: str, overrides: dict) -> tuple[ModelConfig, TrainConfig]:
    """The preset with `overrides` applied and checked, as the run will be trained."""
    model_over, train_over = split_keys(overrides)
    model_cfg, train_cfg = load_preset(preset)
    model_cfg = apply_overrides(model_cfg, model_over, "--grid/--set")
    if not model_cfg.is_moe:  # a dense run: the preset's MoE settings mean nothing (moe_topk 2 of 1 expert)
        model_cfg = dataclasses.replace(model_cfg, **{k: getattr(ModelConfig(), k) for k in MOE_ONLY})
    train_cfg = apply_overrides(train_cfg, train_over, "--grid/--set")
    validate(model_cfg, train_cfg)
    return model_cfg, train_cfg


def _value_text(value) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def _axes(grid: dict) -> list[tuple[tuple, list[tuple]]]:
    """The grid's axes: a key `a` with values [1, 2], or keys zipped as `a,b` with values
    [[1, 2], [3, 4]] (a=1 b=2, then a=3 b=4: points a full product would not pick alone)."""
    axes = []
    for key, values in grid.items():
        keys = tuple(k.strip() for k in key.split(","))
        if not values:
            raise TinyMoeError(f"--grid {key}: no values")
        if len(keys) == 1:
            axes.append((keys, [(v,) for v in values]))
            continue
        rows = [tuple(v) if isinstance(v, (list, tuple)) else (v,) for v in values]
        bad = [r for r in rows if len(r) != len(keys)]
        if bad or not all(keys):
            raise TinyMoeError(f"--grid {key}: each value needs {len(keys)} parts joined by ':' (e.g. 8:2)")
        axes.append((keys, rows))
    return axes


def run_name(overrides: dict, keys: list[str]) -> str:
    """A folder name from the settings a run varies, in grid order: moe_experts-8_moe_topk-2."""
    parts = [f"{k}-{_value_text(overrides[k])}" for k in keys if k in overrides]
    return "_".join(parts) or "base"


def _dense(overrides: dict, preset: str, fixed: dict) -> dict:
    """A dense point's overrides: the MoE-only settings dropped (moe_topk 2 of one expert means nothing)."""
    experts = overrides.get("moe_experts", fixed.get("moe_experts", load_preset(preset)[0].moe_experts))
    if not isinstance(experts, int) or experts > 1:
        return overrides
    return {k: v for k, v in overrides.items() if k not in MOE_ONLY}


def _matched_params(model_cfg: ModelConfig, match: str) -> int:
    counts = param_counts(model_cfg)
    routers = sum(1 for i in range(model_cfg.n_layers) if model_cfg.layer_is_moe(i)) * router_params(model_cfg)
    return (counts.active if match == "active-params" else counts.total) - routers


def twin_width(model_cfg: ModelConfig, match: str) -> int:
    """The dense FFN width whose model has the parameter count (`match`) nearest the MoE model's
    without its routers."""
    target = _matched_params(model_cfg, match)
    dense = {k: getattr(ModelConfig(), k) for k in MOE_ONLY}

    def count(d_ff: int) -> int:
        return param_counts(dataclasses.replace(model_cfg, moe_experts=1, **dense, d_ff=d_ff)).total

    slope = count(2) - count(1)  # parameters per unit of d_ff (3 x d_model x layers)
    base = count(1) - slope
    width = max(1, round((target - base) / slope))
    return min((w for w in (width - 1, width, width + 1) if w >= 1), key=lambda w: (abs(count(w) - target), w))


def plan_sweep(preset: str, grid: dict, fixed: dict, seeds: int, match: str) -> list[PlannedRun]:
    """The runs of a sweep, points first in grid order, then the twins, each seed after the other."""
    if match not in MATCHES:
        raise TinyMoeError(f"unknown --match '{match}' (choose from {', '.join(MATCHES)})")
    if seeds < 1:
        raise TinyMoeError(f"--seeds must be at least 1, got {seeds}")
    axes = _axes(grid)
    for key in [k for keys, _ in axes for k in keys]:
        if key in NOT_GRID:
            raise TinyMoeError(f"--grid {key}: this setting belongs to the whole sweep "
                               f"({'use --seeds' if key == 'seed' else 'use --' + key.replace('_', '-')})")
        if key in fixed:
            raise TinyMoeError(f"{key} is both in --grid and --set; keep one")
    split_keys({**{k: None for keys, _ in axes for k in keys}, **fixed})  # unknown keys: one line first
    keys = [k for ks, _ in axes for k in ks]
    if len(set(keys)) != len(keys):
        raise TinyMoeError("--grid: a key appears in two --grid options")
    _, base_train = configs(preset, fixed)
    points, seen = [], set()
    for combo in itertools.product(*[values for _, values in axes]):
        over = _dense({k: v for (ks, _), vs in zip(axes, combo) for k, v in zip(ks, vs)}, preset, fixed)
        model_cfg, _ = configs(preset, {**fixed, **over})
        frozen = tuple(sorted(over.items(), key=lambda kv: kv[0]))
        if frozen not in seen:
            seen.add(frozen)
            points.append((run_name(over, keys), over, model_cfg))
    twins: dict = {}  # frozen overrides -> (name, overrides, [points])
    if match != "none":
        names = {tuple(sorted(o.items())): n for n, o, _ in points}
        for name, over, model_cfg in points:
            if not model_cfg.is_moe:
                continue
            twin = {k: v for k, v in over.items() if k not in MOE_ONLY and k != "expert_hidden"}
            twin["moe_experts"] = 1
            width = twin_width(model_cfg, match)
            base_width = configs(preset, {**fixed, **twin})[0].d_ff
            if width != base_width:
                twin["d_ff"] = width
            frozen = tuple(sorted(twin.items()))
            if frozen in names:  # the grid has it already (e.g. the dense point): no second run
                existing = names[frozen]
                twins.setdefault(frozen, (existing, twin, [], True))[2].append(name)
                continue
            twins.setdefault(frozen, (run_name(twin, keys + ["d_ff"]), twin, [], False))[2].append(name)
    runs = []
    seed_values = [base_train.seed + i for i in range(seeds)]
    twin_points = {entry[0]: entry[2] for entry in twins.values()}
    for seed in seed_values:
        suffix = f"_seed-{seed}" if seeds > 1 else ""
        for name, over, _ in points:
            runs.append(PlannedRun(name + suffix, over, "point", name, seed, twin_points.get(name, [])))
        for name, over, of, in_grid in twins.values():
            if not in_grid:
                runs.append(PlannedRun(name + suffix, over, "twin", name, seed, of))
    return runs


def full_overrides(run: PlannedRun, fixed: dict, steps: int | None) -> dict:
    """Everything a run sets on top of its preset: the sweep's fixed settings, its own, its seed."""
    over = {**fixed, **run.overrides, "seed": run.seed}
    if steps is not None:
        over["steps"] = steps
    return over


def planned_dict(preset: str, grid: dict, fixed: dict, seeds: int, match: str, steps: int | None,
                 data: list) -> dict:
    """What a sweep folder records, so that a rerun with other settings is refused."""
    return {"preset": preset, "grid": {k: list(v) for k, v in grid.items()}, "set": dict(fixed), "seeds": seeds,
            "match": match, "steps": steps, "data": list(data)}


def describe(run: PlannedRun, preset: str, fixed: dict, steps: int | None) -> dict:
    """A run's configs and parameter counts, for --dry-run and the sweep record."""
    model_cfg, train_cfg = configs(preset, full_overrides(run, fixed, steps))
    counts = param_counts(model_cfg)
    return {**run.to_dict(), "params_total": counts.total, "params_active": counts.active,
            "steps": train_cfg.steps, "model": to_dict(model_cfg)}
