"""`tinymoe plan`: parameters and memory of a preset (plus flags) without building the model."""

from __future__ import annotations

import click

from tinymoe.cli.common import FiniteFloat, print_json, user_errors
from tinymoe.config import MAX_INT
from tinymoe.names import (OPTIMIZER_STATE_DTYPES, OPTIMIZERS, PARAM_DTYPES, TEACHER_CACHE_DTYPES,
                           TEACHER_CACHE_METHODS)


@click.command()
@click.option("--preset", default="tiny", show_default=True, help="Preset name (see presets/) or a .toml path.")
@click.option("--mode", type=click.Choice(["train", "sample", "teacher-cache"]), default="train", show_default=True,
              help="teacher-cache: the memory of `tinymoe teacher-cache` for the teacher (--preset or --from "
              "a checkpoint) and the cache's size.")
@click.option("--batch-size", type=click.IntRange(1, MAX_INT), default=None, help="Sequences per micro-batch (default: the preset's; "
              "1 for --mode sample).")
@click.option("--context", type=click.IntRange(1, MAX_INT), default=None, help="Tokens per sequence (default: the preset's context).")
@click.option("--moe-experts", type=int, default=None, help="Override the experts per MoE layer.")
@click.option("--moe-topk", type=int, default=None, help="Override the experts each token is routed to.")
@click.option("--dtype", "--param-dtype", "param_dtype", type=click.Choice(PARAM_DTYPES), default="float32",
              show_default=True, help="Dtype of the weights, gradients and activations (train --dtype).")
@click.option("--checkpoint-activations", default="none", show_default=True,
              help="--mode train: none, every-layer or every-N (blocks recomputed in the backward pass).")
@click.option("--fit", "fit_gib", type=FiniteFloat(0, min_open=True), default=None,
              help="--mode train: the largest model of the preset's shape (and --moe-experts/--moe-topk) "
              "whose training fits a Mac of this many GiB.")
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
@click.option("--bits", type=click.Choice(["4", "8"]), default=None,
              help="--mode sample: weights quantized as by `tinymoe quantize` (routers, norms and biases float).")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
              help="With --bits: weights per scale and bias.")
@click.option("--from", "source", default=None, help="Plan for this model instead of a preset: a checkpoint or run "
              "folder, a Hugging Face config.json, or a published config (olmoe-1b-7b, qwen1.5-moe-a2.7b, "
              "qwen3-30b-a3b, mixtral-8x7b); with --mode sample or --finetune.")
@click.option("--finetune", type=click.Choice(["lora"]), default=None,
              help="Plan a `tinymoe finetune` (LoRA; QLoRA with --bits or a quantized checkpoint).")
@click.option("--lora-rank", type=click.IntRange(1, MAX_INT), default=8, show_default=True)
@click.option("--lora-targets", default="attention,experts,router", show_default=True)
@click.option("--full-router", is_flag=True, help="--finetune: the routers trained fully.")
@click.option("--published", is_flag=True, help="Verdicts for every shipped published config (sampling and "
              "fine-tuning, batch 1, --context or 2048).")
@click.option("--top-k", "cache_k", type=click.IntRange(1, MAX_INT), default=32, show_default=True,
              help="--mode teacher-cache: predictions kept per position.")
@click.option("--method", "cache_method", type=click.Choice(TEACHER_CACHE_METHODS), default="topk",
              show_default=True, help="--mode teacher-cache: topk or sample.")
@click.option("--cache-dtype", type=click.Choice(TEACHER_CACHE_DTYPES), default="float16", show_default=True,
              help="--mode teacher-cache: dtype of the stored log-probabilities.")
@click.option("--tokens", "cache_tokens", type=click.IntRange(1, MAX_INT), default=None,
              help="--mode teacher-cache: positions to cache (for the cache's size on disk).")
@click.option("--teacher-cache", "teacher_cache", type=click.Path(), default=None,
              help="--mode train: the teacher cache the run reads (memory-mapped; its reads per step).")
@click.option("--ranks", type=click.IntRange(2, MAX_INT), default=None,
              help="--mode train: one rank's memory and the bytes it sends per step when N ranks train together "
              "(mlx.launch; --batch-size is the global batch). docs/distributed.md.")
@click.option("--expert-parallel", type=click.IntRange(1, MAX_INT), default=1, show_default=True,
              help="With --ranks: experts split over this many ranks (1 or --ranks).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@user_errors
def plan(preset, mode, batch_size, context, moe_experts, moe_topk, param_dtype, optimizer, optimizer_state_dtype,
         expert_state_fraction, resident_experts, memory_gib, usable_fraction, prompt_tokens, as_json, bits=None,
         group_size="64", source=None, finetune=None, lora_rank=8, lora_targets="attention,experts,router",
         full_router=False, published=False, cache_k=32, cache_method="topk", cache_dtype="float16",
         cache_tokens=None, teacher_cache=None, checkpoint_activations="none", fit_gib=None, ranks=None,
         expert_parallel=1):
    """Print parameter counts and the memory a run of PRESET needs, and whether it fits."""
    from tinymoe.backend import mac_memory_facts
    from tinymoe.config import apply_overrides, load_preset, validate
    from tinymoe.planner import format_plan, machine_budget, plan as make_plan

    if mode == "teacher-cache":
        from tinymoe.cli.plan_distill import plan_teacher_cache

        budget = machine_budget(mac_memory_facts())
        return plan_teacher_cache(preset, source, batch_size or 8, cache_k, cache_method, cache_dtype, cache_tokens,
                                  memory_gib or budget[0], usable_fraction or budget[1], as_json)
    if source or finetune or published:
        return _plan_model(source, mode, finetune, published, batch_size, context, param_dtype, bits, group_size,
                           lora_rank, lora_targets, full_router, memory_gib, usable_fraction, as_json)

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
    from tinymoe.precision_check import checkpoint_every

    every = checkpoint_every(checkpoint_activations, model_cfg.n_layers if fit_gib is None else None)
    if ranks is not None or expert_parallel > 1:
        from tinymoe.cli.common import UserError
        from tinymoe.distributed_plan import format_ranks, plan_ranks

        if ranks is None or mode != "train" or fit_gib is not None:
            raise UserError("--ranks/--expert-parallel plan training (--mode train, no --fit); --expert-parallel "
                            "needs --ranks")
        result = plan_ranks(model_cfg, ranks=ranks, expert_parallel=expert_parallel, batch=batch,
                            grad_accum=train_cfg.grad_accum, context=context, param_dtype=param_dtype,
                            optimizer=optimizer, state_dtype=optimizer_state_dtype, checkpoint_every=every,
                            memory_gib=memory_gib or machine_gib, usable_fraction=usable_fraction or machine_fraction,
                            limit_source=limit_source)
        _show(result, preset, as_json, format_ranks)
        return
    if fit_gib is not None:
        if mode != "train":
            from tinymoe.cli.common import UserError

            raise UserError("--fit finds the largest model that trains: it goes with --mode train")
        return _fit(preset, model_cfg, fit_gib, usable_fraction or 0.75, as_json, batch=batch, context=context,
                    param_dtype=param_dtype, optimizer=optimizer, state_dtype=optimizer_state_dtype,
                    expert_state_fraction=expert_state_fraction, checkpoint_every=every,
                    grad_accum=train_cfg.grad_accum)
    result = make_plan(model_cfg, mode=mode, batch=batch, context=context, param_dtype=param_dtype,
                       optimizer=optimizer, state_dtype=optimizer_state_dtype,
                       expert_state_fraction=expert_state_fraction, resident_experts=resident_experts, prompt_tokens=prompt_tokens,
                       quant_bits=int(bits or 0), group_size=int(group_size), checkpoint_every=every,
                       grad_accum=train_cfg.grad_accum if mode == "train" else 1,
                       memory_gib=memory_gib or machine_gib, usable_fraction=usable_fraction or machine_fraction,
                       limit_source=limit_source)
    _show(result, preset, as_json, format_plan)
    if teacher_cache and mode == "train" and not as_json:
        from tinymoe.cli.plan_distill import cache_read_lines

        click.echo("\n".join(cache_read_lines(teacher_cache, batch, context or model_cfg.context)))


def _show(result: dict, preset: str, as_json: bool, formatter) -> None:
    if as_json:
        print_json({"preset": preset, **result})
    else:
        click.echo(formatter(result, f"preset {preset}"))


def _fit(preset, model_cfg, memory_gib, usable_fraction, as_json, **plan_kwargs):
    """`--fit GIB`: tinymoe.fit_plan's largest preset-shaped model that trains in GIB."""
    from tinymoe.config import to_dict
    from tinymoe.fit_plan import format_fit, largest_that_fits

    best = largest_that_fits(model_cfg, memory_gib, usable_fraction=usable_fraction, **plan_kwargs)
    if as_json:
        print_json({"preset": preset, "memory_gib": memory_gib, "usable_fraction": usable_fraction,
                    "model": to_dict(best["config"]) if best else None, "plan": best["plan"] if best else None})
    else:
        click.echo(format_fit(best, memory_gib, usable_fraction, f"{preset}-shaped model"))


def _plan_model(source, mode, finetune, published, batch_size, context, param_dtype, bits, group_size, rank,
                targets, full_router, memory_gib, usable_fraction, as_json):
    """`--from`, `--finetune`, `--published`: tinymoe.finetune_plan (a model's real shape)."""
    from tinymoe.backend import mac_memory_facts
    from tinymoe.cli.common import UserError
    from tinymoe.finetune_plan import (format_result, load_shape, plan_finetune, plan_sample, published_verdicts)
    from tinymoe.planner import machine_budget

    machine_gib, machine_fraction, _ = machine_budget(mac_memory_facts())
    budget = {"memory_gib": memory_gib or machine_gib, "usable_fraction": usable_fraction or machine_fraction}
    if published:
        rows = published_verdicts(rank, context=context or 2048, **budget)
        if as_json:
            print_json(rows)
            return
        gib = budget["memory_gib"] * budget["usable_fraction"]
        click.echo(f"published configs, batch 1, context {context or 2048}, rank {rank}; budget {gib:.1f} GiB")
        click.echo(f"{'model':<19} {'params total/active':>20} {'sample f32':>12} {'sample 4-bit':>13} "
                   f"{'LoRA f32':>12} {'QLoRA 4-bit':>12}")
        for r in rows:
            cells = [f"{r[k]['gib']:.1f}{'' if r[k]['fits'] else '!'}" for k in
                     ("sample_float32", "sample_4bit", "lora_float32", "qlora_4bit")]
            click.echo(f"{r['model']:<19} {r['params_total'] / 1e9:>8.2f}B / {r['params_active'] / 1e9:.2f}B "
                       f"{cells[0]:>12} {cells[1]:>13} {cells[2]:>12} {cells[3]:>12}")
        click.echo("(GiB; ! = does not fit)")
        return
    if not source:
        raise UserError("--finetune needs --from CHECKPOINT|config.json|PUBLISHED-NAME")
    shape, quant = load_shape(source)
    quant_bits = int(bits) if bits else (quant or {}).get("bits", 0)
    group = int(group_size) if bits or not quant else quant.get("group_size", 64)
    if finetune:
        result = plan_finetune(shape, rank=rank, targets=[t.strip() for t in targets.split(",") if t.strip()],
                               router_full=full_router, quant_bits=quant_bits, group_size=group,
                               batch=batch_size or 4, context=context, param_dtype=param_dtype, **budget)
    elif mode == "sample":
        result = plan_sample(shape, quant_bits=quant_bits, group_size=group, batch=batch_size or 1, context=context,
                             param_dtype=param_dtype, **budget)
    else:
        raise UserError("--from plans --mode sample or --finetune lora (full training: --preset)")
    if as_json:
        print_json(result)
    else:
        click.echo(format_result(result))
