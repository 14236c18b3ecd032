"""Memory-mapped expert weights: open `experts.safetensors` without reading it.

Opening parses the safetensors header (`safetensors_io.read_index`, every entry checked), compares
it with the manifest, and maps the file with `np.memmap`: no tensor byte is read, so opening a
checkpoint of any size takes milliseconds and almost no resident memory. Each stacked tensor
(E, out, in) becomes a numpy view of the mapping; expert e is the contiguous slice [e], whose
pages the OS reads only when it is touched.

Turning a view into an MLX array: `mx.array(view)` copies, on every platform (MLX 0.32 has no
constructor that adopts host memory), so `expert()` copies exactly one expert and `tensor()` one
whole stacked tensor. The tensors start on 16 KiB boundaries (Apple Silicon's page size), which a
zero-copy wrap of mapped pages would need; `_to_mlx` is where it would go.

Pages read to make a copy are released again (madvise MADV_DONTNEED), so the process's
resident memory holds the copies, not the mapped file as well.

Hashes: verifying the file's sha256 would read all of it, defeating the point of mapping. So
the bytes are verified as they are copied out instead: `tensor()` checks a whole stacked tensor
against its manifest sha256, `expert()` one expert against its `slice_sha256` (each expert once
per process; a checkpoint written before per-expert digests existed has none, and its mapped
experts are checked by header only). Opening goes through tinymoe.io.reader, which has already
hashed every other file and checked this file's size and header.
"""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path

import numpy as np

from tinymoe.io import checkpoint
from tinymoe.errors import CheckpointError

EXPERTS_FILE = "experts.safetensors"
# Raw-byte numpy dtype per MLX dtype name: bfloat16 travels as its 16-bit patterns; uint32 is
# a quantized checkpoint's packed weights (their scales and biases are float).
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "uint32": np.uint32}


class MappedExperts:
    """The stacked expert tensors of one checkpoint as views of a read-only memory map."""

    def __init__(self, ckpt: Path, manifest: dict, index: dict | None = None, verify: bool = True):
        """index: the file's header index when the caller (tinymoe.io.reader) has checked it
        against the manifest already; otherwise it is checked here. verify: hash each tensor or
        expert as it is copied out."""
        path = Path(ckpt) / EXPERTS_FILE
        if index is None:
            entry = manifest["files"].get(EXPERTS_FILE)
            if entry is None:
                raise CheckpointError(f"{path}: not listed in the manifest")
            problem = checkpoint.file_problem(path, entry)
            problems, index = ([problem], {}) if problem else checkpoint.header_problems(path, manifest, EXPERTS_FILE)
            if problems:
                raise CheckpointError(problems[0])
        self.path = path
        self.dtypes = {name: e["dtype"] for name, e in index.items()}
        for name, dtype in self.dtypes.items():
            if dtype not in _NP_DTYPES:
                raise CheckpointError(f"{path}: tensor '{name}' has dtype {dtype}; experts must be floating point "
                                      f"(or uint32 packed weights)")
        listed = {e["name"]: e for _, e in checkpoint.entries_in(manifest, EXPERTS_FILE)}
        self._sha256 = {n: listed[n]["sha256"] for n in index} if verify else {}
        self._slice_sha256 = {n: listed[n].get("slice_sha256") for n in index} if verify else {}
        self._verified: set = set()  # (name, expert or None): bytes already checked once
        if path.stat().st_size == 0:  # np.memmap cannot map an empty file; a model without experts
            self._map, self.views = None, {}
            return
        self._map = np.memmap(path, dtype=np.uint8, mode="r")
        self.views = {}
        for name, e in index.items():
            begin, end = e["offsets"]
            self.views[name] = self._map[begin:end].view(_NP_DTYPES[e["dtype"]]).reshape(e["shape"])

    def _verify(self, name: str, e: int | None, view: np.ndarray) -> None:
        """Hash the mapped bytes about to be copied (once per tensor or expert)."""
        want = self._sha256.get(name) if e is None else (self._slice_sha256.get(name) or [None] * (e + 1))[e]
        if want is None or (name, e) in self._verified:
            return
        if hashlib.sha256(np.ascontiguousarray(view).data).hexdigest() != want:
            what = f"tensor '{name}'" + ("" if e is None else f" expert {e}")
            raise CheckpointError(f"{self.path}: {what} sha256 does not match the manifest (corrupted)")
        self._verified.add((name, e))

    def names(self) -> list[str]:
        return list(self.views)

    def num_experts(self, name: str) -> int:
        return self.views[name].shape[0]

    def _to_mlx(self, view: np.ndarray, dtype: str):
        import mlx.core as mx

        arr = mx.array(np.ascontiguousarray(view))  # the copy: only these bytes are read
        self._release(view)
        return arr.view(mx.bfloat16) if dtype == "bfloat16" else arr

    def _release(self, view: np.ndarray) -> None:
        """Drop the mapped pages just copied from this process's resident set. They are clean
        file pages the OS could reclaim anyway, but they would count as resident memory until
        then; after MADV_DONTNEED a later read simply faults them in again from the file."""
        raw = getattr(self._map, "_mmap", None)
        if raw is None or not hasattr(raw, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin = view.__array_interface__["data"][0] - self._map.__array_interface__["data"][0]
        start = begin - begin % mmap.PAGESIZE  # madvise needs a page-aligned start
        raw.madvise(mmap.MADV_DONTNEED, start, begin + view.nbytes - start)

    def expert(self, name: str, e: int):
        """Expert `e` of stacked tensor `name` as an (out, in) mx.array."""
        self._verify(name, e, self.views[name][e])
        return self._to_mlx(self.views[name][e], self.dtypes[name])

    def tensor(self, name: str):
        """The whole stacked (E, out, in) tensor as an mx.array."""
        self._verify(name, None, self.views[name])
        return self._to_mlx(self.views[name], self.dtypes[name])


def open_mapped(path: str | Path, dispatch: str = "auto", verify_hashes: bool = True):
    """(model with non-expert weights loaded, MappedExperts, manifest, tokenizer, ckpt).

    The checkpoint reader checks everything but the expert file's bytes (and hashes every other
    file, with verify_hashes); the map then verifies each expert or tensor it copies out. The
    model's expert parameters are left as MLX's lazy, never-evaluated initialisers; the caller
    either replaces them (`load_model_mapped`) or serves experts on demand (tinymoe.infer.offload).
    """
    from tinymoe.io.reader import open_checkpoint

    reader = open_checkpoint(path, dispatch)
    index = reader.load_non_experts(verify_hashes)
    mapped = MappedExperts(reader.ckpt, reader.manifest, index=index, verify=verify_hashes)
    return reader.model, mapped, reader.manifest, reader.tokenizer(), reader.ckpt


def load_model_mapped(path: str | Path, dispatch: str = "auto", verify_hashes: bool = True):
    """Like `loader.load_model`, with the expert tensors copied out of the memory map (each
    verified against its sha256 as it is copied).

    Returns (model, manifest, tokenizer, ckpt); the weights are bit-identical to a plain load
    (tests/test_memory.py)."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    model, mapped, manifest, tokenizer, ckpt = open_mapped(path, dispatch, verify_hashes)
    experts = {name: mapped.tensor(name) for name in mapped.names()}
    model.update(tree_unflatten(list(experts.items())))
    mx.eval(model.parameters())
    return model, manifest, tokenizer, ckpt
