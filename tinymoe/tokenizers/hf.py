"""Tokenizers across the Hugging Face boundary: `tokenizer.json` out, and in as kind "hf".

Export writes a `tokenizer.json` (the `tokenizers` library format that transformers'
AutoTokenizer and mlx-lm load) that encodes exactly as the checkpoint's tokenizer:
  bytes  a byte-level BPE with the 256 byte symbols and no merges: token id = byte value
  sp     the sentencepiece pieces with merges recovered from the piece order (a BPE piece's id
         is its merge rank), byte fallback, spaces as U+2581, no dummy prefix
  hf     the stored file as it is
A `tokenizer_config.json` names the class and records which tinymoe kind it came from, so an
import of an exported directory gives back the same kind.

`HFTokenizer` is the tinymoe tokenizer for imported models whose tokenizer is neither of
tinymoe's kinds. It runs the stored tokenizer.json with the `tokenizers` library (installed with
transformers), never adds special tokens (tinymoe trains without BOS/EOS), and keeps the model's
vocabulary size, which may exceed the tokenizer's (padded embeddings).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from tinymoe.errors import TinyMoeError
from tinymoe.jsonutil import dumps

SPACE_MARK = "\u2581"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def byte_symbols() -> list[str]:
    """The printable stand-in character of each byte 0..255 used by byte-level BPE files.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, a few more) are
    shifted up to U+0100 and beyond in byte order, so every symbol is a visible character."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    symbols, shifted = [], 0
    for b in range(256):
        if b in keep:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def _tokenizer_json(model: dict, pre_tokenizer, normalizer, decoder, added: list) -> dict:
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": None,
            "decoder": decoder, "model": model}


def _bpe(vocab: dict, merges: list, **extra) -> dict:
    return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False, "vocab": vocab, "merges": merges, **extra}


def byte_tokenizer_json() -> dict:
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    vocab = {s: b for b, s in enumerate(byte_symbols())}
    return _tokenizer_json(_bpe(vocab, []), level, None, level, [])


def sentencepiece_tokenizer_json(model_proto: bytes) -> dict:
    """tokenizer.json equivalent to a tinymoe sentencepiece BPE (see tinymoe.tokenizers.builtin)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []  # (rank of the merged piece, left id, right id, left, right)
    for piece, i in vocab.items():
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((i, vocab[left], vocab[right], left, right))
    merges.sort()
    unk = sp.id_to_piece(sp.unk_id())
    added = [{"id": sp.unk_id(), "content": unk, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}]
    model = _bpe(vocab, [[m[3], m[4]] for m in merges], unk_token=unk, fuse_unk=True, byte_fallback=True)
    normalizer = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_MARK}
    decoder = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": SPACE_MARK}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}]}
    return _tokenizer_json(model, None, normalizer, decoder, added)


def write_tokenizer_files(tokenizer, out: Path, context: int) -> dict:
    """tokenizer.json + tokenizer_config.json for `tokenizer` in `out`; returns a small report."""
    kind = tokenizer.kind
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
              "tinymoe_tokenizer": kind}
    if kind == "bytes":
        text = dumps(byte_tokenizer_json(), ensure_ascii=False)
    elif kind == "sp":
        text = dumps(sentencepiece_tokenizer_json(tokenizer.model_proto), ensure_ascii=False)
        tokenizer.save(out / "tokenizer.model")  # the original, for tools that want it
    elif kind == "hf":
        text = tokenizer.tokenizer_json
        config.update({k: v for k, v in tokenizer.special.items() if k in _SPECIAL_KEYS})
    else:
        raise TinyMoeError(f"tokenizer kind '{kind}' cannot be exported")
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(dumps(config, indent=1))
    return {"kind": kind, "matches": _check_encoding(tokenizer, text)}


def _check_encoding(tokenizer, text: str) -> bool | None:
    """Whether the written tokenizer.json encodes a sample exactly as `tokenizer` (None: no
    `tokenizers` library to check with)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    corpus = Path(__file__).resolve().parent.parent / "corpus"  # the bundled corpus (package data)
    files = sorted(corpus.rglob("*.txt"))
    sample = "".join(f.read_text(encoding="utf-8")[:4000] for f in files[:4]) + " héllo ✓ \t\t 𝔘\n\n  x"
    ours = list(tokenizer.encode(sample))
    theirs = Tokenizer.from_str(text).encode(sample, add_special_tokens=False).ids
    return ours == theirs


# ----------------------------------------------------------------------------- import side


class HFTokenizer:
    """A Hugging Face tokenizer.json held in memory (kind "hf")."""

    kind = "hf"
    file_name = "tokenizer.json"

    def __init__(self, tokenizer_json: str, vocab_size: int, special: dict | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TinyMoeError("this checkpoint's tokenizer needs the 'tokenizers' package "
                               "(pip install 'tinymoe[hf]')") from None
        try:
            self._tok = Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises its own Exception type on bad JSON
            raise TinyMoeError(f"not a valid tokenizer.json ({str(exc).splitlines()[0]})") from None
        self.tokenizer_json = tokenizer_json
        self.special = dict(special or {})
        n = self._tok.get_vocab_size(with_added_tokens=True)
        if vocab_size < n:
            raise TinyMoeError(f"tokenizer has {n} tokens but the model's vocabulary is only {vocab_size}")
        self.vocab_size = int(vocab_size)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (special and padding ids: 0), for bits per byte."""
        data = json.loads(self.tokenizer_json)
        byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer")) + json.dumps(data.get("decoder"))
        inverse = {s: b for b, s in enumerate(byte_symbols())}
        special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
        n_bytes = np.zeros(self.vocab_size, dtype=np.int64)  # (vocab,)
        for token_id in range(self._tok.get_vocab_size(with_added_tokens=True)):
            piece = self._tok.id_to_token(token_id)
            if piece is None or token_id in special:
                continue
            if _BYTE_PIECE.fullmatch(piece):
                n_bytes[token_id] = 1
            elif byte_level and all(c in inverse for c in piece):
                n_bytes[token_id] = len(piece)  # one symbol per byte
            else:
                n_bytes[token_id] = len(piece.replace(SPACE_MARK, " ").encode("utf-8"))
        return n_bytes

    def to_manifest(self) -> dict:
        digest = hashlib.sha256(self.tokenizer_json.encode("utf-8")).hexdigest()
        return {"kind": self.kind, "vocab_size": self.vocab_size, "file": self.file_name,
                "sha256": digest, "special": self.special}

    def save(self, path: Path) -> None:
        Path(path).write_text(self.tokenizer_json, encoding="utf-8")


def load_hf_tokenizer(entry: dict, ckpt_dir: Path) -> HFTokenizer:
    """The kind "hf" tokenizer a manifest entry describes (called by tinymoe.tokenizers.load)."""
    path = Path(ckpt_dir) / entry.get("file", HFTokenizer.file_name)
    if not path.is_file():
        raise TinyMoeError(f"{path}: tokenizer file is missing (the manifest says kind 'hf')")
    try:
        return HFTokenizer(path.read_text(encoding="utf-8"), int(entry.get("vocab_size", 0)),
                           entry.get("special") if isinstance(entry.get("special"), dict) else None)
    except TinyMoeError as exc:
        raise TinyMoeError(f"{path}: {exc}") from None


def _special_tokens(config: dict) -> dict:
    out = {}
    for key in _SPECIAL_KEYS:
        value = config.get(key)
        if isinstance(value, dict):  # an AddedToken written out as an object
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def read_hf_tokenizer(directory: Path, vocab_size: int):
    """The tokenizer of an HF directory: tinymoe's own kind when the directory is a tinymoe
    export, else kind "hf" from tokenizer.json (or converted by transformers when only a slow
    tokenizer is present)."""
    from tinymoe.tokenizers.builtin import ByteTokenizer, SentencePieceTokenizer

    directory = Path(directory)
    config_path = directory / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise TinyMoeError(f"{config_path}: not valid JSON ({exc})") from None
    config = config if isinstance(config, dict) else {}
    path = directory / "tokenizer.json"
    text = path.read_text(encoding="utf-8") if path.is_file() else _convert_slow(directory)
    marker = config.get("tinymoe_tokenizer")
    if marker == "bytes" and vocab_size == 256 and json.loads(text) == byte_tokenizer_json():
        return ByteTokenizer()
    if marker == "sp" and (directory / "tokenizer.model").is_file():
        sp = SentencePieceTokenizer((directory / "tokenizer.model").read_bytes())
        if sp.vocab_size == vocab_size:
            return sp
    try:
        return HFTokenizer(text, vocab_size, _special_tokens(config))
    except TinyMoeError as exc:
        raise TinyMoeError(f"{path}: {exc}") from None


def _convert_slow(directory: Path) -> str:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TinyMoeError(f"{directory}: no tokenizer.json (converting other tokenizer files needs "
                           f"transformers: pip install 'tinymoe[hf]')") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
        return tok.backend_tokenizer.to_str()
    except Exception as exc:  # transformers raises many types for missing/odd tokenizer files
        raise TinyMoeError(f"{directory}: no usable tokenizer ({str(exc).splitlines()[0] if str(exc) else exc})") from None
