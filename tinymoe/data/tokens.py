"""The token cache: documents -> one token stream plus per-token domain ids and target mask, cached.

`tokenize_documents` joins documents with a "\\n\\n" separator and caches the stream as raw
memory-mapped arrays keyed by a hash of the tokenizer and the exact input. The target mask is 1 for
every token of an ordinary document (its separator included) and, for an instruction example
(tinymoe.data.instruct), 1 on its target segments only: each segment is encoded on its own, so
decoding the masked tokens gives back exactly the target text. An example longer than
`max_example_tokens` loses prompt tokens from the left, never a target token: when the targets
alone are longer, the example is kept whole from its first target on and counted in
`TokenData.long_targets` (its targets then span several windows).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinymoe.data.corpus import SEPARATOR, Document
from tinymoe.errors import TinyMoeError
from tinymoe.jsonutil import dumps

CACHE_FORMAT = "tinymoe-token-cache-v2"


@dataclass
class TokenData:
    tokens: np.ndarray  # (N,) uint16 if vocab <= 65535 else uint32; np.memmap when cached
    domain_ids: np.ndarray  # (N,) uint8: index into domain_names for each token
    domain_names: list[str]
    target_mask: np.ndarray | None = None  # (N,) uint8: 1 where the token is a target; None = all
    long_targets: int = 0  # instruction examples whose targets alone exceed max_example_tokens

    @property
    def mask(self) -> np.ndarray:
        """The target mask, all ones when there is none."""
        return self.target_mask if self.target_mask is not None else np.ones(len(self), dtype=np.uint8)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _cache_key(docs: list[Document], tokenizer, max_example_tokens: int | None) -> str:
    digest = hashlib.sha256()

    def feed(data: bytes) -> None:
        # Length prefixes keep ("ab", "c") and ("a", "bc") from hashing alike.
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    feed(CACHE_FORMAT.encode())
    feed(json.dumps(tokenizer.to_manifest(), sort_keys=True).encode())
    feed(getattr(tokenizer, "model_proto", b"") or b"")
    if any(doc.segments for doc in docs):  # truncation only touches instruction examples
        feed(str(max_example_tokens).encode())
    for doc in docs:
        feed(doc.source.encode("utf-8", errors="surrogatepass"))
        feed(doc.domain.encode("utf-8", errors="surrogatepass"))
        feed(doc.text.encode("utf-8", errors="surrogatepass"))
        for text, is_target in doc.segments or ():
            feed(b"T" if is_target else b"P")
            feed(text.encode("utf-8", errors="surrogatepass"))
    return digest.hexdigest()


def _write_atomically(path: Path, data: bytes | np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as handle:
        if isinstance(data, np.ndarray):
            data.tofile(handle)
        else:
            handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _load_cache(cache_dir: Path, key: str) -> TokenData | None:
    meta_path = cache_dir / f"{key}.json"
    tokens_path = cache_dir / f"{key}.tokens.bin"
    domains_path = cache_dir / f"{key}.domains.bin"
    mask_path = cache_dir / f"{key}.mask.bin"
    if not (meta_path.is_file() and tokens_path.is_file() and domains_path.is_file() and mask_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        n_tokens = int(meta["length"])
        domain_names = [str(name) for name in meta["domain_names"]]
        long_targets = int(meta.get("long_targets", 0))
    except (ValueError, KeyError, TypeError):
        return None  # unreadable metadata: rebuild rather than fail
    if n_tokens <= 0 or tokens_path.stat().st_size != n_tokens * dtype.itemsize:
        return None
    if domains_path.stat().st_size != n_tokens or mask_path.stat().st_size != n_tokens:
        return None
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(n_tokens,))
    domain_ids = np.memmap(domains_path, dtype=np.uint8, mode="r", shape=(n_tokens,))
    mask = np.memmap(mask_path, dtype=np.uint8, mode="r", shape=(n_tokens,))
    return TokenData(tokens, domain_ids, domain_names, mask, long_targets)


def _encode(doc: Document, tokenizer, dtype, max_example_tokens: int | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ids, mask, targets too long) of one document, without the separator."""
    if not doc.segments:
        ids = np.asarray(tokenizer.encode(doc.text), dtype=dtype)
        return ids, np.ones(ids.shape[0], dtype=np.uint8), False
    pieces = [np.asarray(tokenizer.encode(text), dtype=dtype) for text, _ in doc.segments]
    ids = np.concatenate(pieces)
    mask = np.concatenate([np.full(p.shape[0], int(t), dtype=np.uint8) for p, (_, t) in zip(pieces, doc.segments)])
    if max_example_tokens is None or ids.shape[0] <= max_example_tokens:
        return ids, mask, False
    first_target = int(np.argmax(mask))  # render() guarantees one
    cut = min(ids.shape[0] - max_example_tokens, first_target)  # prompt tokens only, from the left
    return ids[cut:], mask[cut:], ids.shape[0] - cut > max_example_tokens


def tokenize_documents(docs: list[Document], tokenizer, cache_dir: Path | None,
                       max_example_tokens: int | None = None) -> TokenData:
    """Encode docs into one stream, each followed by the separator, cached under cache_dir.
    Instruction examples longer than `max_example_tokens` lose prompt tokens from the left."""
    if not docs:
        raise TinyMoeError("no documents to tokenize")
    key = _cache_key(docs, tokenizer, max_example_tokens)
    if cache_dir is not None:
        cached = _load_cache(Path(cache_dir), key)
        if cached is not None:
            return cached

    domain_names = sorted({doc.domain for doc in docs})
    if len(domain_names) > 256:
        raise TinyMoeError(f"{len(domain_names)} domains found; at most 256 are supported")
    domain_index = {name: i for i, name in enumerate(domain_names)}
    dtype = _token_dtype(tokenizer.vocab_size)
    separator_ids = np.asarray(tokenizer.encode(SEPARATOR), dtype=dtype)  # (S,)
    token_parts, domain_parts, mask_parts, long_targets = [], [], [], 0
    for doc in docs:
        if not doc.text:
            continue  # an empty document would only add a stray separator
        ids, mask, too_long = _encode(doc, tokenizer, dtype, max_example_tokens)
        long_targets += too_long
        # An ordinary document's separator is text to learn; an example's ends at its target.
        sep_mask = np.full(separator_ids.shape[0], 0 if doc.segments else 1, dtype=np.uint8)
        token_parts.append(np.concatenate([ids, separator_ids]))
        mask_parts.append(np.concatenate([mask, sep_mask]))
        domain_parts.append(np.full(token_parts[-1].shape[0], domain_index[doc.domain], dtype=np.uint8))
    if not token_parts:
        raise TinyMoeError("all documents are empty; nothing to tokenize")
    tokens = np.concatenate(token_parts)  # (N,)
    domain_ids = np.concatenate(domain_parts)  # (N,)
    target_mask = np.concatenate(mask_parts)  # (N,)

    if cache_dir is None:
        return TokenData(tokens, domain_ids, domain_names, target_mask, long_targets)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(cache_dir / f"{key}.tokens.bin", tokens)
    _write_atomically(cache_dir / f"{key}.domains.bin", domain_ids)
    _write_atomically(cache_dir / f"{key}.mask.bin", target_mask)
    meta = {
        "format": CACHE_FORMAT,
        "dtype": dtype.name,
        "length": int(tokens.shape[0]),
        "domain_names": domain_names,
        "long_targets": long_targets,
        "tokenizer": tokenizer.to_manifest(),
    }
    # The metadata goes last: its presence marks the three arrays as complete.
    _write_atomically(cache_dir / f"{key}.json", dumps(meta, indent=1).encode())
    loaded = _load_cache(cache_dir, key)
    return loaded if loaded is not None else TokenData(tokens, domain_ids, domain_names, target_mask, long_targets)
