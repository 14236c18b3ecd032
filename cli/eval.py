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
@click.option("--per-domain", is_flag=True, help="Score each data domain's tokens on their own.")
@click.option("--route-by-domain", is_flag=True, help="With --per-domain, for a run with domain experts: route "
              "every token of a mapped domain within its experts, as sample --domain does (docs/domains.md).")
@click.option("--route-by-secretary", is_flag=True, help="With --per-domain, for a run with a secretary: route each "
              "window within the experts of the domain the secretary picks from its first tokens (sample --domain auto).")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"loss", "ppl", "bits_per_byte", "tokens", "loss_on"} ({domain: {...}} with --per-domain).')
@user_errors
def eval_cmd(checkpoint, data, batch_size, max_batches, dispatch, loss_on, as_json, per_domain=False,
             route_by_domain=False, route_by_secretary=False):
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

    if (route_by_domain or route_by_secretary) and not per_domain:
        raise UserError("--route-by-domain and --route-by-secretary go with --per-domain")
    if route_by_domain and route_by_secretary:
        raise UserError("pass one of --route-by-domain and --route-by-secretary")
    if route_by_secretary and "secretary" not in model:
        raise UserError("--route-by-secretary needs a run trained with --secretary")
    if per_domain:
        return _per_domain(model, held, tokenizer, batch_size, eval_batches(max_batches), route_by_domain, as_json,
                           route_by_secretary)

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


def _per_domain(model, held, tokenizer, batch_size, max_batches, routed, as_json, by_secretary=False):
    from tinymoe.train.domains import per_domain_eval

    if routed and getattr(model, "domain_routing", None) is None:
        raise UserError("--route-by-domain: this run has no domain experts (train with --domain-experts)")
    results = per_domain_eval(model, held, tokenizer.token_byte_lengths(), batch_size, model.cfg.context,
                              max_batches, routed, by_secretary)
    if not any(r["tokens"] for r in results.values()):
        raise UserError(f"{held.what}: no domain has one context window ({model.cfg.context + 1} tokens)")
    if as_json:
        print_json(results)
        return
    click.echo(f"{'domain':<12} {'tokens':>9} {'loss':>8} {'bits/byte':>10}  routing")
    for name, r in results.items():
        if not r["tokens"]:
            click.echo(f"{name:<12} {'-':>9} (shorter than one window)")
            continue
        within = r.get("routed_within")
        how = "free" if within is None else "within experts " + ",".join(map(str, within))
        if "secretary_picks" in r:
            how = "secretary's pick per window: " + ", ".join(f"{n} {k}" for n, k in r["secretary_picks"].items())
        click.echo(f"{name:<12} {r['tokens']:>9,} {r['loss']:>8.4f} {r['bits_per_byte']:>10.4f}  {how}")
