"""Rebuild a checkpoint's tokenizer from its manifest entry, whatever its kind."""

from __future__ import annotations

from pathlib import Path

from tinymoe.errors import TinyMoeError
from tinymoe.tokenizers.builtin import ByteTokenizer, SentencePieceTokenizer
from tinymoe.tokenizers.hf import load_hf_tokenizer


def load_tokenizer(entry: dict, ckpt_dir: Path):
    """Rebuild the tokenizer described by a manifest entry (`to_manifest` output)."""
    kind = entry.get("kind") if isinstance(entry, dict) else None
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":  # an imported Hugging Face tokenizer.json (tinymoe import / upcycle)
        return load_hf_tokenizer(entry, ckpt_dir)
    if kind != "sp":
        raise TinyMoeError(f"{ckpt_dir}: manifest names unknown tokenizer kind {kind!r}")
    path = Path(ckpt_dir) / entry.get("file", SentencePieceTokenizer.file_name)
    if not path.is_file():
        raise TinyMoeError(f"{path}: tokenizer file is missing (the manifest says kind 'sp')")
    try:
        tokenizer = SentencePieceTokenizer(path.read_bytes())
    except TinyMoeError as exc:
        raise TinyMoeError(f"{path}: {exc}") from exc
    expected = entry.get("vocab_size")
    if expected is not None and int(expected) != tokenizer.vocab_size:
        raise TinyMoeError(
            f"{path}: tokenizer has {tokenizer.vocab_size} pieces but the manifest says {expected}"
        )
    return tokenizer
