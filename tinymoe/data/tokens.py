"""The token cache: documents -> one token stream plus per-token domain ids, cached on disk.

`tokenize_documents` joins documents with a "\\n\\n" separator and caches the stream as raw
memory-mapped arrays keyed by a hash of the tokenizer and the exact input.
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

CACHE_FORMAT = "tinymoe-token-cache-v1"


@dataclass
class TokenData:
    tokens: np.ndarray  # (N,) uint16 if vocab <= 65535 else uint32; np.memmap when cached
    domain_ids: np.ndarray  # (N,) uint8: index into domain_names for each token
    domain_names: list[str]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _cache_key(docs: list[Document], tokenizer) -> str:
    digest = hashlib.sha256()

    def feed(data: bytes) -> None:
        # Length prefixes keep ("ab", "c") and ("a", "bc") from hashing alike.
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)

    feed(CACHE_FORMAT.encode())
    feed(json.dumps(tokenizer.to_manifest(), sort_keys=True).encode())
    feed(getattr(tokenizer, "model_proto", b"") or b"")
    for doc in docs:
        feed(doc.source.encode("utf-8", errors="surrogatepass"))
        feed(doc.domain.encode("utf-8", errors="surrogatepass"))
        feed(doc.text.encode("utf-8", errors="surrogatepass"))
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
    if not (meta_path.is_file() and tokens_path.is_file() and domains_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        n_tokens = int(meta["length"])
        domain_names = [str(name) for name in meta["domain_names"]]
    except (ValueError, KeyError, TypeError):
        return None  # unreadable metadata: rebuild rather than fail
    if n_tokens <= 0 or tokens_path.stat().st_size != n_tokens * dtype.itemsize:
        return None
    if domains_path.stat().st_size != n_tokens:
        return None
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(n_tokens,))
    domain_ids = np.memmap(domains_path, dtype=np.uint8, mode="r", shape=(n_tokens,))
    return TokenData(tokens, domain_ids, domain_names)


def tokenize_documents(docs: list[Document], tokenizer, cache_dir: Path | None) -> TokenData:
    """Encode docs into one stream, each followed by the separator, cached under cache_dir."""
    if not docs:
        raise TinyMoeError("no documents to tokenize")
    key = _cache_key(docs, tokenizer)
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
    token_parts, domain_parts = [], []
    for doc in docs:
        if not doc.text:
            continue  # an empty document would only add a stray separator
        ids = np.concatenate([np.asarray(tokenizer.encode(doc.text), dtype=dtype), separator_ids])
        token_parts.append(ids)
        domain_parts.append(np.full(ids.shape[0], domain_index[doc.domain], dtype=np.uint8))
    if not token_parts:
        raise TinyMoeError("all documents are empty; nothing to tokenize")
    tokens = np.concatenate(token_parts)  # (N,)
    domain_ids = np.concatenate(domain_parts)  # (N,)

    if cache_dir is None:
        return TokenData(tokens, domain_ids, domain_names)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(cache_dir / f"{key}.tokens.bin", tokens)
    _write_atomically(cache_dir / f"{key}.domains.bin", domain_ids)
    meta = {
        "format": CACHE_FORMAT,
        "dtype": dtype.name,
        "length": int(tokens.shape[0]),
        "domain_names": domain_names,
        "tokenizer": tokenizer.to_manifest(),
    }
    # The metadata goes last: its presence marks the two arrays as complete.
    _write_atomically(cache_dir / f"{key}.json", dumps(meta, indent=1).encode())
    loaded = _load_cache(cache_dir, key)
    return loaded if loaded is not None else TokenData(tokens, domain_ids, domain_names)
