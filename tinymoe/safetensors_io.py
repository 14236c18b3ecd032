"""Write and index `.safetensors` files with page-aligned tensor data.

File layout (the public safetensors format): 8-byte little-endian header length, a JSON header
mapping each tensor name to {dtype, shape, data_offsets: [begin, end]} (offsets relative to the
start of the data section), then the data. We write it ourselves, rather than with
`mx.save_safetensors`, to control placement: with `align` > 1 the data section starts on an
`align`-byte boundary and every tensor starts on one too. Gaps are filled by explicit padding
tensors named `__pad__.N` (uint8), because strict readers require data_offsets to tile the data
section without holes. Readers (ours and `mx.load`) simply ignore those names.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np

PAD_PREFIX = "__pad__."
ALIGN_EXPERTS = 16384  # Apple Silicon page size: a mapped expert can be used without a copy

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


def array_bytes(a) -> tuple[str, bytes]:
    """(MLX dtype name, raw little-endian bytes) of an mx.array, without changing its bits."""
    import mlx.core as mx

    name = str(a.dtype).split(".")[-1]
    code, np_dtype = _DTYPES[name]
    if name == "bfloat16":  # numpy has no bfloat16: move the 16-bit patterns
        a = a.view(mx.uint16)
    return name, np.ascontiguousarray(np.array(a, copy=False), dtype=np_dtype).tobytes()


def write(path: str, arrays: dict, metadata: dict | None = None, align: int = 1) -> dict:
    """Write `arrays` (name -> mx.array) to `path`, fsync it, return the tensor index.

    The index maps each name to {dtype, shape, offsets: [begin, end] absolute in the file,
    sha256}. Tensors are written in the given order.
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
    return index


def read_header(path: str, file_size: int | None = None) -> tuple[int, dict]:
    """(data start offset, header dict) of a safetensors file; ValueError if malformed."""
    size = os.path.getsize(path) if file_size is None else file_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file is shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise ValueError(f"header length {n} does not fit in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return 8 + n, header
