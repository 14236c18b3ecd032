"""Tokenizers: raw UTF-8 bytes, or a small byte-fallback BPE trained with sentencepiece.

Both kinds share one interface (`encode`, `decode`, `token_byte_lengths`, `to_manifest`) so the
rest of the code never asks which one it holds. The byte tokenizer needs no training and no file.
The sentencepiece tokenizer is trained in memory on the corpus and keeps its serialized model
(`model_proto`) so a checkpoint can store it as `tokenizer.model`. It is set up to reproduce text
exactly: identity normalization, no whitespace folding, no dummy prefix, whitespace-only pieces for
code indentation, and byte fallback so characters never seen in training still round-trip as UTF-8
bytes. One known exception: a literal U+2581 ("▁", sentencepiece's space marker) decodes as a
space. `token_byte_lengths` says how many UTF-8 bytes each token stands for, which turns a loss in
nats per token into bits per byte, a number comparable across tokenizers.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import numpy as np

from tinymoe.errors import TinyMoeError

SPACE_MARK = "\u2581"  # sentencepiece writes a space inside a piece as this character
MIN_SP_VOCAB = 100
MAX_SP_VOCAB = 2**31 - 1
N_BYTE_PIECES = 256
# Lines are grouped into training "sentences" of at most this many UTF-8 bytes: sentencepiece
# silently drops sentences above its max_sentence_length (4192 bytes by default).
MAX_SENTENCE_BYTES = 2048
# Training text beyond this is thinned out deterministically (every k-th sentence) to bound time.
MAX_TRAIN_BYTES = 50_000_000


class ByteTokenizer:
    """One token per UTF-8 byte: vocabulary of 256, nothing to train, nothing to save."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        # A window cut in the middle of a multi-byte character must still print.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        return np.ones(self.vocab_size, dtype=np.int64)  # (vocab,)

    def to_manifest(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


class SentencePieceTokenizer:
    """A sentencepiece model held in memory; `model_proto` is its serialized form."""

    kind = "sp"
    file_name = "tokenizer.model"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.model_proto = bytes(model_proto)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        except RuntimeError as exc:  # sentencepiece reports a corrupt proto as RuntimeError
            raise TinyMoeError("not a valid sentencepiece model") from exc
        self.vocab_size = int(self._sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids) -> str:
        # Byte-fallback pieces that do not form whole characters decode to U+FFFD, never raise.
        return self._sp.decode([int(i) for i in ids])

    def token_byte_lengths(self) -> np.ndarray:
        n_bytes = np.zeros(self.vocab_size, dtype=np.int64)  # (vocab,)
        for token_id in range(self.vocab_size):
            if self._sp.is_control(token_id) or self._sp.is_unknown(token_id):
                continue  # produce no text
            if self._sp.is_byte(token_id):
                n_bytes[token_id] = 1  # <0x..> stands for exactly one byte
                continue
            piece = self._sp.id_to_piece(token_id)
            n_bytes[token_id] = len(piece.replace(SPACE_MARK, " ").encode("utf-8"))
        return n_bytes

    def to_manifest(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "file": self.file_name}

    def save(self, path: Path) -> None:
        Path(path).write_bytes(self.model_proto)


def _training_sentences(texts: list[str]) -> list[str]:
    """Cut texts into newline-preserving chunks small enough for sentencepiece to keep."""
    sentences: list[str] = []
    for text in texts:
        current, current_bytes = [], 0
        for line in text.splitlines(keepends=True):
            line_bytes = len(line.encode("utf-8"))
            if current and current_bytes + line_bytes > MAX_SENTENCE_BYTES:
                sentences.append("".join(current))
                current, current_bytes = [], 0
            if line_bytes > MAX_SENTENCE_BYTES:
                # A single very long line: split by characters; 4 bytes per char at worst.
                step = MAX_SENTENCE_BYTES // 4
                sentences.extend(line[i : i + step] for i in range(0, len(line), step))
                continue
            current.append(line)
            current_bytes += line_bytes
        if current:
            sentences.append("".join(current))
    total_bytes = sum(len(s.encode("utf-8")) for s in sentences)
    if total_bytes > MAX_TRAIN_BYTES:
        stride = -(-total_bytes // MAX_TRAIN_BYTES)
        sentences = sentences[::stride]
    return sentences


def _character_coverage(sentences: list[str], vocab_size: int) -> float:
    """Coverage that keeps the required characters within the vocabulary, in [0.98, 1.0].

    With byte fallback, 257 pieces (256 bytes + <unk>) are fixed; every distinct character at the
    requested coverage needs a piece too. Small vocabularies therefore cover only the most frequent
    characters and let the rarest fall back to bytes. sentencepiece refuses coverage below 0.98.
    """
    counts = Counter()
    for sentence in sentences:
        counts.update(sentence.replace(" ", SPACE_MARK))
    # Keep a few slots for merges so a rounding difference of one character cannot overflow.
    room = vocab_size - N_BYTE_PIECES - 1 - 8
    freqs = sorted(counts.values(), reverse=True)
    if room >= len(freqs):
        return 1.0
    if room < 1:
        return 0.98  # hopeless either way; the error then reports the smallest workable size
    total = sum(freqs)
    kept = sum(freqs[:room])
    # Midway between covering room-1 and room characters, so sentencepiece stops after `room`.
    coverage = (kept - freqs[room - 1] / 2) / total
    return float(min(1.0, max(0.98, coverage)))


def train_sentencepiece(texts: list[str], vocab_size: int) -> SentencePieceTokenizer:
    """Train a byte-fallback BPE of `vocab_size` pieces on `texts`, in memory, deterministically."""
    import sentencepiece as spm

    if vocab_size < MIN_SP_VOCAB:
        raise TinyMoeError(f"sp:{vocab_size}: vocabulary must have at least {MIN_SP_VOCAB} pieces")
    sentences = _training_sentences([t for t in texts if t])
    if not sentences:
        raise TinyMoeError("sentencepiece training: no text to train on")
    model_writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model_writer,
            vocab_size=vocab_size,
            model_type="bpe",
            normalization_rule_name="identity",  # keep text byte-for-byte (no NFKC)
            remove_extra_whitespaces=False,  # indentation and blank lines are content
            add_dummy_prefix=False,  # no invented leading space: byte counts stay exact
            allow_whitespace_only_pieces=True,  # runs of spaces become single tokens in code
            split_digits=True,  # numbers tokenize digit by digit, like most small LMs
            byte_fallback=True,
            character_coverage=_character_coverage(sentences, vocab_size),
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            num_threads=1,  # a fixed merge order regardless of the machine
            shuffle_input_sentence=False,
            input_sentence_size=0,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise TinyMoeError(_explain_training_error(str(exc), vocab_size)) from exc
    return SentencePieceTokenizer(model_writer.getvalue())


def _explain_training_error(message: str, vocab_size: int) -> str:
    too_high = re.search(r"value <= (\d+)", message)
    if too_high:
        return (
            f"sp:{vocab_size}: the training text supports at most {too_high.group(1)} pieces; "
            f"use a smaller vocabulary or more text"
        )
    too_small = re.search(r"required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        return (
            f"sp:{vocab_size}: too small for this text (byte fallback and its characters need "
            f"{too_small.group(2)} pieces); use a larger vocabulary"
        )
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return f"sp:{vocab_size}: sentencepiece training failed: {first_line}"


def parse_tokenizer_spec(spec: str) -> tuple[str, int | None]:
    """'bytes' -> ('bytes', None); 'sp:2000' -> ('sp', 2000)."""
    text = spec.strip()
    if text == "bytes":
        return "bytes", None
    match = re.fullmatch(r"sp:([0-9]{1,12})", text)
    if not match:
        raise TinyMoeError(f"tokenizer '{spec}': expected 'bytes' or 'sp:N' (for example sp:2000)")
    vocab_size = int(match.group(1))
    if vocab_size < MIN_SP_VOCAB:
        raise TinyMoeError(f"tokenizer '{spec}': sp vocabulary must be at least {MIN_SP_VOCAB}")
    if vocab_size > MAX_SP_VOCAB:  # sentencepiece reads it as int32; the token cache as uint32
        raise TinyMoeError(f"tokenizer '{spec}': sp vocabulary must be at most {MAX_SP_VOCAB}")
    return "sp", vocab_size
