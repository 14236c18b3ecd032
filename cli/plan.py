"""`tinymoe plan`: parameters and memory of a preset (plus flags) without building the model."""

from __future__ import annotations

import click

from tinymoe.cli.common import FiniteFloat, print_json, user_errors
from tinymoe.config import MAX_INT
from tinymoe.names import OPTIMIZER_STATE_DTYPES, OPTIMIZERS, PARAM_DTYPES


@click.command()
@click.option("--preset", default="tiny", show_default=True, help="Preset name (see presets/) or a .toml path.")
@click.option("--mode", type=click.Choice(["train", "sample"]), default="train", show_default=True)
@click.option("--batch-size", type=click.IntRange(1, MAX_INT), default=None, help="Sequences per micro-batch (default: the preset's; "
              "1 for --mode sample).")
@click.option("--context", type=click.IntRange(1, MAX_INT), default=None, help="Tokens per sequence (default: the preset's context).")
@click.option("--moe-experts", type=int, default=None, help="Override the experts per MoE layer.")
@click.option("--moe-topk", type=int, default=None, help="Override the experts each token is routed to.")
@click.option("--param-dtype", type=click.Choice(PARAM_DTYPES), default="float32",
              show_default=True, help="Dtype of the weights (and gradients).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None,
              help="Default: the preset's [train] optimizer (adamw unless it says otherwise).")
@click.option("--optimizer-state-dtype", type=click.Choice(OPTIMIZER_STATE_DTYPES), default=None,
              help="Default: the preset's (float32 unless it says otherwise).")
@click.option("--expert-state-fraction", type=FiniteFloat(0, 1), default=1.0, show_default=True,
              help="sparse-adamw, adafactor: share of experts holding optimizer state.")
@click.option("--resident-experts", type=click.IntRange(0, MAX_INT), default=0, show_default=True,
              help="--mode sample: experts per MoE layer kept in memory (0 = all).")
@click.option("--memory-gib", type=FiniteFloat(0, min_open=True), default=None,
              help="The machine's memory (default: this Mac's, read from MLX; 48 elsewhere).")
@click.option("--usable-fraction", type=FiniteFloat(0, 1, min_open=True), default=None,
              help="Share of the memory a run may use (default: this Mac's Metal working-set limit in "
              "force; 0.75 elsewhere, Metal's default on a 48 GB Mac).")
@click.option("--prompt-tokens", type=click.IntRange(1, MAX_INT), default=None, help="--mode sample with --resident-experts: prompt length "
              "(default: the context; sets the prefill working set).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@user_errors
def plan(preset, mode, batch_size, context, moe_experts, moe_topk, param_dtype, optimizer, optimizer_state_dtype,
         expert_state_fraction, resident_experts, memory_gib, usable_fraction, prompt_tokens, as_json):
    """Print parameter counts and the memory a run of PRESET needs, and whether it fits."""
    from tinymoe.backend import mac_memory_facts
    from tinymoe.config import apply_overrides, load_preset, validate
    from tinymoe.planner import format_plan, machine_budget, plan as make_plan

    model_cfg, train_cfg = load_preset(preset)
    over = {k: v for k, v in (("moe_experts", moe_experts), ("moe_topk", moe_topk)) if v is not None}
    model_cfg = apply_overrides(model_cfg, over, "flag")
    validate(model_cfg)
    optimizer = optimizer or train_cfg.optimizer
    optimizer_state_dtype = optimizer_state_dtype or train_cfg.optimizer_state_dtype
    batch = batch_size or (1 if mode == "sample" else train_cfg.batch_size)
    machine_gib, machine_fraction, limit_source = machine_budget(mac_memory_facts())
    if memory_gib is not None or usable_fraction is not None:
        limit_source = "as given by --memory-gib/--usable-fraction"
    result = make_plan(model_cfg, mode=mode, batch=batch, context=context, param_dtype=param_dtype,
                       optimizer=optimizer, state_dtype=optimizer_state_dtype,
                       expert_state_fraction=expert_state_fraction, resident_experts=resident_experts, prompt_tokens=prompt_tokens,
                       memory_gib=memory_gib or machine_gib, usable_fraction=usable_fraction or machine_fraction,
                       limit_source=limit_source)
    if as_json:
        print_json({"preset": preset, **result})
    else:
        click.echo(format_plan(result, f"preset {preset}"))
