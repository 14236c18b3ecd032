"""Model and training configuration: dataclasses, TOML presets, checked overrides.

A preset is a TOML file with a `[model]` and a `[train]` table (see presets/). Flags and
`key=value` overrides are applied on top with `apply_overrides`, which rejects unknown keys and
wrong types; `validate` rejects impossible combinations. Every problem is a one-line
`TinyMoeError`, which the CLI reports with exit code 2. No MLX import here.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from tinymoe.domains import check_domain_settings
from tinymoe.errors import TinyMoeError
from tinymoe.precision_check import check_precision_settings
from tinymoe.names import DISPATCH_CHOICES, LOSS_ON, OPTIMIZER_STATE_DTYPES, OPTIMIZERS
from tinymoe.router_registry import check_router

# Integer bounds, checked by `validate`. Sizes, counts and step numbers reach MLX as int32 (a
# larger value raises OverflowError, or crashes inside an allocation); a seed is any value a TOML
# preset can hold (signed 64-bit), all of which mx.random.seed and numpy's generators accept.
MAX_INT = 2**31 - 1
MAX_SEED = 2**63 - 1
# Float settings reach MLX as float32: beyond its range they are inf, below its smallest normal
# number a positive epsilon or RoPE base is 0 (and training is NaN from the first step).
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38
_PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4  # grouped-query attention when < n_heads
    context: int = 256  # maximum sequence length (tokens)
    d_ff: int = 512  # hidden size of a dense SwiGLU FFN
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attn_bias: bool = False  # biases on the q/k/v projections (Qwen2-style models)
    # Mixture of experts. moe_experts == 1 means every FFN is dense.
    moe_experts: int = 1
    moe_topk: int = 1
    expert_hidden: int = 0  # hidden size of one expert; 0 = d_ff
    moe_every: int = 1  # MoE in every Nth layer (layers N-1, 2N-1, ...)
    moe_first_dense: int = 0  # the first N layers stay dense
    router_norm: bool = True  # renormalise the top-k gates to sum to 1
    aux_loss_weight: float = 0.01  # Switch load-balancing loss
    z_loss_weight: float = 0.001  # router z-loss (ST-MoE)
    # Routers and balancing (docs/routers.md; tinymoe.router_registry says which router reads what).
    router: str = "topk"  # topk switch noisy jitter sigmoid-bias expert-choice smart dynamic
    router_order: str = "softmax-topk"  # or topk-softmax (Mixtral: softmax over the k logits)
    noise_scale: float = 1.0  # noisy: scale of the learned-std Gaussian logit noise (0 = none)
    jitter_eps: float = 0.01  # jitter/switch/smart: router input x U(1-eps, 1+eps) in training
    bias_rate: float = 0.001  # sigmoid-bias: balancing-bias step per optimizer step
    router_groups: int = 1  # node-limited routing: experts in this many groups ...
    router_group_topk: int = 1  # ... and a token picks from its best this many groups
    entropy_weight: float = -1.0  # entropy bonus; -1 = router default (0.01 for smart, else 0)
    capacity_factor: float = 0.0  # expert capacity in training; 0 = dropless
    eval_capacity_factor: float = 0.0  # expert capacity in eval mode; 0 = dropless
    k_min: int = 1  # dynamic: fewest experts per token
    k_max: int = 0  # dynamic: most experts per token; 0 = moe_topk
    dynamic_threshold: float = 0.5  # dynamic: probability mass the chosen experts must reach
    shared_experts: int = 0  # always-active experts (one dense SwiGLU of N x expert width)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def expert_d_ff(self) -> int:
        return self.expert_hidden or self.d_ff

    @property
    def is_moe(self) -> bool:
        return self.moe_experts > 1

    def layer_is_moe(self, layer: int) -> bool:
        if not self.is_moe or layer < self.moe_first_dense:
            return False
        return (layer + 1) % self.moe_every == 0


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 0  # 0 = only at the end
    log_every: int = 10
    seed: int = 0
    val_fraction: float = 0.1
    tokenizer: str = "bytes"  # "bytes" or "sp:N"
    data: list[str] = field(default_factory=list)  # empty = bundled corpus
    dispatch: str = "auto"  # MoE dispatch backend
    max_bad_steps: int = 5  # stop after this many consecutive non-finite (skipped) steps
    spike_factor: float = 3.0  # log a loss above this x the recent mean as a spike; 0 = off
    spike_window: int = 20  # steps in that recent mean
    optimizer: str = "adamw"  # adamw | sparse-adamw | adafactor (lazy per-expert state, tinymoe.optim)
    optimizer_state_dtype: str = "float32"  # float32 | bfloat16 (sparse-adamw and adafactor only)
    loss_on: str = "all"  # all | target: the LM loss over every token or the targets of instruction data
    # Distillation from a teacher cache (tinymoe teacher-cache; docs/distill.md): the LM loss is
    # (1 - distill_weight) * CE + distill_weight * KD at distill_temperature.
    teacher_cache: str = ""  # the cache folder ("" = no teacher)
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    # Domain experts (docs/domains.md; tinymoe.domains): which experts each data domain owns.
    domain_experts: str = ""  # NAME=RANGE,... e.g. code=0-3,prose=4-7 ("" = none)
    domain_weight: float = 0.0  # weight of the router supervision loss
    domain_mode: str = "soft"  # soft (a loss) | hard (other experts masked out)
    secretary: bool = False  # train a domain classifier for sample --domain auto
    # Mixed precision and activation checkpointing (docs/memory.md; tinymoe.precision_check).
    dtype: str = "float32"  # weights, gradients and compute; routers and the loss stay float32
    loss_scale: str = "auto"  # auto (dynamic for float16) | dynamic | none
    checkpoint_activations: str = "none"  # none | every-layer | every-N (blocks recomputed in backward)


PRESET_SECTIONS = {"model": ModelConfig, "train": TrainConfig}


def preset_names() -> list[str]:
    root = resources.files("tinymoe.presets")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def load_preset(name_or_path: str) -> tuple[ModelConfig, TrainConfig]:
    """A preset by name (presets/NAME.toml) or a path to a TOML file of the same shape."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml"):
        if not path.is_file():
            raise TinyMoeError(f"preset file not found: {name_or_path}")
        try:
            text = path.read_bytes().decode("utf-8")  # TOML is UTF-8 by definition
        except OSError as exc:
            raise TinyMoeError(f"preset {name_or_path}: cannot read ({exc.strerror or exc})") from None
        except UnicodeDecodeError as exc:
            raise TinyMoeError(f"preset {name_or_path}: invalid TOML: not UTF-8 text (byte {exc.start})") from None
    elif not _PRESET_NAME.fullmatch(name_or_path):  # a name, not a path (and no NUL byte for the OS)
        raise TinyMoeError(f"unknown preset '{name_or_path}' (choose from: {', '.join(preset_names())})")
    else:
        res = resources.files("tinymoe.presets") / f"{name_or_path}.toml"
        if not res.is_file():
            raise TinyMoeError(
                f"unknown preset '{name_or_path}' (choose from: {', '.join(preset_names())})"
            )
        text = res.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TinyMoeError(f"preset {name_or_path}: invalid TOML: {exc}") from None
    unknown = set(raw) - set(PRESET_SECTIONS)
    if unknown:
        raise TinyMoeError(f"preset {name_or_path}: unknown section(s) {sorted(unknown)}")
    for section, table in raw.items():
        if not isinstance(table, dict):
            raise TinyMoeError(f"preset {name_or_path}: '{section}' must be a table ([{section}]), "
                               f"got {type(table).__name__}")
    model = apply_overrides(ModelConfig(), raw.get("model", {}), f"preset {name_or_path} [model]")
    train = apply_overrides(TrainConfig(), raw.get("train", {}), f"preset {name_or_path} [train]")
    return model, train


def _coerce(value, current, key: str, where: str):
    """Check `value` against the type of the field's current value; allow int -> float."""
    expected = type(current)
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            value = float(value) if ok else value
        except OverflowError:  # an int beyond the float range
            ok = False
        if ok and not math.isfinite(value):  # TOML and click both accept nan and inf
            raise TinyMoeError(f"{where}: '{key}' must be a finite number, got {value}")
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, expected)
    if not ok:
        shown = repr(value) if not isinstance(value, int) or abs(value) < 10**60 else "(a huge number)"
        shown = shown if len(shown) <= 60 else shown[:57] + "..."  # a whole TOML table is no message
        wanted = _TYPE_WORDS.get(expected, expected.__name__)
        raise TinyMoeError(f"{where}: '{key}' must be {wanted}, got {_TYPE_WORDS.get(type(value), type(value).__name__)}"
                           f" {shown}")
    return value


# How a setting's type reads in an error message ("must be an integer, got text 'wide'").
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "text", list: "a list of strings",
               dict: "a table"}


def apply_overrides(cfg, overrides: dict, where: str = "override"):
    """Return a copy of dataclass `cfg` with `overrides` applied; unknown keys and types fail."""
    names = {f.name for f in fields(cfg)}
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise TinyMoeError(f"{where}: unknown setting '{key}'")
        changes[key] = _coerce(value, getattr(cfg, key), key, where)
    return dataclasses.replace(cfg, **changes)


def _check_numbers(cfg) -> None:
    """Every float finite and every int within MLX's int32 (a seed: within int64), whatever the
    source: a config built in code or read from a manifest has not been through `_coerce`."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise TinyMoeError(f"{f.name} must be a finite number, got {value}")
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:
            raise TinyMoeError(f"{f.name} {value:g} is beyond float32 (at most {FLOAT32_MAX:.4g} in magnitude)")
        if isinstance(value, int) and not isinstance(value, bool):
            limit = MAX_SEED if f.name == "seed" else MAX_INT
            if abs(value) > limit:
                raise TinyMoeError(f"{f.name} must be at most {limit}, got {value}")


def validate(model: ModelConfig, train: TrainConfig | None = None) -> None:
    """Reject impossible settings with a one-line message."""
    _check_numbers(model)
    positive = ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "context", "d_ff"]
    positive += ["moe_experts", "moe_topk", "moe_every"]
    for name in positive:
        if getattr(model, name) <= 0:
            raise TinyMoeError(f"{name} must be positive, got {getattr(model, name)}")
    for name in ["expert_hidden", "moe_first_dense"]:
        if getattr(model, name) < 0:
            raise TinyMoeError(f"{name} must be >= 0, got {getattr(model, name)}")
    if model.d_model % model.n_heads:
        raise TinyMoeError(f"d_model {model.d_model} is not divisible by n_heads {model.n_heads}")
    if model.head_dim % 2:
        raise TinyMoeError(f"head dimension {model.head_dim} must be even for RoPE")
    if model.n_heads % model.n_kv_heads:
        raise TinyMoeError(f"n_heads {model.n_heads} is not a multiple of n_kv_heads {model.n_kv_heads}")
    if model.moe_topk > model.moe_experts:
        raise TinyMoeError(f"moe_topk {model.moe_topk} exceeds moe_experts {model.moe_experts}")
    if model.aux_loss_weight < 0 or model.z_loss_weight < 0:
        raise TinyMoeError("router loss weights must be >= 0")
    for name in ["norm_eps", "rope_theta"]:  # RMSNorm divides by sqrt(ms + eps); RoPE takes log(theta)
        if not getattr(model, name) >= FLOAT32_TINY:
            raise TinyMoeError(f"{name} must be positive (at least {FLOAT32_TINY:.4g}, float32's smallest normal "
                               f"number), got {getattr(model, name)}")
    check_router(model)
    if train is None:
        return
    _check_numbers(train)
    if train.seed < 0:
        raise TinyMoeError(f"seed must be >= 0, got {train.seed}")
    for name in ["beta1", "beta2"]:  # AdamW's moment decays; 1 or more never forgets or diverges
        if not 0 <= getattr(train, name) < 1:
            raise TinyMoeError(f"{name} must be in [0, 1), got {getattr(train, name)}")
    for name in ["steps", "batch_size", "grad_accum", "eval_batches", "log_every", "max_bad_steps",
                 "spike_window"]:
        if getattr(train, name) <= 0:
            raise TinyMoeError(f"{name} must be positive, got {getattr(train, name)}")
    for name in ["warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip", "spike_factor"]:
        if getattr(train, name) < 0:
            raise TinyMoeError(f"{name} must be >= 0, got {getattr(train, name)}")
    if not train.lr > 0:
        raise TinyMoeError(f"lr must be positive, got {train.lr}")
    if not 0 <= train.val_fraction < 1:
        raise TinyMoeError(f"val_fraction must be in [0, 1), got {train.val_fraction}")
    if not 0 <= train.min_lr_ratio <= 1:
        raise TinyMoeError(f"min_lr_ratio must be in [0, 1], got {train.min_lr_ratio}")
    if train.optimizer not in OPTIMIZERS:
        raise TinyMoeError(f"unknown optimizer '{train.optimizer}' (choose from {', '.join(OPTIMIZERS)})")
    if train.optimizer_state_dtype not in OPTIMIZER_STATE_DTYPES:
        raise TinyMoeError(f"unknown optimizer state dtype '{train.optimizer_state_dtype}' "
                           f"(choose from {', '.join(OPTIMIZER_STATE_DTYPES)})")
    if train.optimizer == "adamw" and train.optimizer_state_dtype != "float32":
        raise TinyMoeError("optimizer_state_dtype bfloat16 needs optimizer sparse-adamw or adafactor "
                           "(adamw keeps float32 moments)")
    if train.loss_on not in LOSS_ON:
        raise TinyMoeError(f"unknown loss_on '{train.loss_on}' (choose from {', '.join(LOSS_ON)})")
    if train.dispatch not in DISPATCH_CHOICES:
        raise TinyMoeError(f"unknown dispatch '{train.dispatch}' (choose from {', '.join(DISPATCH_CHOICES)})")
    if not 0 <= train.distill_weight <= 1:
        raise TinyMoeError(f"distill_weight must be in [0, 1], got {train.distill_weight}")
    if not train.distill_temperature >= 0.01:  # the student's logits are divided by it
        raise TinyMoeError(f"distill_temperature must be at least 0.01, got {train.distill_temperature}")
    if train.distill_weight > 0 and not train.teacher_cache:
        raise TinyMoeError("distill_weight needs a teacher cache (--teacher-cache DIR, built by tinymoe teacher-cache)")
    check_domain_settings(model, train)
    check_precision_settings(model, train)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, raw: dict, where: str):
    """Rebuild a config saved in a manifest; unknown keys mean a newer or foreign format."""
    return apply_overrides(cls(), raw, where)
