"""`tinymoe probe`: where a token's domain can be read off, layer by layer (docs/domains.md).

Per layer, a linear probe predicts each held-out token's data domain from the residual stream
after that block and from each MoE layer's routing distribution (tinymoe.analysis.probe); a run
with domain experts adds its mapping and its secretary's accuracy on the same windows."""

from __future__ import annotations

import click

from tinymoe.cli.common import UserError, print_json, user_errors
from tinymoe.names import DISPATCH_CHOICES


@click.command("probe")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", multiple=True, help="Text to probe on, with domains (DOMAIN=PATH or a corpus folder; "
              "default: the run's validation split).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--max-batches", default=8, show_default=True, type=click.IntRange(min=1),
              help="Windows read: batch size x this, spread over the held-out text.")
@click.option("--moe-dispatch", "dispatch", default="auto", show_default=True, type=click.Choice(DISPATCH_CHOICES))
@click.option("--json", "as_json", is_flag=True, help='Print {"domains", "chance", "hidden": [{layer, accuracy}], '
              '"routing": [...], "tokens", "mapping", "secretary_accuracy"}.')
@user_errors
def probe(checkpoint, data, batch_size, max_batches, dispatch, as_json):
    """Held-out accuracy of linear probes that predict a token's domain from CHECKPOINT's hidden
    states and routing vectors, per layer."""
    from tinymoe.analysis.probe import collect, run_probes
    from tinymoe.data.prepare import held_out_tokens
    from tinymoe.io.loader import load_model
    from tinymoe.quick import eval_batches
    from tinymoe.run.readers import read_latest

    model, manifest, tokenizer, ckpt = read_latest(checkpoint, lambda c: load_model(c, dispatch))
    held = held_out_tokens(manifest, tokenizer, data)
    if len(held.domain_names) < 2:
        raise UserError(f"{held.what}: one domain ({held.domain_names[0] if held.domain_names else 'none'}); "
                        f"probes need text of two or more (--data NAME=PATH ...)")
    model.train(False)
    max_batches = eval_batches(max_batches)
    collected = collect(model, held.tokens, held.domain_ids, batch_size, model.cfg.context, max_batches)
    result = {"checkpoint": str(ckpt), "step": manifest.get("step"), "domains": list(held.domain_names),
              **run_probes(collected, model.moe_layers(), len(held.domain_names))}
    if result["chance"] is None:
        raise UserError(f"{held.what}: too little text for a fitted and a scored half with two domains "
                        f"(raise --max-batches)")
    record = manifest.get("domains")
    result["mapping"] = record["experts"] if record else None
    result["secretary_accuracy"] = None
    if record and "secretary" in model:
        from tinymoe.train.domains import secretary_accuracy

        ids = _as_run_ids(held, record["data_domains"])
        result["secretary_accuracy"] = secretary_accuracy(model, held.tokens, ids, batch_size, model.cfg.context,
                                                          max_batches)
    if as_json:
        print_json(result)
        return
    click.echo(f"checkpoint  {ckpt} (step {result['step']}); {result['tokens']['scored']:,} held-out tokens scored, "
               f"{result['tokens']['fit']:,} fitted; domains {', '.join(result['domains'])}")
    click.echo(f"chance (majority domain) {result['chance']:.3f}")
    routing = {r["layer"]: r["accuracy"] for r in result["routing"]}
    click.echo(f"{'layer':>5} {'hidden':>8} {'routing':>8}")
    for h in result["hidden"]:
        r = routing.get(h["layer"])
        click.echo(f"{h['layer']:>5} {h['accuracy']:>8.3f} {'-' if r is None else f'{r:.3f}':>8}")
    if result["mapping"]:
        click.echo("mapping     " + ", ".join(f"{n}={_ids(v)}" for n, v in result["mapping"].items()))
    if result["secretary_accuracy"] is not None:
        click.echo(f"secretary   {result['secretary_accuracy']:.3f} of held-out windows")


def _ids(ids: list[int]) -> str:
    return f"{ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else ",".join(map(str, ids))


def _as_run_ids(held, run_domains: list[str]):
    """The held-out tokens' domain ids in the run's numbering (a domain it never saw: -1)."""
    import numpy as np

    table = np.array([run_domains.index(n) if n in run_domains else -1 for n in held.domain_names], dtype=np.int64)
    return table[np.asarray(held.domain_ids, dtype=np.int64)]
