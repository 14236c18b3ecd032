"""`tinymoe plan`: parameters and memory of a preset (plus flags) without building the model."""

from __future__ import annotations

import click

from tinymoe.cli.common import print_json, user_errors


@click.command()
@click.option("--preset", default="tiny", show_default=True, help="Preset name (see presets/) or a .toml path.")
@click.option("--mode", type=click.Choice(["train", "sample"]), default="train", show_default=True)
@click.option("--batch-size", type=int, default=None, help="Sequences per micro-batch (default: the preset's; "
              "1 for --mode sample).")
@click.option("--context", type=int, default=None, help="Tokens per sequence (default: the preset's context).")
@click.option("--moe-experts", type=int, default=None, help="Override the experts per MoE layer.")
@click.option("--moe-topk", type=int, default=None, help="Override the experts each token is routed to.")
@click.option("--param-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Dtype of the weights (and gradients).")
@click.option("--optimizer", type=click.Choice(["adamw", "sparse-adamw", "adafactor"]), default=None,
              help="Default: the preset's [train] optimizer (adamw unless it says otherwise).")
@click.option("--optimizer-state-dtype", type=click.Choice(["float32", "bfloat16"]), default=None,
              help="Default: the preset's (float32 unless it says otherwise).")
@click.option("--expert-state-fraction", type=float, default=1.0, show_default=True,
              help="sparse-adamw, adafactor: share of experts holding optimizer state.")
@click.option("--resident-experts", type=int, default=0, show_default=True,
              help="--mode sample: experts per MoE layer kept in memory (0 = all).")
@click.option("--memory-gib", type=float, default=48.0, show_default=True, help="The machine's memory.")
@click.option("--usable-fraction", type=float, default=0.75, show_default=True,
              help="Share of the memory a run may use (Metal's default GPU working-set limit).")
@click.option("--prompt-tokens", type=int, default=None, help="--mode sample with --resident-experts: prompt length "
              "(default: the context; sets the prefill working set).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@user_errors
def plan(preset, mode, batch_size, context, moe_experts, moe_topk, param_dtype, optimizer, optimizer_state_dtype,
         expert_state_fraction, resident_experts, memory_gib, usable_fraction, prompt_tokens, as_json):
    """Print parameter counts and the memory a run of PRESET needs, and whether it fits."""
    from tinymoe.config import apply_overrides, load_preset, validate
    from tinymoe.planner import format_plan, plan as make_plan

    model_cfg, train_cfg = load_preset(preset)
    over = {k: v for k, v in (("moe_experts", moe_experts), ("moe_topk", moe_topk)) if v is not None}
    model_cfg = apply_overrides(model_cfg, over, "flag")
    validate(model_cfg)
    optimizer = optimizer or train_cfg.optimizer
    optimizer_state_dtype = optimizer_state_dtype or train_cfg.optimizer_state_dtype
    batch = batch_size or (1 if mode == "sample" else train_cfg.batch_size)
    result = make_plan(model_cfg, mode=mode, batch=batch, context=context, param_dtype=param_dtype,
                       optimizer=optimizer, state_dtype=optimizer_state_dtype,
                       expert_state_fraction=expert_state_fraction, resident_experts=resident_experts, prompt_tokens=prompt_tokens,
                       memory_gib=memory_gib, usable_fraction=usable_fraction)
    if as_json:
        print_json({"preset": preset, **result})
    else:
        click.echo(format_plan(result, f"preset {preset}"))
