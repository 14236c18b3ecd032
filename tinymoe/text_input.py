"""Text that arrives from outside (command-line arguments, JSON strings) made encodable as UTF-8.

Python hands over command-line bytes that are not UTF-8 as "surrogate escapes" (U+DC80..U+DCFF,
PEP 383), and a JSON string may hold a lone `\\ud800` escape. Both are valid `str` values that
cannot be encoded, so the first `text.encode("utf-8")` in a tokenizer raised UnicodeEncodeError
deep inside a command. The policy is the one already used for text files (docs/errors.md): an
invalid byte becomes U+FFFD, silently, one replacement per invalid sequence, rather than an
error: a stray Latin-1 byte in a prompt costs one character, not the command.
"""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def clean_text(text: str) -> str:
    """`text` unchanged when it encodes as UTF-8; otherwise with surrogate escapes decoded back to
    their bytes and every invalid byte sequence or lone surrogate replaced by U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:  # the OS's undecodable bytes (U+DC80..U+DCFF): back to bytes, then decode with replacement
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # other lone surrogates (from JSON escapes) have no byte form
        return _SURROGATE.sub(REPLACEMENT, text)
