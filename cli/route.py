"""`tinymoe route`: which experts each token of a text goes to, in every MoE layer."""

from __future__ import annotations

import sys

import click

from tinymoe.cli.common import UserError, print_json, user_errors


@click.command("route")
@click.argument("checkpoint", type=click.Path())
@click.option("--text", default=None, help="The text to route.")
@click.option("--file", "path", type=click.Path(dir_okay=False), default=None, help="Route this file's text instead.")
@click.option("--gates", is_flag=True, help="Show each expert's gate value in the table.")
@click.option("--color/--no-color", "color", default=None,
              help="Colour cells by first-choice expert (default: on for a terminal, off when NO_COLOR is set).")
@click.option("--json", "as_json", is_flag=True,
              help="Print {text, layers, tokens: [{id, text, experts, gates}]} as JSON.")
@user_errors
def route(checkpoint, text, path, gates, color, as_json):
    """For a text, the experts each token goes to in every MoE layer (first choice first).

    Texts longer than the model's context are routed in context-length chunks."""
    from pathlib import Path

    from tinymoe.io.loader import load_model
    from tinymoe.run.readers import read_latest
    from tinymoe.analysis.routing_view import route_table, route_text, token_records, use_color
    from tinymoe.text_input import clean_text

    if (text is None) == (path is None):
        raise UserError("give the text to route with --text or --file (one of them)")
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    text = clean_text(text)  # bytes that are not UTF-8 become U+FFFD (docs/errors.md)
    model, _, tokenizer, _ = read_latest(checkpoint, load_model)
    layers = model.moe_layers()
    if not layers:
        raise UserError("the model has no MoE layers; there is no routing to show")
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError("the text encodes to no tokens")
    tokens = token_records(tokenizer, ids, route_text(model, ids))
    if as_json:
        print_json({"text": text, "layers": layers, "tokens": tokens})
        return
    on = use_color(color, sys.stdout)
    # color=on: click would otherwise strip the escape codes whenever stdout is not a terminal.
    click.echo(route_table(tokens, layers, on, gates), color=on)
