"""Corpus reading, tokenization with an on-disk cache, train/validation split, and batching.

`read_documents` turns file, directory, glob and `DOMAIN=PATH` specs into `Document`s. Files ending
in `.jsonl` hold one document per line (text in `text_field`, optional domain in `domain_field`);
every other file is one text document. Directory specs are walked recursively in sorted order,
skipping hidden entries and license files (`LICENSE*`, so a bundled license is never trained on);
their files take the name of their first-level subdirectory as domain (`corpus/prose/x.txt` is
"prose"), files at the top of the directory get "default". A `DOMAIN=PATH` tag overrides every
other domain; otherwise a JSONL record's own domain field wins over the directory name. Binary
files (a NUL byte in the first 8 KiB) are skipped with a warning on stderr; other files are decoded
as UTF-8 with undecodable bytes replaced by U+FFFD, so a stray Latin-1 byte costs one character,
not the file. `tokenize_documents` joins documents with a "\\n\\n" separator into one token stream
plus a parallel per-token domain id, and caches both as raw memory-mapped arrays keyed by a hash of
the tokenizer and the exact input. `split_train_val` holds out every k-th block of the stream,
`BatchSampler` draws random training windows and can be checkpointed and resumed exactly, and
`eval_batches` walks a stream once in non-overlapping windows.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinymoe.errors import TinyMoeError

DEFAULT_DOMAIN = "default"
SEPARATOR = "\n\n"
BINARY_SNIFF_BYTES = 8192
CACHE_FORMAT = "tinymoe-token-cache-v1"
_DOMAIN_TAG = re.compile(r"([A-Za-z0-9_.\-]+)=(.+)", re.DOTALL)
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class Document:
    text: str
    domain: str
    source: str


def bundled_corpus_dir() -> Path:
    """The small corpus shipped inside the package (installed as package data)."""
    return Path(__file__).resolve().parent / "corpus"


# ----------------------------------------------------------------------------- reading


def _is_skipped_name(name: str) -> bool:
    return name.startswith(".") or name.upper().startswith("LICENSE")


def _walk_directory(root: Path) -> list[tuple[Path, str]]:
    """(file, domain) for every visible file under root, in sorted path order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if _is_skipped_name(name):
                continue
            path = Path(dirpath) / name
            parts = path.relative_to(root).parts
            found.append((path, parts[0] if len(parts) > 1 else DEFAULT_DOMAIN))
    found.sort(key=lambda item: item[0].as_posix())
    return found


def _expand_spec(spec: str) -> list[tuple[Path, str, bool]]:
    """(file, domain, domain_is_explicit) for one spec, in a deterministic order."""
    tag = None
    path_text = spec
    match = _DOMAIN_TAG.fullmatch(spec)
    if match and not Path(spec).exists():
        tag, path_text = match.group(1), match.group(2)
    path = Path(path_text).expanduser()
    if path.is_file():
        files = [(path, DEFAULT_DOMAIN)]
    elif path.is_dir():
        files = _walk_directory(path)
    elif _GLOB_CHARS.search(path_text):
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise TinyMoeError(f"{path_text}: glob pattern matches no files")
        files = []
        for match_text in matches:
            match_path = Path(match_text)
            if match_path.is_dir():
                files.extend(_walk_directory(match_path))
            elif match_path.is_file() and not _is_skipped_name(match_path.name):
                files.append((match_path, DEFAULT_DOMAIN))
    else:
        raise TinyMoeError(f"{path_text}: no such file or directory")
    if tag is not None:
        return [(f, tag, True) for f, _ in files]
    return [(f, domain, False) for f, domain in files]


def _read_text_file(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TinyMoeError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if b"\x00" in raw[:BINARY_SNIFF_BYTES]:
        print(f"warning: {path}: binary (NUL byte in the first 8 KiB); skipped", file=sys.stderr)
        return None
    # utf-8-sig drops a leading byte-order mark, which is encoding noise rather than text.
    return raw.decode("utf-8-sig", errors="replace")


def _read_jsonl(
    path: Path, domain: str, explicit: bool, text_field: str, domain_field: str
) -> list[Document]:
    text = _read_text_file(path)
    if text is None:
        return []
    documents = []
    # Split on "\n" only: str.splitlines would also break at U+2028 inside JSON strings.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TinyMoeError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            kind = type(record).__name__
            raise TinyMoeError(f"{path}:{line_no}: expected a JSON object, got {kind}")
        if text_field not in record:
            raise TinyMoeError(f"{path}:{line_no}: record has no '{text_field}' field")
        if not isinstance(record[text_field], str):
            raise TinyMoeError(f"{path}:{line_no}: field '{text_field}' is not a string")
        record_domain = domain
        if not explicit and domain_field in record:
            if not isinstance(record[domain_field], str) or not record[domain_field]:
                raise TinyMoeError(f"{path}:{line_no}: field '{domain_field}' must be a string")
            record_domain = record[domain_field]
        documents.append(Document(record[text_field], record_domain, f"{path}:{line_no}"))
    return documents


def read_documents(
    specs: list[str], text_field: str = "text", domain_field: str = "domain"
) -> list[Document]:
    """Read every document named by `specs` (see the module docstring for the rules)."""
    if isinstance(specs, (str, Path)):
        specs = [str(specs)]
    documents: list[Document] = []
    for spec in specs:
        for path, domain, explicit in _expand_spec(str(spec)):
            if path.name.endswith(".jsonl"):
                documents.extend(_read_jsonl(path, domain, explicit, text_field, domain_field))
                continue
            text = _read_text_file(path)
            if text is not None:
                documents.append(Document(text, domain, str(path)))
    where = ", ".join(str(s) for s in specs) or "(no paths given)"
    if not documents:
        raise TinyMoeError(f"{where}: no documents found")
    if all(not doc.text for doc in documents):
        raise TinyMoeError(f"{where}: all {len(documents)} documents are empty")
    return documents


# ----------------------------------------------------------------------------- tokenizing


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
    _write_atomically(cache_dir / f"{key}.json", json.dumps(meta, indent=1).encode())
    loaded = _load_cache(cache_dir, key)
    return loaded if loaded is not None else TokenData(tokens, domain_ids, domain_names)


# ----------------------------------------------------------------------------- splitting


def _take(data: TokenData, pieces: list[tuple[int, int]]) -> TokenData:
    if not pieces:
        return TokenData(
            np.empty(0, dtype=data.tokens.dtype),
            np.empty(0, dtype=np.uint8),
            list(data.domain_names),
        )
    tokens = np.concatenate([data.tokens[a:b] for a, b in pieces])
    domain_ids = np.concatenate([data.domain_ids[a:b] for a, b in pieces])
    return TokenData(tokens, domain_ids, list(data.domain_names))


def split_train_val(
    data: TokenData, val_fraction: float = 0.1, block_tokens: int = 4096
) -> tuple[TokenData, TokenData]:
    """Deterministic split: every k-th block of `block_tokens` (k = round(1/val_fraction)) is
    validation. Streams too short for one block on each side hold out their last tokens instead."""
    if not 0.0 <= val_fraction < 1.0:
        raise TinyMoeError(f"val_fraction {val_fraction}: must be in [0, 1)")
    if block_tokens < 1:
        raise TinyMoeError(f"block_tokens {block_tokens}: must be at least 1")
    n_tokens = len(data)
    if val_fraction == 0.0 or n_tokens == 0:
        return data, _take(data, [])
    every_k = max(2, int(round(1.0 / val_fraction)))
    n_blocks = -(-n_tokens // block_tokens)  # the last block may be partial
    if n_blocks >= every_k:
        train_pieces, val_pieces = [], []
        for block in range(n_blocks):
            piece = (block * block_tokens, min(n_tokens, (block + 1) * block_tokens))
            (val_pieces if block % every_k == every_k - 1 else train_pieces).append(piece)
        return _take(data, train_pieces), _take(data, val_pieces)
    n_val = min(n_tokens - 1, max(1, int(round(n_tokens * val_fraction))))
    return _take(data, [(0, n_tokens - n_val)]), _take(data, [(n_tokens - n_val, n_tokens)])


# ----------------------------------------------------------------------------- batching


def _check_window(n_tokens: int, context: int) -> None:
    if n_tokens < context + 1:
        raise TinyMoeError(
            f"corpus has {n_tokens} tokens; it needs at least context+1 = {context + 1} "
            f"for one training window"
        )


class BatchSampler:
    """Random (B, L+1) windows from a token stream, resumable."""

    def __init__(self, tokens: np.ndarray, batch_size: int, context: int, seed: int):
        if batch_size < 1 or context < 1:
            raise TinyMoeError(f"batch_size {batch_size} and context {context} must both be >= 1")
        _check_window(int(tokens.shape[0]), context)
        self.tokens = tokens
        self.batch_size = batch_size
        self.context = context
        self.seed = int(seed)
        self.batches_drawn = 0
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._offsets = np.arange(context + 1, dtype=np.int64)  # (L+1,)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        n_starts = int(self.tokens.shape[0]) - self.context  # last start leaves L+1 tokens
        starts = self._rng.integers(0, n_starts, size=self.batch_size)  # (B,)
        index = starts[:, None] + self._offsets  # (B, L+1)
        windows = np.asarray(self.tokens[index], dtype=np.int32)  # (B, L+1)
        self.batches_drawn += 1
        return windows[:, :-1], windows[:, 1:]  # inputs (B, L), targets (B, L)

    def state(self) -> dict:
        return {
            "seed": self.seed,
            "batches_drawn": self.batches_drawn,
            "rng": self._rng.bit_generator.state,
        }

    def load_state(self, state: dict) -> None:
        try:
            rng_state = state["rng"]
            if rng_state.get("bit_generator") != "PCG64":
                raise TinyMoeError(
                    f"sampler state uses {rng_state.get('bit_generator')!r}, not PCG64"
                )
            self._rng.bit_generator.state = rng_state
            self.seed = int(state["seed"])
            self.batches_drawn = int(state["batches_drawn"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TinyMoeError(f"sampler state is malformed: {exc!r}") from exc


def eval_batches(tokens: np.ndarray, batch_size: int, context: int, max_batches: int | None = None):
    """Yield (inputs, targets) over non-overlapping windows that cover the stream once.

    Window i reads tokens[i*L : i*L + L + 1]; a final window shorter than that is dropped and the
    last batch may have fewer than batch_size rows. A stream shorter than one window (an empty
    validation split, say) yields nothing rather than failing, so callers can report "no data".
    Argument checks run now, not at the first next()."""
    if batch_size < 1 or context < 1:
        raise TinyMoeError(f"batch_size {batch_size} and context {context} must both be >= 1")
    n_tokens = int(tokens.shape[0])
    n_windows = max(0, (n_tokens - 1) // context)
    n_batches = -(-n_windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max(0, int(max_batches)))
    offsets = np.arange(context + 1, dtype=np.int64)  # (L+1,)

    def generate():
        for batch in range(n_batches):
            first = batch * batch_size
            starts = np.arange(first, min(n_windows, first + batch_size), dtype=np.int64) * context
            windows = np.asarray(tokens[starts[:, None] + offsets], dtype=np.int32)  # (b, L+1)
            yield windows[:, :-1], windows[:, 1:]

    return generate()
