"""Incremental detokenization: the text each new token adds, in time linear in the token count.

The obvious way to find what token i adds is to decode tokens[:i+1] and compare it with the
decode of tokens[:i]. That decodes O(N) tokens per step, O(N^2) in all: `route` and
`sample --show-routing` on a 20k-character text spent 35 s there. A token's text cannot be
decoded on its own either: a byte-level token may be a piece of a UTF-8 character, and
sentencepiece/Hugging Face decoders treat the first token of a sequence specially (a leading
space is dropped). So, as streaming servers do, `StreamDecoder` decodes a short window: the
last group of tokens that ended on a whole character (context for the decoder) plus the tokens
after it. The result is what the prefix-decoding definition gives (tests/test_token_stream.py
compares them), except after more than `MAX_WINDOW` tokens in a row that leave the text ending
in U+FFFD (binary garbage): their replacement characters are then handed out at once.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
MAX_WINDOW = 64  # a UTF-8 character is at most 4 byte tokens; beyond this the input is garbage


class StreamDecoder:
    """Feed token ids one by one with `add`; each call returns the text that token completes
    (empty while a UTF-8 character is still incomplete). `flush` returns what is left."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # the window ids[start:] is what gets decoded
        self.group_start = 0  # where the tokens not yet ending on a whole character begin
        self.printed = ""  # the part of the window's text already handed out

    def add(self, token: int) -> str:
        ids = self.ids
        ids.append(int(token))
        raw = self.tokenizer.decode(ids[self.start:])
        text = raw.rstrip(REPLACEMENT)  # hold back a trailing partial character
        follows = text.startswith(self.printed)
        if follows:
            piece = text[len(self.printed):]
        else:  # a tokenizer that rewrote earlier text: fall back to the token on its own
            piece = self.tokenizer.decode(ids[-1:])
        self.printed = text
        if len(text) == len(raw):  # whole characters: the group just finished becomes the context
            self.start, self.group_start = self.group_start, len(ids)
            self.printed = self.tokenizer.decode(ids[self.start:])
        elif len(ids) - self.start >= MAX_WINDOW:  # binary garbage: hand out its U+FFFDs now
            piece += raw[len(text):] if follows else ""
            self.start = self.group_start = len(ids)
            self.printed = ""
        return piece

    def flush(self) -> str:
        """Replacement characters still held back at the end of the text."""
        raw = self.tokenizer.decode(self.ids[self.start:]) if len(self.ids) > self.start else ""
        rest = raw[len(self.printed):] if raw.startswith(self.printed) else ""
        self.printed = raw
        return rest


def token_pieces(tokenizer, ids) -> list[str]:
    """The text each token adds. A token that ends inside a UTF-8 character adds nothing; the
    character appears with the token that completes it, and held-back replacement characters at
    the very end join the last token."""
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.add(t) for t in ids]
    rest = decoder.flush()
    if pieces and rest:
        pieces[-1] += rest
    return pieces
