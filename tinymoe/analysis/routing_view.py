"""Routed-token views: which experts each token of a text went to, as data and as terminal text.

`route_text` runs a text through the model and `generation_routing` reads the records that
`sample.generate(..., routing=...)` collected; both give, per token, one entry per MoE layer with
that layer's kept experts (first choice first) and their gates. `token_records` turns that into
the JSON list of `route --json` and `sample --show-routing --json`. The renderers colour each
token by its first-choice expert with ANSI 256-colour backgrounds (so spaces and tabs show), or
mark it with a subscript expert number when colour is off (`--no-color`, NO_COLOR set, or a stdout
that is not a terminal).
"""

from __future__ import annotations

import json
import os

import numpy as np

from tinymoe.tokenizers.stream import token_pieces  # linear-time; re-exported for callers

# Light backgrounds under black text stay readable on dark and light terminals alike; the first
# eight (the usual expert count of small MoEs) are the most different hues.
PALETTE = (117, 214, 120, 211, 229, 141, 250, 180, 87, 209, 150, 183, 223, 110, 186, 158)
RESET = "\x1b[0m"
SUBSCRIPT = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def use_color(flag: bool | None, stream) -> bool:
    """An explicit --color/--no-color wins; otherwise colour only on a terminal without NO_COLOR."""
    if flag is not None:
        return flag
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def paint(text: str, expert: int | None) -> str:
    """`text` on the expert's background colour; newlines stay outside the colour so a coloured
    background never runs on to the end of a terminal line."""
    if expert is None or not text:
        return text
    code = f"\x1b[30;48;5;{PALETTE[expert % len(PALETTE)]}m"
    return "\n".join(code + part + RESET if part else part for part in text.split("\n"))


# ----------------------------------------------------------------------------- collecting


def _rows(records: list, n_layers: int, rows: slice) -> list:
    """Per token in `rows`: [(experts, gates) per MoE layer] from one forward's records."""
    per_layer = []
    for r in records[:n_layers]:
        idx = np.array(r["indices"])[rows]  # (T, K)
        gates = np.array(r["gates"])[rows]  # (T, K); the router computes in float32
        kept = np.ones(idx.shape, dtype=bool) if r.get("kept") is None else np.array(r["kept"])[rows]
        per_layer.append([([int(e) for e, k in zip(i_row, k_row) if k],
                           [round(float(g), 4) for g, k in zip(g_row, k_row) if k])
                          for i_row, g_row, k_row in zip(idx, gates, kept)])
    return [list(tok) for tok in zip(*per_layer)]


def route_text(model, ids: list[int]) -> list:
    """Routing of every token of `ids`, run in consecutive context-length chunks (a chunk does not
    see the one before it, as in evaluation)."""
    import mlx.core as mx

    n_layers = len(model.moe_layers())
    out = []
    context = model.cfg.context
    model.train(False)
    for start in range(0, len(ids), context):
        routing: list = []
        model(mx.array([ids[start:start + context]]), routing=routing)
        out.extend(_rows(routing, n_layers, slice(None)))
    return out


def generation_routing(records: list, n_layers: int, n_prompt: int, n_generated: int, context: int) -> list:
    """Per-token routing of prompt + generated tokens from `generate`'s records.

    The first forward is the prefill over the last `context` prompt tokens (older prompt tokens
    were never routed: None); every later forward ends with the newest token, whether it is a
    one-token step or a re-prefill of the sliding window."""
    calls = [records[i:i + n_layers] for i in range(0, len(records), n_layers)]
    routed_prompt = min(n_prompt, context)
    out: list = [None] * (n_prompt - routed_prompt)
    if calls:
        out.extend(_rows(calls[0], n_layers, slice(None)))
    for call in calls[1:n_generated + 1]:
        out.extend(_rows(call, n_layers, slice(-1, None)))
    out.extend([None] * (n_prompt + n_generated - len(out)))
    return out


def token_records(tokenizer, ids: list[int], routing: list, n_prompt: int | None = None) -> list[dict]:
    """JSON-ready tokens: {"id", "text", "experts": [[...] per MoE layer], "gates": [[...]]}
    (and "prompt" when n_prompt is given). Unrouted tokens have experts/gates null."""
    out = []
    for t, (tok, piece) in enumerate(zip(ids, token_pieces(tokenizer, ids))):
        r = routing[t]
        rec = {"id": int(tok), "text": piece,
               "experts": None if r is None else [e for e, _ in r],
               "gates": None if r is None else [g for _, g in r]}
        if n_prompt is not None:
            rec["prompt"] = t < n_prompt
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- rendering


def first_choice(rec: dict, column: int) -> int | None:
    experts = rec["experts"]
    return experts[column][0] if experts and experts[column] else None


def _marked(text: str, mark: str) -> str:
    """`text` with its expert mark before any trailing newlines, so the mark stays on the token's
    own line; a newline with nothing before it shows as ↵ (else its mark would run into the
    previous token's: "a₂₃")."""
    body = text.rstrip("\n")
    if not mark or body == text:
        return text + mark
    return (body or "↵") + mark + text[len(body):]


def render_text(records: list[dict], column: int, color: bool) -> str:
    """The text with each token coloured (or subscripted) by its first-choice expert."""
    parts = []
    for rec in records:
        e = first_choice(rec, column)
        if color:
            parts.append(paint(rec["text"], e))
        else:
            # A token inside a UTF-8 character adds no text, so it gets no mark either.
            mark = "" if e is None or not rec["text"] else str(e).translate(SUBSCRIPT)
            parts.append(_marked(rec["text"], mark))
    return "".join(parts)


def legend(records: list[dict], column: int, num_experts: int, color: bool) -> str:
    """One line: every expert's colour and its share of the shown tokens (first choice)."""
    firsts = [e for e in (first_choice(r, column) for r in records) if e is not None]
    counts = np.bincount(firsts, minlength=num_experts) if firsts else np.zeros(num_experts, int)
    n = max(1, len(firsts))
    chips = []
    for e in range(num_experts):
        label = f" {e} "
        chips.append(f"{paint(label, e) if color else 'expert ' + str(e)} {100 * counts[e] / n:.0f}%")
    note = " (colours repeat)" if color and num_experts > len(PALETTE) else ""
    return "  ".join(chips) + note


def show_token(piece: str) -> str:
    """A token's text made visible in one table cell: escapes, and spaces as a middle dot."""
    return json.dumps(piece, ensure_ascii=False)[1:-1].replace(" ", "·") or "∅"


def route_table(records: list[dict], layers: list[int], color: bool, gates: bool = False) -> str:
    """Rows of tokens, one column per MoE layer: kept experts, first choice first."""
    cells = []
    for rec in records:
        row = []
        for j in range(len(layers)):
            if rec["experts"] is None:
                row.append("-")
                continue
            ex, gs = rec["experts"][j], rec["gates"][j]
            row.append(",".join(f"{e}:{g:.2f}" if gates else str(e) for e, g in zip(ex, gs)) or "dropped")
        cells.append(row)
    tok_w = max([5] + [len(show_token(r["text"])) for r in records])
    col_w = [max([len(f"L{layer}")] + [len(c[j]) for c in cells]) for j, layer in enumerate(layers)]
    head = f"{'#':>4}  {'token':<{tok_w}}  " + "  ".join(f"{'L' + str(l):<{w}}" for l, w in zip(layers, col_w))
    lines = [head.rstrip()]
    for t, (rec, row) in enumerate(zip(records, cells)):
        shown = []
        for j, (cell, w) in enumerate(zip(row, col_w)):
            padded = f"{cell:<{w}}"
            shown.append(paint(padded, first_choice(rec, j)) if color else padded)
        lines.append(f"{t:>4}  {show_token(rec['text']):<{tok_w}}  " + "  ".join(shown))
    return "\n".join(line.rstrip() for line in lines)
