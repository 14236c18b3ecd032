"""Lean optimizer state for MoE training: `sparse-adamw`, AdamW with lazy per-expert state.

AdamW keeps two moments for every weight, so an MoE with E experts per layer pays for E experts'
moments whether or not tokens reach them. `SparseAdamW` treats each expert slice [e] of a stacked
expert tensor (names containing `.moe.experts.`) as its own parameter:

- an expert is *active* in a step when its gradient slice is not all zero, which happens exactly
  when at least one token of the step was routed to it (the gradient of an expert no token chose
  is an exact zero in every dispatch backend);
- the first time an expert is active its moments are created (zeros), and it is updated by
  exactly AdamW's formulas (mlx.optimizers.AdamW, same operation order): decoupled weight decay
  w * (1 - lr * wd), m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, w - lr m / (sqrt(v) + eps);
  with bias correction (off by default, as in mlx's AdamW and the trainer) the correction uses
  the number of steps *that expert* was updated;
- an idle expert is left completely alone: no weight decay, no moment decay. AdamW instead
  decays the idle expert's weights by (1 - lr wd) each step and keeps moving it with its old
  momentum (m shrinks by b1 per step but is not zero). So the two optimizers agree exactly when
  every expert is active every step (tests/test_optimizers.py, bitwise) and differ otherwise.

Non-expert weights get ordinary AdamW. `state_dtype="bfloat16"` stores the moments in bfloat16
(half the bytes) and computes the update in float32; that is no longer bit-identical to AdamW.

The active set is read on the host each step, so the update is not `mx.compile`d
(`compilable = False`; the trainer runs it eagerly). State is a flat name -> array dict, saved in
optimizer.safetensors as `<param>.m`/`.v` and, per expert, `<param>.expert<E>.m`/`.v`/`.t`.
`--optimizer adafactor` (tinymoe.optim.adafactor) applies the same active-expert rule to factored
second-moment statistics.
"""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from tinymoe.errors import TinyMoeError
from tinymoe.names import OPTIMIZER_STATE_DTYPES as STATE_DTYPES, OPTIMIZERS  # noqa: F401 (defined in names)
_EXPERT_KEY = re.compile(r"(.+)\.expert(\d+)\.(\w+)")  # <param>.expert<E>.<part>


def is_expert_param(name: str) -> bool:
    return ".moe.experts." in name


def active_experts(grads: dict, names: list[str]) -> list[np.ndarray]:
    """Per expert tensor (E, ...), an (E,) bool mask of the experts whose gradient slice is not
    all zero. One host sync for all of them."""
    masks = [mx.any(grads[n] != 0, axis=tuple(range(1, grads[n].ndim))) for n in names]
    mx.eval(masks)
    return [np.array(m) for m in masks]


def pack_state(step: int, lr: mx.array, dense: dict, experts: dict) -> dict:
    """The flat name -> array dict a lean optimizer saves (optimizer.safetensors): `step`,
    `learning_rate`, `<param>.<part>` per non-expert weight and `<param>.expert<E>.<part>` per
    expert with state, its own update count `t` as uint32."""
    flat = {"step": mx.array(step, dtype=mx.uint64), "learning_rate": lr}
    for name, st in dense.items():
        flat.update({f"{name}.{k}": a for k, a in st.items()})
    for name, per in experts.items():
        for e, st in per.items():
            flat.update({f"{name}.expert{e}.{k}": mx.array(a, dtype=mx.uint32) if k == "t" else a
                         for k, a in st.items()})
    return flat


def unpack_state(tree, parts: tuple[str, ...], owner: str) -> tuple[int, mx.array, dict, dict]:
    """(step, learning_rate, dense, experts) from `pack_state`'s dict or its tree_unflatten'ed
    form; `parts` are the names `owner` keeps per weight (plus `t` per expert)."""
    flat = dict(tree_flatten(tree))
    try:
        step = int(flat.pop("step").item())
        lr = flat.pop("learning_rate").astype(mx.float32)
    except KeyError as exc:
        raise TinyMoeError(f"optimizer state lacks '{exc.args[0]}'; was it saved by {owner}?") from None
    dense, experts = {}, {}
    for key, arr in flat.items():
        match = _EXPERT_KEY.fullmatch(key)
        if match and match.group(3) in (*parts, "t"):
            name, e, part = match.group(1), int(match.group(2)), match.group(3)
            slot = experts.setdefault(name, {}).setdefault(e, {})
            slot[part] = int(arr.item()) if part == "t" else arr
            continue
        name, _, part = key.rpartition(".")
        if part not in parts:
            raise TinyMoeError(f"optimizer state has an unexpected entry '{key}'; was it saved by {owner}?")
        dense.setdefault(name, {})[part] = arr
    return step, lr, dense, experts


class LazyExpertOptimizer:
    """What the lean optimizers share: per-expert state created on first use (`experts`: name ->
    expert -> state, with its update count `t`), non-expert state in `dense`, an eager update
    (`compilable = False`: the active experts are found on the host) and the flat checkpoint
    form of `pack_state`. Subclasses set `kind` and `state_parts` and define `_update_dense` and
    `_update_experts`."""

    compilable = False
    kind = ""
    state_parts: tuple[str, ...] = ()

    @property
    def learning_rate(self) -> mx.array:
        return self._lr

    def apply_gradients(self, gradients, parameters) -> dict:
        """New flat name -> weight for every weight with a gradient: `_update_dense` for each
        non-expert weight, `_update_experts` for each expert tensor with its active-expert mask."""
        if self.schedule is not None:
            self._lr = mx.array(self.schedule(self.step), dtype=mx.float32)
        self.step += 1
        params = dict(tree_flatten(parameters))
        grads = dict(tree_flatten(gradients))
        # Low-precision weights (tinymoe.nn.precision) are updated in float32 and rounded back
        # stochastically, keyed by (step, tensor index): the same on a resumed run.
        low = {n: params[n].dtype for n in grads if params[n].dtype in (mx.bfloat16, mx.float16)}
        for name in low:
            params[name], grads[name] = params[name].astype(mx.float32), grads[name].astype(mx.float32)
        expert_names = [n for n in grads if is_expert_param(n)]
        out = {name: self._update_dense(name, g, params[name]) for name, g in grads.items()
               if name not in expert_names}
        for name, mask in zip(expert_names, active_experts(grads, expert_names)):
            out[name] = self._update_experts(name, grads[name], params[name], mask)
        if low:
            from tinymoe.optim.rounding import round_to

            for i, name in enumerate(sorted(low)):
                out[name] = round_to(out[name], low[name], mx.array([self.step, i], dtype=mx.uint32))
        return out

    def update(self, model, gradients) -> None:
        from mlx.utils import tree_unflatten

        model.update(tree_unflatten(list(self.apply_gradients(gradients, model.parameters()).items())))

    @property
    def state(self) -> dict:
        return pack_state(self.step, self._lr, self.dense, self.experts)

    @state.setter
    def state(self, tree) -> None:
        """Restore from `state` (flat) or its tree_unflatten'ed form (what the trainer passes)."""
        self.step, self._lr, self.dense, self.experts = unpack_state(tree, self.state_parts, self.kind)
        self._check_state()

    def snapshot(self) -> tuple:
        """Everything an update changes, to undo it (tinymoe.train.step's rollback of a step
        that made weights non-finite): the arrays are immutable, so copying the containers
        that updates modify in place (down to each expert's state dict) is enough."""
        return (self.step, self._lr, {n: dict(st) for n, st in self.dense.items()},
                {n: {e: dict(st) for e, st in per.items()} for n, per in self.experts.items()})

    def restore(self, saved: tuple) -> None:
        step, lr, dense, experts = saved
        self.step, self._lr = step, lr
        self.dense = {n: dict(st) for n, st in dense.items()}
        self.experts = {n: {e: dict(st) for e, st in per.items()} for n, per in experts.items()}

    def _check_state(self) -> None:
        """Subclasses may check a restored state's shape here."""

    def state_bytes(self) -> int:
        return sum(a.nbytes for a in self.state.values())
