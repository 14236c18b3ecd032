"""`tinymoe train`: a preset plus flag overrides -> a run directory with checkpoints and logs."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from tinymoe.cli.common import UserError, print_json, user_errors

# flag name -> (config section, type, help). Every flag defaults to None = "keep the preset's".
MODEL_FLAGS = {
    "moe_experts": (int, "Experts per MoE layer (1 = dense model)."),
    "moe_topk": (int, "Experts each token is routed to."),
    "expert_hidden": (int, "Hidden width of one expert (default: d_ff)."),
    "moe_every": (int, "MoE in every Nth layer (1 = every layer)."),
    "moe_first_dense": (int, "Keep the first N layers dense."),
    "aux_loss_weight": (float, "Weight of the load-balancing loss."),
    "z_loss_weight": (float, "Weight of the router z-loss."),
    "router": (str, "Router: topk (default), switch, noisy, jitter, sigmoid-bias, expert-choice, smart, dynamic "
                    "(docs/routers.md)."),
    "router_order": (str, "topk/jitter/smart: softmax-topk (default) or topk-softmax (Mixtral)."),
    "noise_scale": (float, "noisy: scale of the learned-std logit noise (0 = none)."),
    "jitter_eps": (float, "jitter/switch/smart: router input times U(1-eps, 1+eps) in training."),
    "bias_rate": (float, "sigmoid-bias: step of the auxiliary-loss-free balancing bias."),
    "router_groups": (int, "topk/sigmoid-bias: experts in this many groups (node-limited routing)."),
    "router_group_topk": (int, "topk/sigmoid-bias: a token picks from its best this many groups."),
    "entropy_weight": (float, "Weight of the router entropy bonus (-1 = router default: 0.01 for smart)."),
    "capacity_factor": (float, "Expert capacity in training, x T*K/E slots (0 = dropless)."),
    "eval_capacity_factor": (float, "Expert capacity in evaluation (0 = dropless)."),
    "k_min": (int, "dynamic: fewest experts per token."),
    "k_max": (int, "dynamic: most experts per token (0 = --moe-topk)."),
    "dynamic_threshold": (float, "dynamic: probability mass the chosen experts must reach."),
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
    "optimizer": (click.Choice(["adamw", "sparse-adamw", "adafactor"]), "adamw; sparse-adamw: AdamW whose expert "
                  "state is created only for experts that receive gradient; adafactor: factored second moments, "
                  "no momentum, lazy expert state (see docs/memory.md)."),
    "optimizer_state_dtype": (click.Choice(["float32", "bfloat16"]), "Dtype of sparse-adamw's moments or "
                              "adafactor's statistics."),
    "max_bad_steps": (int, "Stop after this many consecutive steps with a non-finite loss or gradient "
                           "(each is skipped without updating the weights)."),
}
# Settings that do not change what is computed, so a resumed run may change them.
RESUME_MAY_CHANGE = {"steps", "eval_every", "save_every", "log_every", "dispatch", "eval_batches",
                     "max_bad_steps", "spike_factor", "spike_window"}


def _flag_options(fn):
    for name, (typ, help_text) in reversed(list({**MODEL_FLAGS, **TRAIN_FLAGS}.items())):
        fn = click.option("--" + name.replace("_", "-"), name, type=typ, default=None, help=help_text)(fn)
    return fn


@click.command()
@click.option("--preset", default="tiny", show_default=True, help="Preset name (see presets/) or a .toml path.")
@click.option("--data", multiple=True, help="Text file, directory, glob, JSONL, or DOMAIN=PATH; repeatable. "
              "Default: the bundled corpus.")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory to create.")
@click.option("--resume", type=click.Path(), help="Continue a run from its latest (or this) checkpoint.")
@click.option("--init", "init_from", type=click.Path(), help="Start a new run (step 0, fresh optimizer) from this "
              "checkpoint's model and tokenizer, e.g. an upcycled or imported one.")
@click.option("--router-norm/--no-router-norm", default=None, help="Renormalise top-k gates to sum to 1.")
@click.option("--moe-dispatch", "dispatch", type=click.Choice(["auto", "dense", "gather", "grouped", "metal"]),
              default=None, help="MoE dispatch backend (auto picks the fastest for this device).")
@_flag_options
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Any other [model] or [train] setting, e.g. --set rope_theta=50000.")
@click.option("--keep", default=0, show_default=True, help="Older step checkpoints to keep besides the latest.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
@user_errors
def train(preset, data, out, resume, router_norm, dispatch, sets, keep, overwrite, quiet, as_json, **flags):
    """Train a (Mixture-of-Experts) language model and write checkpoints to --out."""
    from tinymoe.config import ModelConfig, TrainConfig, apply_overrides, load_preset, validate

    model_over = {k: v for k, v in flags.items() if k in MODEL_FLAGS and v is not None}
    train_over = {k: v for k, v in flags.items() if k in TRAIN_FLAGS and v is not None}
    if router_norm is not None:
        model_over["router_norm"] = router_norm
    if dispatch is not None:
        train_over["dispatch"] = dispatch
    if data:
        train_over["data"] = list(data)
    _split_sets(sets, model_over, train_over)

    init_from = flags.pop("init_from", None)
    if init_from and resume:
        raise UserError("--init starts a new run and --resume continues one; pass only one of them")
    if resume and not init_from:
        from tinymoe.interop.init_state import weights_only_run_dir

        weights_only = weights_only_run_dir(resume)
        if weights_only is not None:  # upcycled/imported: no optimizer or data state to resume
            return _init(resume, out or weights_only, preset, model_over, train_over, False, keep, quiet,
                         as_json, fresh_dir=out is not None)
    if init_from:
        if not out:
            raise UserError("--out is required with --init (the run directory to create)")
        return _init(init_from, out, preset, model_over, train_over, overwrite, keep, quiet, as_json)
    if resume:
        return _resume(resume, out, model_over, train_over, keep, quiet, as_json)
    if not out:
        raise UserError("--out is required (the run directory to create), or use --resume DIR")
    model_cfg, train_cfg = load_preset(preset)
    model_cfg = apply_overrides(model_cfg, model_over, "flag")
    train_cfg = apply_overrides(train_cfg, train_over, "flag")
    validate(model_cfg, train_cfg)
    run_dir = _prepare_out(Path(out), overwrite)
    _run(model_cfg, train_cfg, run_dir, None, keep, quiet, as_json)


def _split_sets(sets, model_over, train_over):
    from tinymoe.config import ModelConfig, TrainConfig

    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"--set expects KEY=VALUE, got '{item}'")
        value = _parse_value(raw)
        if key in ModelConfig.__dataclass_fields__:
            model_over[key] = value
        elif key in TrainConfig.__dataclass_fields__:
            train_over[key] = value
        else:
            raise UserError(f"--set: unknown setting '{key}'")


def _parse_value(raw: str):
    from tinymoe.config import tomllib  # tomli on Python 3.10

    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare string


def _prepare_out(run_dir: Path, overwrite: bool) -> Path:
    if run_dir.exists() and any(run_dir.iterdir()):
        is_run = (run_dir / "checkpoints").is_dir() or (run_dir / "metrics.jsonl").exists()
        if not overwrite:
            raise UserError(f"{run_dir} already exists and is not empty; use --resume {run_dir} to continue "
                            f"or --overwrite to replace it")
        if not is_run:
            raise UserError(f"{run_dir} is not a tinymoe run directory; refusing to overwrite it")
        shutil.rmtree(run_dir)
    return run_dir


def _resume(path, out, model_over, train_over, keep, quiet, as_json):
    from tinymoe.config import ModelConfig, TrainConfig, apply_overrides, from_dict, validate
    from tinymoe.io.loader import load_training_state as load_resume_state

    state = load_resume_state(path)
    m = state["manifest"]
    model_cfg = from_dict(ModelConfig, m["model"], "checkpoint model config")
    train_cfg = from_dict(TrainConfig, m["train"], "checkpoint train config")
    for key, value in {**model_over, **train_over}.items():
        saved = getattr(model_cfg if key in model_over else train_cfg, key)
        if key not in RESUME_MAY_CHANGE and value != saved:
            raise UserError(f"cannot change '{key}' when resuming (checkpoint has {saved!r}, flag gives {value!r})")
    train_cfg = apply_overrides(train_cfg, {k: v for k, v in train_over.items() if k in RESUME_MAY_CHANGE}, "flag")
    validate(model_cfg, train_cfg)
    if m["step"] >= train_cfg.steps:
        raise UserError(f"checkpoint is already at step {m['step']} of {train_cfg.steps}; pass a larger --steps")
    ckpt = state["ckpt"]
    run_dir = Path(out) if out else (ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent)
    _run(model_cfg, train_cfg, run_dir, state, keep, quiet, as_json)


def _init(path, out, preset, model_over, train_over, overwrite, keep, quiet, as_json, fresh_dir=True):
    """A new run from a checkpoint's weights (see tinymoe.interop.init_state)."""
    from tinymoe.config import apply_overrides, load_preset, validate
    from tinymoe.interop.init_state import load_init_state

    if "tokenizer" in train_over:
        raise UserError("the tokenizer comes from the checkpoint given to --init; drop --tokenizer")
    model_cfg, init, ckpt = load_init_state(path, model_over)
    train_cfg = apply_overrides(load_preset(preset)[1], train_over, "flag")
    validate(model_cfg, train_cfg)
    run_dir = _prepare_out(Path(out), overwrite) if fresh_dir else Path(out)
    if not quiet:
        click.echo(f"init: weights and tokenizer from {ckpt}; new optimizer, step 0", err=True)
    _run(model_cfg, train_cfg, run_dir, None, keep, quiet, as_json, init=init)


def _run(model_cfg, train_cfg, run_dir, resume, keep, quiet, as_json, init=None):
    from tinymoe.nn.model import count_params
    from tinymoe.train.trainer import Trainer

    trainer = Trainer(model_cfg, train_cfg, run_dir, resume=resume, progress=not quiet, keep=keep, init=init)
    params = count_params(trainer.model)
    if not quiet:
        kind = (f"MoE {model_cfg.moe_experts} experts top-{model_cfg.moe_topk}, router {model_cfg.router}"
                + (f", {model_cfg.shared_experts} shared" if model_cfg.shared_experts else "")
                if model_cfg.is_moe else "dense")
        click.echo(f"model: {kind}, {model_cfg.n_layers} layers, d_model {model_cfg.d_model}, "
                   f"params {params['total']:,} total / {params['active']:,} active per token", err=True)
        click.echo(f"data: {trainer.data.train_tokens.size:,} train / {trainer.data.val_tokens.size:,} val tokens "
                   f"({', '.join(trainer.data.domain_names)}); dispatch {trainer.model.dispatch}"
                   f"{'' if trainer.compiled else ' (eager)'}; run dir {run_dir}", err=True)
    try:
        summary = trainer.run()
    except KeyboardInterrupt:
        raise UserError(f"interrupted at step {trainer.step}; resume with: tinymoe train --resume {run_dir}")
    summary["run_dir"] = str(run_dir)
    if as_json:
        print_json(summary)
    elif not quiet:
        val = summary["val_loss"]
        click.echo(f"done: step {summary['step']}, train loss {summary['train_loss']:.4f}"
                   + (f", val loss {val:.4f}" if val is not None else "") + f" -> {run_dir}", err=True)
