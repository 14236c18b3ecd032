"""`tinymoe finetune`: low-rank adapters (LoRA, QLoRA on quantized bases) on a checkpoint."""

from __future__ import annotations

import click

from tinymoe.cli.common import FINITE, SEED, FiniteFloat, OutDir, UserError, user_errors
from tinymoe.names import DISPATCH_CHOICES, LORA_TARGETS, LOSS_ON, OPTIMIZERS

TRAIN_FLAGS = ("steps", "batch_size", "grad_accum", "lr", "warmup_steps", "eval_every", "save_every", "log_every",
               "seed", "loss_on", "optimizer")


@click.command()
@click.argument("checkpoint", type=click.Path(), required=False)
@click.option("--data", multiple=True, help="Text file, directory, glob, JSONL (text, prompt/completion or "
              "messages), or DOMAIN=PATH; repeatable. Default: the bundled corpus.")
@click.option("--out", type=OutDir(), help="Run directory to create.")
@click.option("--resume", type=click.Path(), help="Continue a fine-tuning run from its latest (or this) checkpoint.")
@click.option("--lora-rank", type=click.IntRange(min=1), default=8, show_default=True, help="Adapter rank r.")
@click.option("--lora-alpha", type=FiniteFloat(0, min_open=True), default=16.0, show_default=True,
              help="Adapter scale alpha; the low-rank term is multiplied by alpha / r.")
@click.option("--lora-targets", default="attention,experts,router", show_default=True,
              help=f"Comma-separated: {', '.join(LORA_TARGETS)}.")
@click.option("--full-router", is_flag=True, help="Train the routers' weights fully instead of an adapter "
              "(they are small: E x d_model per MoE layer).")
@click.option("--aux-loss-weight", type=FINITE, default=None, help="Load-balancing loss weight (default: the base's).")
@click.option("--z-loss-weight", type=FINITE, default=None, help="Router z-loss weight (default: the base's).")
@click.option("--context", type=click.IntRange(min=2), default=None, help="Tokens per training window "
              "(default: the base's context, at most 2048).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps [200].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Sequences per micro-batch [4].")
@click.option("--grad-accum", type=click.IntRange(min=1), default=None, help="Micro-batches per step [1].")
@click.option("--lr", type=FiniteFloat(0, min_open=True), default=None, help="Peak learning rate [2e-4].")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None, help="Linear warmup steps [10].")
@click.option("--eval-every", type=click.IntRange(min=0), default=None, help="Validate every N steps [50].")
@click.option("--save-every", type=click.IntRange(min=0), default=None, help="Checkpoint every N steps [end only].")
@click.option("--log-every", type=click.IntRange(min=1), default=None, help="Write metrics.jsonl every N steps [10].")
@click.option("--seed", type=SEED, default=None, help="Seed of the adapters' initialisation and the batches [0].")
@click.option("--loss-on", type=click.Choice(LOSS_ON), default=None, help="LM loss over all tokens, or only the "
              "targets of instruction examples [all].")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None, help="Optimizer of the adapters [adamw].")
@click.option("--moe-dispatch", "dispatch", type=click.Choice(DISPATCH_CHOICES), default=None,
              help="MoE dispatch backend (auto picks the fastest for this device).")
@click.option("--extend-steps", type=click.IntRange(min=1), default=None,
              help="With --resume: add N steps to the run.")
@click.option("--keep", type=click.IntRange(min=0), default=None, help="Older checkpoints to keep besides the latest.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier tinymoe run in --out.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
@user_errors
def finetune(checkpoint, data, out, resume, lora_rank, lora_alpha, lora_targets, full_router, aux_loss_weight,
             z_loss_weight, context, dispatch, extend_steps, keep, overwrite, quiet, as_json, **flags):
    """Fine-tune CHECKPOINT with low-rank adapters and write a run to --out.

    The base stays frozen (float, or quantized by `tinymoe quantize`: QLoRA); adapters go on the
    --lora-targets, one per routed expert for `experts`, and the router may be adapted or trained
    fully. Checkpoints hold the adapters only and name the base by digest; `tinymoe export --fuse`
    merges them. See docs/finetune.md."""
    from tinymoe.cli.train import _train

    train_over = {k: v for k, v in flags.items() if k in TRAIN_FLAGS and v is not None}
    if dispatch is not None:
        train_over["dispatch"] = dispatch
    if data:
        train_over["data"] = list(data)
    model_over = {k: v for k, v in (("aux_loss_weight", aux_loss_weight), ("z_loss_weight", z_loss_weight),
                                    ("context", context)) if v is not None}
    if resume:
        if checkpoint:
            raise UserError("--resume continues a fine-tuning run; drop the CHECKPOINT argument")
        from tinymoe.run.lifecycle import resume_run

        prepared = resume_run(resume, out, model_over, train_over, keep=keep, extend_steps=extend_steps or 0,
                              overwrite=overwrite, progress=not quiet)
        from tinymoe.nn.lora import finetune_record

        if finetune_record(prepared.trainer.model) is None:
            prepared.release()
            raise UserError(f"{resume} is not a fine-tuning run; continue it with tinymoe train --resume")
        return _train(prepared, quiet, as_json)
    if extend_steps:
        raise UserError("--extend-steps applies to --resume only")
    if not checkpoint:
        raise UserError("give the CHECKPOINT to fine-tune (or --resume RUN)")
    if not out:
        raise UserError("--out is required (the run folder to create)")
    targets = [t.strip() for t in lora_targets.split(",") if t.strip()]
    from tinymoe.run.finetune import new_finetune

    prepared = new_finetune(checkpoint, out, rank=lora_rank, alpha=lora_alpha, targets=targets,
                            router_mode="full" if full_router else "frozen", model_over=model_over,
                            train_over=train_over, overwrite=overwrite, keep=keep, progress=not quiet)
    if not quiet:
        from tinymoe.nn.lora import adapter_report

        click.echo(adapter_report(prepared.trainer.model), err=True)
    _train(prepared, quiet, as_json)
