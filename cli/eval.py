"""`tinymoe eval`: validation loss, perplexity and bits per byte of a checkpoint."""

from __future__ import annotations

import click

from tinymoe.cli.common import UserError, print_json, user_errors
from tinymoe.names import DISPATCH_CHOICES


@click.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", multiple=True, help="Text to evaluate on (default: the run's validation split).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--max-batches", default=None, type=click.IntRange(min=1), help="Stop after N batches.")
@click.option("--moe-dispatch", "dispatch", default="auto", show_default=True,
              type=click.Choice(DISPATCH_CHOICES))
@click.option("--loss-on", type=click.Choice(["auto", "all", "target"]), default="auto", show_default=True,
              help="Score every token, or only the targets of instruction examples; auto: only the targets "
                   "when the data holds instruction examples.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"loss", "ppl", "bits_per_byte", "tokens", "loss_on"}.')
@user_errors
def eval_cmd(checkpoint, data, batch_size, max_batches, dispatch, loss_on, as_json):
    """Score CHECKPOINT on held-out text: loss (nats/token), perplexity, bits per byte."""
    from tinymoe.data.prepare import held_out_tokens
    from tinymoe.train.evaluate import evaluate
    from tinymoe.io.loader import load_model
    from tinymoe.run.readers import read_latest

    model, manifest, tokenizer, ckpt = read_latest(checkpoint, lambda c: load_model(c, dispatch))
    held = held_out_tokens(manifest, tokenizer, data)
    tokens, what = held.tokens, held.what
    model.train(False)
    target_only = loss_on == "target" or (loss_on == "auto" and held.has_prompts)
    from tinymoe.quick import eval_batches

    result = evaluate(model, tokens, tokenizer.token_byte_lengths(), batch_size, model.cfg.context,
                      eval_batches(max_batches),
                      held.mask if target_only else None)
    if result["tokens"] == 0 and target_only and tokens.size > model.cfg.context:
        raise UserError(f"{what}: no target token in the windows scored (raise --max-batches)")
    if result["tokens"] == 0:
        raise UserError(f"{what} is shorter than one context window ({model.cfg.context + 1} tokens)")
    if as_json:
        print_json(result)
        return
    click.echo(f"checkpoint      {ckpt} (step {manifest['step']})")
    scored = "target tokens scored (prompt tokens not scored)" if target_only else "tokens scored"
    click.echo(f"data            {what}, {result['tokens']:,} {scored}")
    click.echo(f"loss            {result['loss']:.4f} nats/token")
    click.echo(f"perplexity      {result['ppl']:.3f}")
    click.echo(f"bits per byte   {result['bits_per_byte']:.4f}")
