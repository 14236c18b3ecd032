"""The teacher cache on disk: a teacher's predictions for every position of a run's training stream.

A cache folder holds, for the N positions of the training token stream (the split's train part,
exactly the array the batch sampler draws its windows from), the teacher's prediction of the token
*after* each position:

```text
CACHE/
  tinymoe.json    marker (kind "teacher-cache")
  ids.bin         (N, K) token ids, uint16 (vocab <= 65535) or uint32
  logp.bin        (N, K) the teacher's log-probabilities of those ids, float16 or float32
  rest.bin        (N,) float32, method topk only: log of the teacher's mass outside the K ids
  build.json      while building: the settings and how many batches are done (removed at the end)
  manifest.json   written last, once every file is complete and hashed: the completion marker
```

Method `topk` stores the K most likely ids (most likely first); method `sample` stores K ids drawn
independently from the teacher's distribution (repeats allowed), each draw with importance weight
1/K at temperature 1 (tinymoe.train.distill derives the weights at other temperatures from logp).
The files are raw little-endian arrays, so a reader maps them (np.memmap) and a training batch
reads only the rows of its windows. A folder without manifest.json is an unfinished build: refused
by readers, continued by `teacher-cache` (tinymoe.train.teacher_cache).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinymoe.distill_plan import bytes_per_token  # noqa: F401  (also imported from here)
from tinymoe.errors import TinyMoeError
from tinymoe.jsonutil import dumps
from tinymoe.data.record import file_sha256  # noqa: F401  (the cache files are hashed like data files)
from tinymoe.names import TEACHER_CACHE_DTYPES

FORMAT = "tinymoe-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
BUILD = "build.json"
LOGP_DTYPES = TEACHER_CACHE_DTYPES


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def file_shapes(n_tokens: int, k: int, method: str, vocab_size: int, logp_dtype: str) -> dict:
    """name -> (dtype, shape) of the cache's arrays."""
    shapes = {"ids.bin": (ids_dtype(vocab_size), (n_tokens, k)), "logp.bin": (np.dtype(logp_dtype), (n_tokens, k))}
    if method == "topk":
        shapes["rest.bin"] = (np.dtype(np.float32), (n_tokens,))
    return shapes


def _feed(digest, data: bytes) -> None:
    digest.update(len(data).to_bytes(8, "little"))  # length prefixes: no two inputs hash alike
    digest.update(data)


def tokenizer_digest(tokenizer) -> str:
    """sha256 of a tokenizer's identity: its manifest record and, for sentencepiece, its model."""
    h = hashlib.sha256()
    _feed(h, json.dumps(tokenizer.to_manifest(), sort_keys=True).encode())
    _feed(h, getattr(tokenizer, "model_proto", b"") or b"")
    return h.hexdigest()


def stream_digest(tokens: np.ndarray) -> str:
    """sha256 of a token stream's ids (as uint32, so the storage dtype does not matter)."""
    h = hashlib.sha256()
    for start in range(0, int(tokens.shape[0]), 1 << 20):
        h.update(np.ascontiguousarray(tokens[start:start + (1 << 20)], dtype="<u4").tobytes())
    return h.hexdigest()


def write_json_atomically(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(dumps(record, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


@dataclass
class TeacherCache:
    """A complete, checked cache, its arrays memory-mapped."""

    path: Path
    manifest: dict
    ids: np.ndarray  # (N, K) memmap
    logp: np.ndarray  # (N, K) memmap
    rest: np.ndarray | None  # (N,) memmap, topk only

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def digest(self) -> str:
        """One hash of the cache's content: its files' sha256 (a resumed run compares it)."""
        return hashlib.sha256(dumps(self.manifest["files"], sort_keys=True).encode()).hexdigest()

    def gather(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The teacher's predictions at `positions` (B, L) of the training stream: ids (B, L, K)
        int32, log-probabilities (B, L, K) float32, rest log-mass (B, L) float32 (0 for sample)."""
        ids = np.asarray(self.ids[positions], dtype=np.int32)
        logp = np.asarray(self.logp[positions], dtype=np.float32)
        rest = (np.asarray(self.rest[positions], dtype=np.float32) if self.rest is not None
                else np.zeros(positions.shape, dtype=np.float32))
        return ids, logp, rest

    def check_run(self, tokenizer, train_tokens: np.ndarray, val_fraction: float, vocab_size: int) -> None:
        """Refuse (one line) a cache that was not built for this run's tokenizer, data and split."""
        m, where = self.manifest, f"teacher cache {self.path}"
        if m["tokenizer"]["sha256"] != tokenizer_digest(tokenizer):
            raise TinyMoeError(
                f"{where} was built with the teacher's tokenizer {_kind(m['tokenizer'].get('record'))} but this run "
                f"uses {_kind(tokenizer.to_manifest())}: the teacher predicts its own token ids, which mean nothing "
                f"to a student with another tokenizer (train the student with the teacher's tokenizer, e.g. --init "
                f"from a model that has it, or --tokenizer as the teacher's)")
        if int(m["vocab_size"]) != int(vocab_size):
            raise TinyMoeError(f"{where}: the teacher's vocabulary has {m['vocab_size']} entries and the student's "
                               f"{vocab_size}; their predictions cannot be compared id by id")
        data = m["data"]
        if float(data["val_fraction"]) != float(val_fraction):
            raise TinyMoeError(f"{where} holds the training split of --val-fraction {data['val_fraction']} but this "
                               f"run splits with {val_fraction}: positions would not line up")
        if int(data["train_tokens"]) != int(train_tokens.shape[0]) or data["sha256"] != stream_digest(train_tokens):
            raise TinyMoeError(f"{where} was built for other training data ({data['train_tokens']:,} tokens from "
                               f"{', '.join(data.get('sources', []))}; this run has {int(train_tokens.shape[0]):,}); "
                               f"build the cache with this run's --data")


def _kind(record) -> str:
    if not isinstance(record, dict):
        return "(unknown)"
    return f"{record.get('kind')}:{record.get('vocab_size')}"


def open_cache(path: str | Path, verify: bool = True) -> TeacherCache:
    """A complete cache, every file's size checked and (verify) its sha256; one line if not."""
    path = Path(path)
    if not path.is_dir():
        raise TinyMoeError(f"teacher cache {path}: not found (build one with tinymoe teacher-cache)")
    manifest = read_json(path / MANIFEST)
    if manifest is None:
        build = read_json(path / BUILD)
        if build is not None:
            raise TinyMoeError(f"teacher cache {path} is unfinished ({build.get('batches_done', 0)} of "
                               f"{build.get('batches', '?')} batches built); run the same tinymoe teacher-cache "
                               f"command again to finish it")
        raise TinyMoeError(f"teacher cache {path}: no {MANIFEST} (not a teacher cache, or damaged)")
    try:
        if manifest.get("format") != FORMAT:
            raise TinyMoeError(f"teacher cache {path}: {MANIFEST} is not a {FORMAT} manifest")
        if manifest.get("version") != VERSION:
            raise TinyMoeError(f"teacher cache {path}: format version {manifest.get('version')} (this tinymoe "
                               f"reads version {VERSION})")
        n, k, method = int(manifest["tokens"]), int(manifest["k"]), manifest["method"]
        shapes = file_shapes(n, k, method, int(manifest["vocab_size"]), manifest["dtype"])
        files = manifest["files"]
        manifest["tokenizer"]["sha256"], manifest["data"]["sha256"]  # noqa: B018 - must be present
    except (KeyError, TypeError, ValueError) as exc:
        raise TinyMoeError(f"teacher cache {path}: {MANIFEST} is malformed ({exc!r})") from None
    arrays = {}
    for name, (dtype, shape) in shapes.items():
        file = path / name
        expected = int(np.prod(shape)) * dtype.itemsize
        size = file.stat().st_size if file.is_file() else -1
        if size != expected or not isinstance(files.get(name), dict):
            raise TinyMoeError(f"teacher cache {path}: {name} is {'missing' if size < 0 else f'{size:,} bytes'}, "
                               f"expected {expected:,} (truncated or damaged); build it again")
        if verify and file_sha256(file) != files[name].get("sha256"):
            raise TinyMoeError(f"teacher cache {path}: {name} does not match its sha256 in {MANIFEST} (damaged or "
                               f"edited); build it again")
        arrays[name] = np.memmap(file, dtype=dtype, mode="r", shape=shape) if expected else np.zeros(shape, dtype)
    return TeacherCache(path, manifest, arrays["ids.bin"], arrays["logp.bin"], arrays.get("rest.bin"))
