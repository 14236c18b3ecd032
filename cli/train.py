"""`tinymoe train`: a preset plus flag overrides -> a run directory with checkpoints and logs."""

from __future__ import annotations

import click

from tinymoe.cli.common import FINITE, SEED, OutDir, UserError, print_json, user_errors
from tinymoe.domains import DOMAIN_MODES
from tinymoe.errors import TinyMoeError
from tinymoe.cli.run_plan import run_plan
from tinymoe.names import DISPATCH_CHOICES, LOSS_ON, LOSS_SCALES, OPTIMIZER_STATE_DTYPES, OPTIMIZERS, TRAIN_DTYPES
from tinymoe.router_registry import ROUTERS, option_users


def _users(option: str) -> str:
    """The routers that read `option`, for its help text (from the registry, never copied)."""
    return "/".join(option_users(option))


# flag name -> (config section, type, help). Every flag defaults to None = "keep the preset's".
MODEL_FLAGS = {
    "moe_experts": (int, "Experts per MoE layer (1 = dense model)."),
    "moe_topk": (int, "Experts each token is routed to."),
    "expert_hidden": (int, "Hidden width of one expert (default: d_ff)."),
    "moe_every": (int, "MoE in every Nth layer (1 = every layer)."),
    "moe_first_dense": (int, "Keep the first N layers dense."),
    "aux_loss_weight": (float, "Weight of the load-balancing loss."),
    "z_loss_weight": (float, "Weight of the router z-loss."),
    "router": (str, f"Router: {', '.join(ROUTERS)} (docs/routers.md; default topk)."),
    "router_order": (str, f"{_users('router_order')}: softmax-topk (default) or topk-softmax (Mixtral)."),
    "noise_scale": (float, f"{_users('noise_scale')}: scale of the learned-std logit noise (0 = none)."),
    "jitter_eps": (float, f"{_users('jitter_eps')}: router input times U(1-eps, 1+eps) in training."),
    "bias_rate": (float, f"{_users('bias_rate')}: step of the auxiliary-loss-free balancing bias."),
    "router_groups": (int, f"{_users('router_groups')}: experts in this many groups (node-limited routing)."),
    "router_group_topk": (int, f"{_users('router_group_topk')}: a token picks from its best this many groups."),
    "entropy_weight": (float, "Weight of the router entropy bonus (-1 = router default: 0.01 for smart)."),
    "capacity_factor": (float, "Expert capacity in training, x T*K/E slots (0 = dropless)."),
    "eval_capacity_factor": (float, "Expert capacity in evaluation (0 = dropless)."),
    "k_min": (int, f"{_users('k_min')}: fewest experts per token."),
    "k_max": (int, f"{_users('k_max')}: most experts per token (0 = --moe-topk)."),
    "dynamic_threshold": (float, f"{_users('dynamic_threshold')}: probability mass the chosen experts must reach."),
    "shared_experts": (int, "Always-active shared experts per MoE layer (DeepSeekMoE)."),
    "d_model": (int, "Model width."),
    "n_layers": (int, "Transformer blocks."),
    "n_heads": (int, "Attention heads."),
    "n_kv_heads": (int, "Key/value heads (grouped-query attention)."),
    "d_ff": (int, "Hidden width of a dense FFN."),
    "context": (int, "Context length in tokens."),
}
TRAIN_FLAGS = {
    "steps": (int, "Optimizer steps in total (with --resume: the new total)."),
    "batch_size": (int, "Sequences per micro-batch."),
    "grad_accum": (int, "Micro-batches per optimizer step."),
    "lr": (float, "Peak learning rate."),
    "warmup_steps": (int, "Linear warmup steps."),
    "eval_every": (int, "Validate every N steps (0 = only at the end)."),
    "save_every": (int, "Checkpoint every N steps (0 = only at the end)."),
    "log_every": (int, "Write metrics.jsonl every N steps."),
    "seed": (int, "Random seed (weights, batches)."),
    "tokenizer": (str, "bytes (default) or sp:N, a sentencepiece BPE of vocab N trained on the data."),
    "optimizer": (click.Choice(OPTIMIZERS), "adamw; sparse-adamw: AdamW whose expert "
                  "state is created only for experts that receive gradient; adafactor: factored second moments, "
                  "no momentum, lazy expert state (see docs/memory.md)."),
    "optimizer_state_dtype": (click.Choice(OPTIMIZER_STATE_DTYPES), "Dtype of sparse-adamw's moments or "
                              "adafactor's statistics."),
    "max_bad_steps": (int, "Stop after this many consecutive steps with a non-finite loss or gradient "
                           "(each is skipped without updating the weights)."),
    "loss_on": (click.Choice(LOSS_ON), "LM loss over all tokens, or only the targets of instruction "
                "examples (JSONL prompt/completion or messages; docs/stages.md)."),
    "teacher_cache": (str, "Distil from this teacher cache (built by tinymoe teacher-cache for the same data; "
                      "docs/distill.md)."),
    "distill_weight": (float, "With --teacher-cache: loss = w * KD + (1 - w) * CE (default 0.5 with a cache)."),
    "distill_temperature": (float, "With --teacher-cache: temperature of the KD term (KL at T, times T^2)."),
    "dtype": (click.Choice(TRAIN_DTYPES), "Weights, gradients and compute; routers and the loss stay float32 "
              "(docs/memory.md)."),
    "loss_scale": (click.Choice(LOSS_SCALES), "Dynamic loss scaling (auto: on for float16)."),
    "domain_experts": (str, "Domain experts: NAME=RANGE,... gives each data domain (--data NAME=PATH) its "
                       "experts, e.g. code=0-3,prose=4-7 (docs/domains.md)."),
    "domain_weight": (float, "Weight of the router supervision loss that pushes each token's routing mass "
                      "onto its domain's experts."),
    "domain_mode": (click.Choice(DOMAIN_MODES), "soft: supervision loss only; hard: a token routes only "
                    "within its domain's experts."),
    "checkpoint_activations": (str, "none, every-layer or every-N: recompute blocks in the backward pass "
                               "to save activation memory."),
}
DEFAULT_PRESET = "tiny"


def _preset_values() -> dict:
    """The default preset's value of every flag, for --help (one small TOML file: still instant)."""
    import dataclasses

    from tinymoe.config import load_preset

    try:
        model_cfg, train_cfg = load_preset(DEFAULT_PRESET)
    except Exception:  # noqa: BLE001 - help must show even from a broken install
        return {}
    return {**dataclasses.asdict(model_cfg), **dataclasses.asdict(train_cfg)}


def _flag_options(fn):
    # Floats must be finite (click's float takes "nan" and "inf"); a seed is in [0, 2**63).
    checked = {float: FINITE}
    preset = _preset_values()
    for name, (typ, help_text) in reversed(list({**MODEL_FLAGS, **TRAIN_FLAGS}.items())):
        typ = SEED if name == "seed" else checked.get(typ, typ)
        if name in preset and preset[name] not in (None, ""):
            help_text = f"{help_text} [{DEFAULT_PRESET}: {preset[name]}]"
        fn = click.option("--" + name.replace("_", "-"), name, type=typ, default=None, help=help_text)(fn)
    return fn


@click.command()
@click.option("--preset", default=DEFAULT_PRESET, show_default=True,
              help="Preset name (see presets/) or a .toml path; flags not given keep its values.")
@click.option("--data", multiple=True, help="Text file, directory, glob, JSONL, or DOMAIN=PATH; repeatable. "
              "Default: the bundled corpus.")
@click.option("--out", type=OutDir(), help="Run directory to create.")
@click.option("--resume", type=click.Path(), help="Continue a run from its latest (or this) checkpoint.")
@click.option("--init", "init_from", type=click.Path(), help="Start a new run (step 0, fresh optimizer) from this "
              "checkpoint's model and tokenizer, e.g. an upcycled or imported one.")
@click.option("--router-norm/--no-router-norm", default=None, help="Renormalise top-k gates to sum to 1.")
@click.option("--moe-dispatch", "dispatch", type=click.Choice(DISPATCH_CHOICES),
              default=None, help="MoE dispatch backend (auto picks the fastest for this device).")
@_flag_options
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Any other [model] or [train] setting, e.g. --set rope_theta=50000.")
@click.option("--keep", type=click.IntRange(min=0), default=None,
              help="Older step checkpoints to keep besides the latest (stored with the run; default 0, "
                   "or the run's own setting on --resume).")
@click.option("--extend-steps", type=click.IntRange(min=1), default=None,
              help="With --resume: add N steps to the run. The cosine schedule then follows the new length "
                   "from the current step on, so the result differs from a run planned that long.")
@click.option("--allow-data-change", is_flag=True,
              help="With --resume: continue although the training files changed since the run started.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier tinymoe run in --out (only a folder tinymoe "
              "created as a run; after the new inputs are checked).")
@click.option("--stages", "stages_file", type=click.Path(), default=None,
              help="Train in the stages of this TOML file ([[stage]] tables: steps, data, weights, trained "
                   "groups, lr scale, loss; docs/stages.md). Replaces --data and --steps.")
@click.option("--secretary/--no-secretary", "secretary", default=None,
              help="With --domain-experts: train a domain classifier for sample --domain auto.")
@click.option("--distributed", is_flag=True, help="Join the group of ranks a launcher started (mlx.launch does it "
              "by itself; this makes failing to join an error). docs/distributed.md.")
@click.option("--expert-parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Under mlx.launch: split every MoE layer's experts over this many ranks (1 = every rank holds "
                   "all experts: data parallel only). docs/distributed.md.")
@click.option("--rank-timeout", type=click.FloatRange(min=0), default=None,
              help="Distributed runs: stop when no step completes for this many seconds (a hung peer; "
                   "default 900, 0 = never).")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
@user_errors
def train(preset, data, out, resume, router_norm, dispatch, sets, keep, extend_steps, allow_data_change, overwrite,
          distributed, expert_parallel, rank_timeout, quiet, as_json, **flags):
    """Train a (Mixture-of-Experts) language model and write checkpoints to --out.

    Every setting comes from --preset unless a flag gives it; [tiny: N] below is the value
    of the default preset. The run's plan (steps, tokens, schedule) and a time estimate are
    printed before and just after training starts."""
    from tinymoe.config import apply_overrides, load_preset, validate

    model_over = {k: v for k, v in flags.items() if k in MODEL_FLAGS and v is not None}
    train_over = {k: v for k, v in flags.items() if k in TRAIN_FLAGS and v is not None}
    if flags.get("secretary") is not None:
        train_over["secretary"] = flags["secretary"]
    flags.pop("secretary", None)
    if router_norm is not None:
        model_over["router_norm"] = router_norm
    if dispatch is not None:
        train_over["dispatch"] = dispatch
    if data:
        train_over["data"] = list(data)
    _split_sets(sets, model_over, train_over)

    init_from = flags.pop("init_from", None)
    stages_file = flags.pop("stages_file", None)
    if stages_file and data:
        raise UserError("--stages names the data of each stage; drop --data")
    if stages_file and "steps" in train_over:
        raise UserError("--stages sets the length of the run (the sum of its stages' steps); drop --steps")
    if init_from and resume:
        raise UserError("--init starts a new run and --resume continues one; pass only one of them")
    if (extend_steps or allow_data_change) and not resume:
        raise UserError("--extend-steps and --allow-data-change apply to --resume only")
    ranks = _join(distributed, rank_timeout, expert_parallel)
    if ranks is not None:
        if init_from:
            raise UserError("--init does not run distributed yet; start the run in one process, then --resume it "
                            "under mlx.launch")
        if not ranks.writer:  # rank 0 speaks for the group
            quiet, as_json = True, False
    weights_only = None
    if resume:
        from tinymoe.interop.init_state import weights_only_run_dir

        weights_only = weights_only_run_dir(resume)
        if weights_only is not None:  # upcycled/imported: no optimizer or data state to resume
            init_from = resume
    if init_from:
        from tinymoe.run.lifecycle import init_run

        if "tokenizer" in train_over:
            raise UserError("the tokenizer comes from the checkpoint given to --init; drop --tokenizer")
        if not out and not resume:
            raise UserError("--out is required with --init (the run folder to create)")
        train_cfg = apply_overrides(load_preset(preset)[1], _distill_default(train_over), "flag")
        prepared = init_run(init_from, out or weights_only, train_cfg, model_over, overwrite=overwrite, keep=keep,
                            progress=not quiet, continue_in_place=resume is not None and out is None,
                            stages_file=stages_file)
        if not quiet:
            click.echo(f"init: weights and tokenizer from {init_from}; new optimizer, step 0", err=True)
        return _train(prepared, quiet, as_json)
    if resume:
        from tinymoe.run.lifecycle import resume_run

        prepared = resume_run(resume, out, model_over, train_over, keep=keep, extend_steps=extend_steps or 0,
                              allow_data_change=allow_data_change, overwrite=overwrite, progress=not quiet,
                              stages_file=stages_file, ranks=ranks)
        return _train(prepared, quiet, as_json)
    if not out:
        raise UserError("--out is required (the run folder to create), or use --resume DIR")
    from tinymoe.run.lifecycle import new_run

    model_cfg, train_cfg = load_preset(preset)
    model_cfg = apply_overrides(model_cfg, model_over, "flag")
    train_cfg = apply_overrides(train_cfg, _distill_default(train_over), "flag")
    validate(model_cfg, train_cfg)
    prepared = new_run(model_cfg, train_cfg, out, overwrite=overwrite, keep=keep, progress=not quiet,
                       stages_file=stages_file, ranks=ranks)
    _train(prepared, quiet, as_json)


def _join(distributed: bool, rank_timeout: float | None, expert_parallel: int):
    """The data-parallel group under mlx.launch (or --distributed), else None: a single process
    never initialises mx.distributed."""
    from tinymoe.distributed_plan import launched

    if not (distributed or launched()):
        if rank_timeout is not None or expert_parallel > 1:
            flag = "--rank-timeout" if rank_timeout is not None else "--expert-parallel"
            raise UserError(f"{flag} applies to distributed runs only: start the ranks with mlx.launch "
                            f"(docs/distributed.md)")
        return None
    from tinymoe.train.distributed import DEFAULT_TIMEOUT_S, join

    return join(distributed, DEFAULT_TIMEOUT_S if rank_timeout is None else rank_timeout, expert_parallel)


def _distill_default(train_over: dict) -> dict:
    """A new run given a teacher cache without --distill-weight mixes KD and CE half and half (a
    resumed run keeps its own weight)."""
    if train_over.get("teacher_cache") and "distill_weight" not in train_over:
        return {**train_over, "distill_weight": 0.5}
    return train_over


def _split_sets(sets, model_over, train_over):
    from tinymoe.config import ModelConfig, TrainConfig, apply_overrides

    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"--set expects KEY=VALUE, got '{item}'")
        value = _parse_value(raw)
        if key in ModelConfig.__dataclass_fields__:
            section, over = ModelConfig, model_over
        elif key in TrainConfig.__dataclass_fields__:
            section, over = TrainConfig, train_over
        else:
            raise UserError(f"--set: unknown setting '{key}'")
        apply_overrides(section(), {key: value}, f"--set {item}")  # its type, named after the flag as given
        over[key] = value


def _parse_value(raw: str):
    from tinymoe.config import tomllib  # tomli on Python 3.10

    if "\n" in raw or "\r" in raw:  # a second line would let the value add more TOML keys
        raise UserError("--set: a value must be on one line")
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):  # ValueError: an int of 4300+ digits
        return raw  # a bare string


def _train(prepared, quiet, as_json):
    from tinymoe.nn.model import count_params

    trainer, run_dir = prepared.trainer, prepared.run_dir
    model_cfg = trainer.cfg
    params = getattr(trainer, "full_params", None) or count_params(trainer.model)  # all ranks' experts
    if not quiet:
        kind = (f"MoE {model_cfg.moe_experts} experts top-{model_cfg.moe_topk}, router {model_cfg.router}"
                + (f", {model_cfg.shared_experts} shared" if model_cfg.shared_experts else "")
                if model_cfg.is_moe else "dense")
        click.echo(f"model: {kind}, {model_cfg.n_layers} layers, d_model {model_cfg.d_model}, "
                   f"params {params['total']:,} total / {params['active']:,} active per token", err=True)
        click.echo(f"data: {trainer.data.train_tokens.size:,} train / {trainer.data.val_tokens.size:,} val tokens "
                   f"({', '.join(trainer.data.domain_names)}); dispatch {trainer.model.dispatch}"
                   f"{'' if trainer.compiled else ' (eager)'}; run dir {run_dir}", err=True)
        if prepared.note:
            click.echo(prepared.note, err=True)
        for line in run_plan(trainer.train, model_cfg.context, trainer.step, getattr(trainer, "stages", None)):
            click.echo(line, err=True)
    try:
        summary = prepared.train()
    except KeyboardInterrupt:
        if prepared.discarded:
            raise UserError(f"interrupted at step {trainer.step}, before the first checkpoint: nothing was saved "
                            f"and {run_dir} was removed; run the same command again") from None
        raise UserError(f"interrupted at step {trainer.step}; resume with: tinymoe train --resume {run_dir}") from None
    except TinyMoeError as exc:
        if prepared.discarded:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"{first} ({run_dir} was removed: nothing had been saved)") from None
        raise
    summary["run_dir"] = str(run_dir)
    if as_json:
        print_json(summary)
    elif not quiet:
        val = summary["val_loss"]
        click.echo(f"done: step {summary['step']}, train loss {summary['train_loss']:.4f}"
                   + (f", val loss {val:.4f}" if val is not None else "") + f" -> {run_dir}", err=True)
