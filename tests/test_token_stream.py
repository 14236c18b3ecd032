"""Incremental detokenization (tinymoe.tokenizers.stream): the same pieces as decoding every
prefix, for a linear amount of decoding work.

`route` and `sample --show-routing` took 35 s on a 20k-character text because finding each
token's text decoded the whole prefix before it. Time is not asserted here (design guide: never
wall-clock in tests); the work is: a tokenizer that counts the tokens it is asked to decode.
"""

import json

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tinymoe.cli.main import cli
from tinymoe.tokenizers.builtin import ByteTokenizer, train_sentencepiece
from tinymoe.tokenizers.stream import MAX_WINDOW, StreamDecoder, token_pieces


def prefix_pieces(tokenizer, ids):
    """The definition (the old, quadratic implementation): what decoding ids[:i+1] adds to the
    decode of ids[:i], holding back trailing U+FFFD until the character is complete."""
    pieces, printed = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1]).rstrip("\ufffd")
        pieces.append(text[len(printed):] if text.startswith(printed) else tokenizer.decode(ids[i:i + 1]))
        printed = text
    full = tokenizer.decode(ids) if ids else ""
    if pieces and full.startswith(printed) and len(full) > len(printed):
        pieces[-1] += full[len(printed):]
    return pieces


class Counting:
    """A tokenizer wrapper that counts decode calls and the tokens they decode."""

    def __init__(self, inner):
        self.inner, self.calls, self.tokens = inner, 0, 0

    def decode(self, ids):
        self.calls += 1
        self.tokens += len(ids)
        return self.inner.decode(ids)


@settings(max_examples=300, derandomize=True, database=None)
@given(st.lists(st.integers(0, 255), max_size=60) | st.text(max_size=30).map(lambda t: list(t.encode())))
def test_byte_pieces_equal_prefix_decoding(ids):
    tok = ByteTokenizer()
    assert token_pieces(tok, ids) == prefix_pieces(tok, ids)


@pytest.fixture(scope="module")
def sp_tokenizer():
    text = "the quick brown fox jumps over the lazy dog. " * 20 + "naïve café, Grüße, 東京, 🙂 " * 10
    return train_sentencepiece([text], 300)


@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(text=st.text(max_size=40))
def test_sentencepiece_pieces_equal_prefix_decoding(sp_tokenizer, text):
    ids = sp_tokenizer.encode(text)  # unseen characters become byte-fallback pieces
    assert token_pieces(sp_tokenizer, ids) == prefix_pieces(sp_tokenizer, ids)


@pytest.mark.parametrize("text", ["the quick brown fox é€ 🙂 ", "\xff\xfe garbage \x80"])
def test_decoding_work_is_linear_in_the_token_count(text):
    """Tokens decoded for N and 4N tokens: at most a constant times N (the old way: N^2 / 2)."""
    work = {}
    for n in (1000, 4000):
        raw = (text.encode("latin-1") if "\xff" in text else text.encode()) * (n // len(text) + 1)
        tok = Counting(ByteTokenizer())
        pieces = token_pieces(tok, list(raw[:n]))
        assert "".join(pieces) == ByteTokenizer().decode(list(raw[:n]))
        work[n] = tok.tokens
    assert work[4000] <= 10 * 4000 and work[4000] <= 4.5 * work[1000], work


def test_garbage_is_handed_out_after_the_window():
    """A long run of bytes that never completes a character (0x80 continuation bytes alone) is
    flushed every MAX_WINDOW tokens instead of growing the window without end."""
    tok = Counting(ByteTokenizer())
    decoder = StreamDecoder(tok)
    pieces = [decoder.add(0x80) for _ in range(10 * MAX_WINDOW)]
    assert "".join(pieces) + decoder.flush() == "\ufffd" * (10 * MAX_WINDOW)
    assert tok.tokens <= 2 * MAX_WINDOW * 10 * MAX_WINDOW // 2  # the window never exceeds MAX_WINDOW


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("stream") / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path_factory.mktemp("stream") / "run"
    result = CliRunner().invoke(cli, ["train", "--preset", "debug", "--data", str(data), "--steps", "1",
                                      "--eval-every", "0", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("command", ["route", "sample --show-routing", "sample"])
def test_commands_decode_linearly(run_dir, monkeypatch, command):
    """Through the commands: tokens decoded per token of text stay bounded (old: ~N/2 per token)."""
    real = ByteTokenizer.decode
    counted = {"tokens": 0}

    def decode(self, ids):
        ids = list(ids)
        counted["tokens"] += len(ids)
        return real(self, ids)

    monkeypatch.setattr(ByteTokenizer, "decode", decode)
    n = 600
    if command == "route":
        args = ["route", str(run_dir), "--text", "fox é " * (n // 7), "--json"]
    else:
        args = ["sample", str(run_dir), "--max-tokens", str(n), "--seed", "1", *command.split()[1:]]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    if "--json" in args:
        json.loads(result.output)
    assert counted["tokens"] <= 12 * n, counted  # the prefix way decodes ~n^2/2 = 180000
