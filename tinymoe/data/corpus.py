"""Corpus reading, tokenization with an on-disk cache, train/validation split, and batching.

`read_documents` turns file, directory, glob and `DOMAIN=PATH` specs into `Document`s. Files ending
in `.jsonl` hold one document per line (text in `text_field`, optional domain in `domain_field`), or
one instruction example (`prompt`/`completion` or chat `messages`, rendered by tinymoe.data.instruct);
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
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from tinymoe.data.instruct import is_instruction, render
from tinymoe.errors import TinyMoeError
from tinymoe.text_input import clean_text

DEFAULT_DOMAIN = "default"
SEPARATOR = "\n\n"
BINARY_SNIFF_BYTES = 8192
_DOMAIN_TAG = re.compile(r"([A-Za-z0-9_.\-]+)=(.+)", re.DOTALL)
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class Document:
    text: str
    domain: str
    source: str
    # An instruction example (tinymoe.data.instruct): its (text, is_target) pieces, joined = text.
    segments: list | None = None


def bundled_corpus_dir() -> Path:
    """The small corpus shipped inside the package (installed as package data)."""
    return Path(__file__).resolve().parent.parent / "corpus"


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


def split_domain_tag(spec: str) -> tuple[str | None, str]:
    """(domain tag or None, path text) of a `DOMAIN=PATH` or plain spec; an existing path that
    happens to contain '=' is a plain path."""
    match = _DOMAIN_TAG.fullmatch(spec)
    if match and not Path(spec).exists():
        return match.group(1), match.group(2)
    return None, spec


def expand_specs(specs: list[str]) -> list[tuple[Path, str, bool]]:
    """(file, domain, domain_is_explicit) of every file the specs name, in reading order."""
    return [item for spec in specs for item in _expand_spec(str(spec))]


def _expand_spec(spec: str) -> list[tuple[Path, str, bool]]:
    """(file, domain, domain_is_explicit) for one spec, in a deterministic order."""
    tag, path_text = split_domain_tag(spec)
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
        except (ValueError, RecursionError) as exc:  # an integer of 4300+ digits; nesting too deep
            reason = "nested too deeply" if isinstance(exc, RecursionError) else "a number too long to read"
            raise TinyMoeError(f"{path}:{line_no}: invalid JSON ({reason})") from None
        if not isinstance(record, dict):
            kind = type(record).__name__
            raise TinyMoeError(f"{path}:{line_no}: expected a JSON object, got {kind}")
        segments = None
        if text_field not in record and is_instruction(record):
            segments = render(record, f"{path}:{line_no}")
        elif text_field not in record:
            raise TinyMoeError(f"{path}:{line_no}: record has no '{text_field}' field, nor 'prompt'/'completion' "
                               f"or 'messages' (an instruction example)")
        elif not isinstance(record[text_field], str):
            raise TinyMoeError(f"{path}:{line_no}: field '{text_field}' is not a string")
        record_domain = domain
        if not explicit and domain_field in record:
            if not isinstance(record[domain_field], str) or not record[domain_field]:
                raise TinyMoeError(f"{path}:{line_no}: field '{domain_field}' must be a string")
            record_domain = record[domain_field]
        # A JSON "\ud800" escape is a lone surrogate, which no tokenizer can encode: U+FFFD instead.
        text = "".join(t for t, _ in segments) if segments else clean_text(record[text_field])
        documents.append(Document(text, clean_text(record_domain), f"{path}:{line_no}", segments))
    return documents


def read_documents(
    specs: list[str], text_field: str = "text", domain_field: str = "domain"
) -> list[Document]:
    """Read every document named by `specs` (see the module docstring for the rules)."""
    if isinstance(specs, (str, Path)):
        specs = [str(specs)]
    documents: list[Document] = []
    for path, domain, explicit in expand_specs(specs):
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
