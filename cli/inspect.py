"""`tinymoe inspect`: a checkpoint's summary and what its routers do with data."""

from __future__ import annotations

import click

from tinymoe.cli.common import print_json, user_errors


@click.command("inspect")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", multiple=True, help="Route this text (default: the run's validation split).")
@click.option("--summary-only", is_flag=True, help="Only the manifest summary; route no data.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--max-batches", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print {params, layers: [...]} as JSON.")
@user_errors
def inspect_cmd(checkpoint, data, summary_only, batch_size, max_batches, as_json):
    """Summarise CHECKPOINT and its per-layer expert load, router entropy and dead experts."""
    from tinymoe.analysis import routing_stats
    from tinymoe.cli.eval import held_out_tokens
    from tinymoe.loader import load_model

    model, manifest, tokenizer, ckpt = load_model(checkpoint)
    cfg = model.cfg
    summary = {
        "checkpoint": str(ckpt), "step": manifest["step"], "tokens_seen": manifest.get("tokens_seen"),
        "params": manifest.get("params"),
        "model": {"layers": cfg.n_layers, "d_model": cfg.d_model, "heads": cfg.n_heads, "context": cfg.context,
                  "vocab": cfg.vocab_size, "experts": cfg.moe_experts, "top_k": cfg.moe_topk,
                  "moe_layers": model.moe_layers()},
        "tokenizer": manifest["tokenizer"].get("kind"),
        "metrics": manifest.get("metrics", {}),
    }
    layers = []
    if not summary_only and model.moe_layers():
        tokens, what = held_out_tokens(manifest, tokenizer, data)
        layers = routing_stats(model, tokens, batch_size, cfg.context, max_batches)
        summary["routed_on"] = what
    summary["layers"] = layers
    if as_json:
        print_json(summary)
        return
    _print(summary)


def _print(s):
    from tinymoe.analysis import bar

    m, p = s["model"], s["params"] or {}
    click.echo(f"checkpoint   {s['checkpoint']}  (step {s['step']}, {s['tokens_seen'] or 0:,} tokens seen)")
    kind = f"{m['experts']} experts, top-{m['top_k']}, MoE layers {m['moe_layers']}" if m["experts"] > 1 else "dense"
    click.echo(f"model        {m['layers']} layers x d_model {m['d_model']}, {m['heads']} heads, "
               f"context {m['context']}, vocab {m['vocab']} ({s['tokenizer']}); {kind}")
    if p:
        click.echo(f"parameters   {p['total']:,} total, {p['active']:,} active per token")
    metrics = {k: round(v, 4) for k, v in s["metrics"].items() if isinstance(v, float)}
    if metrics:
        click.echo("last losses  " + ", ".join(f"{k} {v}" for k, v in metrics.items()))
    for layer in s["layers"]:
        E = layer["experts"]
        click.echo(f"\nlayer {layer['layer']}: entropy {layer['entropy']:.3f} of {layer['max_entropy']:.3f} nats, "
                   f"load CV {layer['load_cv']:.3f}, dead experts {layer['dead_experts']}/{E}")
        top = max(layer["load"]) or 1.0
        for e, share in enumerate(layer["load"]):
            mark = "  dead" if share < 0.1 / E else ""
            click.echo(f"  expert {e:3d} {bar(share, top)} {100 * share:5.1f}%{mark}")
    if s["layers"]:
        click.echo(f"\n(routed on {s.get('routed_on')}; dead = under 10% of the uniform share 1/E)")
