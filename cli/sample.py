"""`tinymoe sample`: stream text from a checkpoint."""

from __future__ import annotations

import sys
import time

import click

from tinymoe.cli.common import UserError, print_json, user_errors


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--prompt", default="", help="Text to continue (default: a newline).")
@click.option("--max-tokens", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(min=0),
              help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Nucleus sampling mass (1 = off).")
@click.option("--seed", default=None, type=int, help="Seed for reproducible samples.")
@click.option("--moe-dispatch", "dispatch", default="auto", show_default=True,
              type=click.Choice(["auto", "dense", "gather", "grouped", "metal"]))
@click.option("--json", "as_json", is_flag=True, help="Print {prompt, text, tokens, tokens_per_s} as JSON.")
@user_errors
def sample(checkpoint, prompt, max_tokens, temperature, top_k, top_p, seed, dispatch, as_json):
    """Generate text from CHECKPOINT (a checkpoint or run directory)."""
    from tinymoe.loader import load_model
    from tinymoe.sample import generate

    model, manifest, tokenizer, _ = load_model(checkpoint, dispatch)
    prompt_ids = tokenizer.encode(prompt or "\n")
    if not prompt_ids:
        raise UserError("the prompt encodes to no tokens")
    if not as_json:
        click.echo(prompt, nl=False)
    generated: list[int] = []
    printed = ""
    start = time.perf_counter()
    for token in generate(model, prompt_ids, max_tokens, temperature, top_k, top_p, seed):
        generated.append(token)
        if not as_json:
            text = tokenizer.decode(generated)
            # Hold back a trailing partial UTF-8 character until its remaining bytes arrive.
            safe = text.rstrip("\ufffd")
            if len(safe) > len(printed):
                click.echo(safe[len(printed):], nl=False)
                sys.stdout.flush()
                printed = safe
    seconds = time.perf_counter() - start
    text = tokenizer.decode(generated)
    tok_s = len(generated) / seconds if seconds > 0 else 0.0
    if as_json:
        print_json({"prompt": prompt, "text": text, "tokens": len(generated), "tokens_per_s": round(tok_s, 1)})
        return
    click.echo(text[len(printed):])
    click.echo(f"\n[{len(generated)} tokens, {tok_s:.1f} tokens/s]", err=True)
