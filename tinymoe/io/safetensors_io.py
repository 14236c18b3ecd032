"""Write and index `.safetensors` files with page-aligned tensor data.

File layout (the public safetensors format): 8-byte little-endian header length, a JSON header
mapping each tensor name to {dtype, shape, data_offsets: [begin, end]} (offsets relative to the
start of the data section), then the data. We write it ourselves, rather than with
`mx.save_safetensors`, to control placement: with `align` > 1 the data section starts on an
`align`-byte boundary and every tensor starts on one too. Gaps are filled by explicit padding
tensors named `__pad__.N` (uint8), because strict readers require data_offsets to tile the data
section without holes. Readers (ours and `mx.load`) simply ignore those names.

Reading is defensive: `read_index` checks every header entry (known dtype, non-negative integer
shape, offsets inside the file, byte length equal to shape x item size, no overlaps) before anyone
calls `mx.load`, because `mx.load` silently accepts some corrupt headers (a shape whose byte size
overflows 64 bits loads as an empty array) and a header length or shape taken on trust could ask
for an enormous allocation. Malformed input raises `HeaderError` (a ValueError).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct

import numpy as np

PAD_PREFIX = "__pad__."
ALIGN_EXPERTS = 16384  # Apple Silicon page size: a mapped expert can be used without a copy
MAX_HEADER_BYTES = 100 * 2**20  # far above any real header; bounds what a corrupt length can ask for
MAX_RANK = 32

# MLX dtype name -> (safetensors code, numpy dtype used to move the raw bytes)
_DTYPES = {
    "float32": ("F32", np.float32),
    "float16": ("F16", np.float16),
    "bfloat16": ("BF16", np.uint16),
    "int64": ("I64", np.int64),
    "int32": ("I32", np.int32),
    "uint32": ("U32", np.uint32),
    "uint16": ("U16", np.uint16),
    "int16": ("I16", np.int16),
    "uint8": ("U8", np.uint8),
    "int8": ("I8", np.int8),
    "uint64": ("U64", np.uint64),
    "bool": ("BOOL", np.bool_),
}
CODE_TO_DTYPE = {code: name for name, (code, _) in _DTYPES.items()}
ITEM_BYTES = {name: np.dtype(np_dtype).itemsize for name, (_, np_dtype) in _DTYPES.items()}


class HeaderError(ValueError):
    """A safetensors file whose header is malformed or inconsistent with the file."""


def array_bytes(a) -> tuple[str, bytes]:
    """(MLX dtype name, raw little-endian bytes) of an mx.array (or a numpy array), bit for bit."""
    if isinstance(a, np.ndarray):  # numpy input needs no MLX (and no bfloat16 trick)
        name = a.dtype.name
        if name not in _DTYPES or name == "bfloat16":
            raise ValueError(f"unsupported numpy dtype {a.dtype}")
        return name, np.ascontiguousarray(a, dtype=_DTYPES[name][1]).tobytes()
    import mlx.core as mx

    name = str(a.dtype).split(".")[-1]
    code, np_dtype = _DTYPES[name]
    if name == "bfloat16":  # numpy has no bfloat16: move the 16-bit patterns
        a = a.view(mx.uint16)
    return name, np.ascontiguousarray(np.array(a, copy=False), dtype=np_dtype).tobytes()


def write(path: str, arrays: dict, metadata: dict | None = None, align: int = 1,
          slice_hashes: bool = False) -> dict:
    """Write `arrays` (name -> mx.array) to `path`, fsync it, return the tensor index.

    The index maps each name to {dtype, shape, offsets: [begin, end] absolute in the file,
    sha256}. Tensors are written in the given order. With `slice_hashes`, each tensor of rank
    >= 1 also gets `slice_sha256`: one digest per slice [i] of its first axis (a stacked expert
    tensor: one per expert), so a reader that maps one expert can verify just that expert.
    """
    blobs = [(name, *array_bytes(a), list(a.shape)) for name, a in arrays.items()]
    header: dict = {"__metadata__": {k: str(v) for k, v in (metadata or {}).items()}}
    layout, cursor, n_pad = [], 0, 0
    for name, dtype, raw, shape in blobs:
        gap = (-cursor) % align
        if gap:
            header[f"{PAD_PREFIX}{n_pad}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [cursor, cursor + gap]}
            layout.append(b"\0" * gap)
            cursor, n_pad = cursor + gap, n_pad + 1
        header[name] = {"dtype": _DTYPES[dtype][0], "shape": shape, "data_offsets": [cursor, cursor + len(raw)]}
        layout.append(raw)
        cursor += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    # Pad the header with spaces (allowed by the format) so the data section is aligned too.
    text += b" " * ((-(8 + len(text))) % align)
    data_start = 8 + len(text)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for chunk in layout:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    index = {}
    for name, dtype, raw, shape in blobs:
        begin, end = header[name]["data_offsets"]
        index[name] = {
            "dtype": dtype,
            "shape": shape,
            "offsets": [data_start + begin, data_start + end],
            "sha256": hashlib.sha256(raw).hexdigest(),
        }
        if slice_hashes and shape and shape[0] > 0:
            stride = len(raw) // shape[0]
            view = memoryview(raw)
            index[name]["slice_sha256"] = [hashlib.sha256(view[i * stride:(i + 1) * stride]).hexdigest()
                                           for i in range(shape[0])]
    return index


def read_header(path: str, file_size: int | None = None) -> tuple[int, dict]:
    """(data start offset, header dict) of a safetensors file; HeaderError if malformed."""
    size = os.path.getsize(path) if file_size is None else file_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HeaderError("file is shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        # Checked before reading, so a corrupt length never becomes a huge read.
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise HeaderError(f"header length {n} does not fit in a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise HeaderError(f"header is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    return 8 + n, header


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_index(path: str, file_size: int | None = None) -> tuple[int, dict]:
    """(data start, name -> {dtype, shape, offsets}) with every header entry checked.

    dtype is the MLX name, offsets are absolute [begin, end) in the file. Padding tensors are
    checked but left out. Raises HeaderError naming the first bad entry.
    """
    size = os.path.getsize(path) if file_size is None else file_size
    data_start, header = read_header(path, size)
    data_bytes = size - data_start
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise HeaderError("__metadata__ must map names to strings")
    index, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise HeaderError(f"tensor '{name}': entry is not an object")
        dtype = CODE_TO_DTYPE.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
        if dtype is None:
            raise HeaderError(f"tensor '{name}': unknown dtype {entry.get('dtype')!r}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_count(d) for d in shape):
            raise HeaderError(f"tensor '{name}': shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1] <= data_bytes):
            raise HeaderError(f"tensor '{name}': data_offsets {offsets!r} do not fit the "
                              f"{data_bytes}-byte data section")
        # Python integers cannot overflow, so a huge shape is caught here, before any allocation.
        n_bytes = math.prod(shape) * ITEM_BYTES[dtype]
        if n_bytes != offsets[1] - offsets[0]:
            raise HeaderError(f"tensor '{name}': {dtype}{shape} needs {n_bytes} bytes, "
                              f"data_offsets span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
        if not name.startswith(PAD_PREFIX):
            index[name] = {"dtype": dtype, "shape": shape,
                           "offsets": [data_start + offsets[0], data_start + offsets[1]]}
    reach, last = 0, None  # furthest end so far over non-empty tensors, and whose it is
    for begin, end, name in sorted(spans):
        if begin == end:  # an empty tensor occupies no bytes
            continue
        if begin < reach:
            raise HeaderError(f"tensors '{last}' and '{name}' overlap")
        reach, last = end, name
    return data_start, index


def digests(path: str, ranges: list) -> tuple[str, list[str]]:
    """sha256 of a whole file and of each [begin, end) byte range of it, in a single read.

    `ranges` must be sorted by their start; they may overlap or nest (a tensor and its expert
    slices). A range that runs past the end of the file hashes only the bytes that exist, so it
    cannot match.
    """
    whole, parts = hashlib.sha256(), [hashlib.sha256() for _ in ranges]
    pos, first = 0, 0  # bytes hashed so far; first range not yet complete
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            whole.update(chunk)
            end, view = pos + len(chunk), memoryview(chunk)
            j = first
            while j < len(ranges) and ranges[j][0] < end:
                lo, hi = max(ranges[j][0], pos), min(ranges[j][1], end)
                if lo < hi:
                    parts[j].update(view[lo - pos:hi - pos])
                j += 1
            while first < len(ranges) and ranges[first][1] <= end:
                first += 1
            pos = end
    return whole.hexdigest(), [h.hexdigest() for h in parts]
