"""`tinymoe inspect`: a checkpoint's summary and what its routers do with data.

Per MoE layer: expert load (a bar chart), router entropy, load CV, dead experts, drop rate, and,
when the routed data carries domain tags, the domain x expert table and the specialization score;
for top-k > 1 the expert pairs that fire together. Definitions: tinymoe/analysis/stats.py and
docs/inspect.md. `--plot DIR` also draws the load and domain x expert heatmaps.
"""

from __future__ import annotations

from pathlib import Path

import click

from tinymoe.cli.common import OutDir, print_json, user_errors


@click.command("inspect")
@click.argument("checkpoint", type=click.Path())
@click.option("--data", multiple=True, help="Route this text (default: the run's validation split); "
              "DOMAIN=PATH, subdirectories and JSONL domain fields give domain tags.")
@click.option("--summary-only", is_flag=True, help="Only the manifest summary; route no data.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--max-batches", default=20, show_default=True, type=click.IntRange(min=1),
              help="Route at most this many batches of windows, spread evenly over the data.")
@click.option("--plot", "plot_dir", type=OutDir(),
              help="Also write load.png and domain_expert.png here (needs tinymoe[plot]).")
@click.option("--json", "as_json", is_flag=True, help="Print {params, domains, layers: [...]} as JSON.")
@user_errors
def inspect_cmd(checkpoint, data, summary_only, batch_size, max_batches, plot_dir, as_json):
    """Summarise CHECKPOINT and what its routers do: per-layer expert load, router entropy, load CV,
    dead experts, drop rate, domain x expert shares, specialization and co-activation."""
    from tinymoe.analysis.stats import routing_stats
    from tinymoe.data.prepare import held_out_tokens
    from tinymoe.io.loader import load_model
    from tinymoe.run.readers import read_latest

    if plot_dir:
        from tinymoe.analysis.plots import require_matplotlib

        require_matplotlib()  # fail before the slow part when matplotlib is missing
    model, manifest, tokenizer, ckpt = read_latest(checkpoint, load_model)
    cfg = model.cfg
    summary = {
        "checkpoint": str(ckpt), "step": manifest["step"], "tokens_seen": manifest.get("tokens_seen"),
        "params": manifest.get("params"),
        "model": {"layers": cfg.n_layers, "d_model": cfg.d_model, "heads": cfg.n_heads, "context": cfg.context,
                  "vocab": cfg.vocab_size, "experts": cfg.moe_experts, "top_k": cfg.moe_topk,
                  "moe_layers": model.moe_layers()},
        "tokenizer": manifest["tokenizer"].get("kind"),
        "metrics": manifest.get("metrics", {}),
        "domains": [], "domain_tokens": [],
        "stages": _stage_history(manifest),
        "finetune": ({k: v for k, v in manifest["finetune"].items() if k != "base"}
                     | {"base": manifest["finetune"].get("base", {}).get("path")} if "finetune" in manifest else None),
        "quantization": ({k: manifest["quantization"][k] for k in ("bits", "group_size", "modules")}
                         if "quantization" in manifest else None),
        "domain_experts": manifest.get("domains"),  # the target mapping (docs/domains.md), or None
    }
    layers = []
    if not summary_only and model.moe_layers():
        from tinymoe.quick import eval_batches

        max_batches = eval_batches(max_batches)
        held = held_out_tokens(manifest, tokenizer, data)
        tokens, what, domain_ids, domain_names = held.tokens, held.what, held.domain_ids, held.domain_names
        routed = routing_stats(model, tokens, batch_size, cfg.context, max_batches, domain_ids, domain_names)
        layers = routed["layers"]
        summary.update(routed_on=what, routed_tokens=routed["tokens"], domains=routed["domains"],
                       domain_tokens=routed["domain_tokens"])
        if "finetune" in manifest:  # a fine-tune: how far its routing moved from the base's
            from tinymoe.analysis.drift import routing_drift
            from tinymoe.io.reader import open_checkpoint

            base = open_checkpoint(ckpt).base_model()
            summary["drift"] = routing_drift(model, base, tokens, batch_size, cfg.context, max_batches)
    if summary["domain_experts"]:
        _target_shares(layers, summary["domains"], summary["domain_experts"]["experts"])
    summary["layers"] = layers
    written = _plots(summary, Path(plot_dir)) if plot_dir and layers else []
    if as_json:
        print_json(summary)
    else:
        _print(summary)
    for path in written:
        click.echo(f"wrote {path}", err=True)


def _stage_history(manifest: dict) -> list:
    """The run's stages (name, steps, status, groups, loss) when it was trained in stages."""
    from tinymoe.stages import from_dicts, history

    stored = manifest.get("stages")
    if stored is None:
        return []
    plan = from_dicts(stored.get("plan") if isinstance(stored, dict) else None, "the checkpoint's manifest.json")
    return history(plan, manifest["step"])


def _plots(summary: dict, out: Path) -> list:
    from tinymoe.analysis.plots import domain_expert_heatmaps, load_heatmap

    written = [load_heatmap(summary["layers"], out / "load.png")]
    if summary["domains"]:
        written.append(domain_expert_heatmaps(summary["layers"], summary["domains"], out / "domain_expert.png"))
    return written


def _print(s):
    m, p = s["model"], s["params"] or {}
    click.echo(f"checkpoint   {s['checkpoint']}  (step {s['step']}, {s['tokens_seen'] or 0:,} tokens seen)")
    kind = f"{m['experts']} experts, top-{m['top_k']}, MoE layers {m['moe_layers']}" if m["experts"] > 1 else "dense"
    click.echo(f"model        {m['layers']} layers x d_model {m['d_model']}, {m['heads']} heads, "
               f"context {m['context']}, vocab {m['vocab']} ({s['tokenizer']}); {kind}")
    if p:
        click.echo(f"parameters   {p['total']:,} total, {p['active']:,} active per token")
    f = s.get("finetune")
    if f:
        click.echo(f"fine-tune    LoRA rank {f['rank']}, alpha {f['alpha']:g}, targets {', '.join(f['targets'])}, "
                   f"router {f['router']}; base {f['base']}")
    q = s.get("quantization")
    if q:
        click.echo(f"quantized    {q['bits']}-bit, group size {q['group_size']}: {len(q['modules'])} layers "
                   f"(routers, norms and biases in float)")
    for i, st in enumerate(s["stages"]):
        click.echo(f"{'stages' if i == 0 else '':<12} {i + 1}. {st['name']}: steps {st['first_step']}-{st['last_step']}"
                   f" ({st['status']}), train {', '.join(st['train'])}, loss on {st['loss_on']}")
    metrics = {k: round(v, 4) for k, v in s["metrics"].items() if isinstance(v, float)}
    if metrics:
        click.echo("last losses  " + ", ".join(f"{k} {v}" for k, v in metrics.items()))
    if s["layers"]:
        doms = ", ".join(f"{d} {n:,}" for d, n in zip(s["domains"], s["domain_tokens"]))
        click.echo(f"routed on    {s.get('routed_on')}: {s.get('routed_tokens', 0):,} tokens"
                   + (f" ({doms})" if doms else ""))
    d = s.get("domain_experts")
    if d:
        acc = d.get("secretary_val_accuracy")
        click.echo(f"domain map   {', '.join(f'{n}={_ids(v)}' for n, v in d['experts'].items())} ({d['mode']}"
                   + (f", weight {d['weight']:g}" if d["mode"] == "soft" else "") + ")"
                   + (f"; secretary val accuracy {acc:.3f}" if acc is not None else
                      ("; secretary (not validated yet)" if d.get("secretary") else "")))
    for layer in s["layers"]:
        _print_layer(layer, s["domains"], (d or {}).get("experts"))
    if s.get("drift"):
        _print_drift(s["drift"])
    if s["layers"]:
        click.echo("\n(dead = under 10% of the uniform share 1/E; specialization = I(domain; expert) / "
                   "H(domain): 0 = routing ignores the domain, 1 = each expert serves one domain)")


def _ids(ids: list[int]) -> str:
    return f"{ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else ",".join(map(str, ids))


def _target_shares(layers: list, domains: list, mapping: dict) -> None:
    """Per layer, each mapped domain's share of routed slots that landed on its target experts."""
    for layer in layers:
        table = layer.get("domain_expert")
        layer["target_share"] = None if table is None else {
            name: round(sum(row[e] for e in mapping[name]), 4) for name, row in zip(domains, table) if name in mapping}


def _print_layer(layer: dict, domains: list, mapping: dict | None = None) -> None:
    from tinymoe.analysis.stats import bar

    E = layer["experts"]
    spec = layer["specialization"]
    click.echo(f"\nlayer {layer['layer']}: entropy {layer['entropy']:.3f} of {layer['max_entropy']:.3f} nats, "
               f"load CV {layer['load_cv']:.3f}, dead experts {layer['dead_experts']}/{E}, "
               f"drop rate {100 * layer['drop_rate']:.1f}%"
               + (f", specialization {spec:.3f}" if spec is not None else ""))
    top = max(layer["load"]) or 1.0
    by_expert = layer.get("expert_domain")
    for e, share in enumerate(layer["load"]):
        mark = "  dead" if share < 0.1 / E else ""
        main = ""
        if by_expert and len(domains) > 1 and share > 0:
            d = max(range(len(domains)), key=lambda j: by_expert[e][j])
            main = f"  {100 * by_expert[e][d]:3.0f}% {domains[d]}"
        click.echo(f"  expert {e:3d} {bar(share, top)} {100 * share:5.1f}%{mark}{main}")
    if layer["domain_expert"] is not None:
        width = max([6] + [len(d) for d in domains])
        click.echo(f"  {'domain':<{width}}  " + " ".join(f"{e:>4d}" for e in range(E))
                   + "   (% of the domain's routed slots per expert" + ("; * = its target experts)" if mapping else ")"))
        for name, row in zip(domains, layer["domain_expert"]):
            target = (mapping or {}).get(name, [])
            line = f"  {name:<{width}}  " + " ".join(f"{100 * v:4.0f}" + ("*" if e in target else " ")
                                                     for e, v in enumerate(row))
            if mapping and name in mapping:
                line += f"  target {_ids(target)}: {100 * layer['target_share'][name]:.0f}% on target"
            elif mapping:
                line += "  (no target: routes freely)"
            click.echo(line)
    if layer["top_pairs"]:
        pairs = ", ".join(f"{a}+{b} {100 * p['share']:.0f}%" + (f" (lift {p['lift']:.2f})" if p["lift"] else "")
                          for p in layer["top_pairs"][:3] for a, b in [p["experts"]])
        click.echo(f"  fire together: {pairs}  (share of tokens using both)")


def _print_drift(drift: dict) -> None:
    click.echo(f"\nrouting drift against the base model ({drift['tokens']:,} tokens, the same windows):")
    for layer in drift["layers"]:
        change = " ".join(f"{100 * v:+.1f}" for v in layer["load_change"])
        click.echo(f"  layer {layer['layer']}: top-k set changed for {100 * layer['topk_changed']:.1f}% of tokens, "
                   f"first choice for {100 * layer['first_changed']:.1f}%; load change per expert (points): {change}")
