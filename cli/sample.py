"""`tinymoe sample`: stream text from a checkpoint.

With `--show-routing` the text is printed once generation ends (a token's routing is known only
after the model has read it), each token coloured by the expert it went to first in one MoE
layer, followed by a legend; `--json` then adds every token's experts and gates in every layer."""

from __future__ import annotations

import sys
import time

import click

from tinymoe.cli.common import SEED, FiniteFloat, UserError, print_json, user_errors
from tinymoe.names import DISPATCH_CHOICES


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--prompt", default="", help="Text to continue (default: a newline).")
@click.option("--max-tokens", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.8, show_default=True, type=FiniteFloat(min=0),
              help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=FiniteFloat(0, 1, min_open=True),
              help="Nucleus sampling mass (1 = off).")
@click.option("--seed", default=None, type=SEED, help="Seed for reproducible samples.")
@click.option("--moe-dispatch", "dispatch", default="auto", show_default=True,
              type=click.Choice(DISPATCH_CHOICES))
@click.option("--show-routing", is_flag=True, help="Colour each token by the expert it was sent to (first choice).")
@click.option("--layer", type=int, default=None, help="Block index of the MoE layer --show-routing colours by "
              "(default: the last MoE layer).")
@click.option("--color/--no-color", "color", default=None,
              help="Force colour on or off (default: on for a terminal, off when NO_COLOR is set).")
@click.option("--resident-experts", type=click.IntRange(min=1), default=None,
              help="Keep at most N experts per MoE layer in memory (LRU, read on demand from the "
                   "memory-mapped checkpoint); reports the cache hit rate.")
@click.option("--domain", default=None, help="A run with domain experts (docs/domains.md): route every token "
              "within this domain's experts; auto lets the run's secretary pick it from the prompt.")
@click.option("--load-domain-experts-only", "domain_only", is_flag=True,
              help="With --domain: read only that domain's experts from the memory-mapped checkpoint "
                   "(plus the non-expert weights); reports the bytes read and resident memory.")
@click.option("--json", "as_json", is_flag=True, help="Print {prompt, text, tokens, tokens_per_s, prefill_tokens_per_s, "
              "decode_tokens_per_s} as JSON "
              "(with --show-routing also routing: {layers, tokens: [{id, text, experts, gates, prompt}]}).")
@user_errors
def sample(checkpoint, prompt, max_tokens, temperature, top_k, top_p, seed, dispatch, show_routing, layer,
           color, as_json, resident_experts=None, domain=None, domain_only=False):
    """Generate text from CHECKPOINT (a checkpoint or run directory)."""
    from tinymoe.io.loader import load_model
    from tinymoe.run.readers import read_latest
    from tinymoe.router_registry import require_causal
    from tinymoe.infer.sample import generate
    from tinymoe.text_input import clean_text
    from tinymoe.tokenizers.stream import StreamDecoder

    caches = None
    chosen = None  # the domain routing, when --domain is given
    if domain_only and (domain is None or resident_experts is not None):
        raise UserError("--load-domain-experts-only needs --domain NAME|auto (and not --resident-experts)")
    if domain_only:
        model, manifest, tokenizer, chosen = _load_domain_only(checkpoint, domain, prompt, dispatch)
    elif resident_experts is not None:
        from tinymoe.infer.offload import load_model_offloaded

        if show_routing:  # the offloaded layers see renumbered expert ids
            raise UserError("--resident-experts cannot be combined with --show-routing")
        model, manifest, tokenizer, _, caches = read_latest(
            checkpoint, lambda c: load_model_offloaded(c, resident_experts, dispatch))
    else:
        model, manifest, tokenizer, _ = read_latest(checkpoint, lambda c: load_model(c, dispatch))
    if domain is not None and chosen is None:
        if resident_experts is not None:
            raise UserError("--domain cannot be combined with --resident-experts")
        chosen = _route_domain(model, tokenizer, domain, prompt)
    require_causal(model.cfg)  # before any output: expert-choice routing cannot generate
    prompt = clean_text(prompt)  # bytes that are not UTF-8 become U+FFFD (docs/errors.md)
    prompt_ids = tokenizer.encode(prompt or "\n")
    if not prompt_ids:
        raise UserError("the prompt encodes to no tokens")
    if chosen is not None and not as_json:
        click.echo(domain_note(chosen), err=True)
    if show_routing:
        column = pick_layer(model, layer)
        return _sample_routed(model, tokenizer, prompt, prompt_ids, column, color, as_json,
                              (max_tokens, temperature, top_k, top_p, seed))
    if not as_json:
        click.echo(prompt, nl=False)
    generated: list[int] = []
    # Decodes a short window per token (a partial UTF-8 character is held back until its
    # remaining bytes arrive); decoding all generated tokens each step was quadratic.
    stream = StreamDecoder(tokenizer)
    start, timing = time.perf_counter(), {}
    for token in generate(model, prompt_ids, max_tokens, temperature, top_k, top_p, seed, timing=timing):
        generated.append(token)
        if not as_json:
            piece = stream.add(token)
            if piece:
                click.echo(piece, nl=False)
                sys.stdout.flush()
    seconds = time.perf_counter() - start
    text = tokenizer.decode(generated)
    tok_s = len(generated) / seconds if seconds > 0 else 0.0
    stats = None
    if caches is not None:
        from tinymoe.infer.offload import cache_stats

        stats = cache_stats(caches)
    speeds = phase_speeds(timing)
    if as_json:
        print_json({"prompt": prompt, "text": text, "tokens": len(generated), "tokens_per_s": round(tok_s, 1),
                    **speeds, **({"expert_cache": stats} if stats else {}),
                    **({"domain": chosen} if chosen is not None else {})})
        return
    click.echo(stream.flush())
    cache_note = (f", expert cache hit rate {stats['hit_rate']:.1%} ({stats['misses']} loads)"
                  if stats and stats["hit_rate"] is not None else "")
    click.echo(f"\n[{len(generated)} tokens, {tok_s:.1f} tokens/s: {phase_note(speeds)}{cache_note}]", err=True)


def _route_domain(model, tokenizer, domain: str, prompt: str) -> dict:
    """Fix a fully loaded model's routing to `domain` (or the secretary's choice): {"domain", ...}."""
    from tinymoe.domains import experts_of
    from tinymoe.nn.domain import set_domain

    if getattr(model, "domain_routing", None) is None:
        raise UserError("--domain: this run has no domain experts (train with --domain-experts)")
    chosen = _pick_domain(model, tokenizer, domain, prompt)
    experts_of({"experts": model.domain_routing.experts}, chosen["domain"])  # a known name, or one line
    set_domain(model, chosen["domain"])
    return chosen


def _pick_domain(model, tokenizer, domain: str, prompt: str) -> dict:
    from tinymoe.nn.domain import predict_domain
    from tinymoe.text_input import clean_text

    if domain != "auto":
        return {"domain": domain, "by": "flag"}
    if "secretary" not in model:
        raise UserError("--domain auto needs a run trained with --secretary")
    name, prob = predict_domain(model, tokenizer.encode(clean_text(prompt) or "\n"))
    return {"domain": name, "by": "secretary", "probability": round(prob, 4)}


def _load_domain_only(checkpoint, domain: str, prompt: str, dispatch: str):
    """(model with only the domain's experts, manifest, tokenizer, domain record)."""
    from tinymoe.infer.domain_load import load_domain_experts, open_domain_model, resident_bytes
    from tinymoe.planner import plan
    from tinymoe.run.readers import read_latest

    model, mapped, manifest, tokenizer, _ = read_latest(checkpoint, lambda c: open_domain_model(c, dispatch))
    chosen = _pick_domain(model, tokenizer, domain, prompt)
    loaded = load_domain_experts(model, mapped, manifest, chosen["domain"])
    planned = plan(model.cfg, mode="sample", resident_experts=len(loaded["experts"]))["bytes"]["weights"]
    return model, manifest, tokenizer, {**chosen, **loaded, "planned_weight_bytes": planned,
                                        "resident_bytes": resident_bytes()}


def domain_note(chosen: dict) -> str:
    how = f"secretary, p={chosen['probability']:.2f}" if chosen["by"] == "secretary" else "--domain"
    note = f"[domain {chosen['domain']} ({how})"
    if "expert_bytes_read" in chosen:
        mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
        rss = f", process resident {mib(chosen['resident_bytes'])}" if chosen["resident_bytes"] else ""
        note += (f"; read experts {', '.join(map(str, chosen['experts']))}: {mib(chosen['expert_bytes_read'])} of "
                 f"{mib(chosen['expert_bytes_total'])} expert bytes; weights held {mib(chosen['weight_bytes'])} "
                 f"(plan: {mib(chosen['planned_weight_bytes'])}) + secretary {chosen['secretary_bytes']} B{rss}")
    return note + "]"


def phase_speeds(timing: dict) -> dict:
    """Prefill (prompt tokens until the first new token is known) and decode (each later token)
    speeds from `generate`'s timing record; None where a phase took no measurable time."""
    rate = lambda n, s: round(n / s, 1) if s > 0 and n > 0 else None  # noqa: E731
    return {"prompt_tokens": timing.get("prompt_tokens", 0),
            "prefill_tokens_per_s": rate(timing.get("prompt_tokens", 0), timing.get("prefill_s", 0)),
            "decode_tokens_per_s": rate(timing.get("decode_tokens", 0), timing.get("decode_s", 0))}


def phase_note(speeds: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return (f"prefill {speeds['prompt_tokens']} tokens at {fmt(speeds['prefill_tokens_per_s'])} tokens/s, "
            f"decode {fmt(speeds['decode_tokens_per_s'])} tokens/s")


def pick_layer(model, layer: int | None) -> int:
    """Column (position among the MoE layers) of block `layer`; default the last MoE layer."""
    moe = model.moe_layers()
    if not moe:
        raise UserError("the model has no MoE layers; there is no routing to show")
    if layer is None:
        return len(moe) - 1
    if layer not in moe:
        raise UserError(f"--layer {layer}: not an MoE layer (MoE layers: {', '.join(map(str, moe))})")
    return moe.index(layer)


def _sample_routed(model, tokenizer, prompt, prompt_ids, column, color, as_json, settings):
    from tinymoe.analysis.routing_view import generation_routing, legend, render_text, token_records, use_color
    from tinymoe.infer.sample import generate

    records: list = []
    start, timing = time.perf_counter(), {}
    generated = list(generate(model, prompt_ids, *settings, routing=records, timing=timing))
    seconds = time.perf_counter() - start
    layers = model.moe_layers()
    routing = generation_routing(records, len(layers), len(prompt_ids), len(generated), model.cfg.context)
    tokens = token_records(tokenizer, list(prompt_ids) + generated, routing, n_prompt=len(prompt_ids))
    tok_s = len(generated) / seconds if seconds > 0 else 0.0
    speeds = phase_speeds(timing)
    if as_json:
        print_json({"prompt": prompt, "text": tokenizer.decode(generated), "tokens": len(generated),
                    "tokens_per_s": round(tok_s, 1), **speeds, "routing": {"layers": layers, "tokens": tokens}})
        return
    on = use_color(color, sys.stdout)
    # color=on: click would otherwise strip the escape codes whenever stdout is not a terminal.
    click.echo(render_text(tokens, column, on), color=on)
    click.echo(f"\nlayer {layers[column]}, first-choice expert: " + legend(tokens, column, model.cfg.moe_experts, on),
               color=on)
    click.echo(f"[{len(generated)} tokens, {tok_s:.1f} tokens/s: {phase_note(speeds)}]", err=True)
