"""NaN and inf in weights and optimizer state: refused on save and resume, reported by validate.

A non-finite weight never heals: every later forward is NaN. So a checkpoint holding one is not
a "last good" state, whatever the loss said when it was saved. Two scanners, one per place the
tensors live:

- `nonfinite_arrays` for tensors in memory (mx.array or numpy), before a save and after a resume
  load: one reduction per tensor, all evaluated together (one host sync);
- `nonfinite_in_file` for tensors in a safetensors file (validate): a read-only memory map,
  scanned in chunks with numpy, so validating never allocates a whole tensor and needs no MLX.

Only floating-point tensors are scanned; integer ones (step counters) are finite by construction.
"""

from __future__ import annotations

import numpy as np

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_CHUNK = 1 << 22  # elements per numpy pass: bounds the temporaries of a scan to a few MiB
_BF16_EXPONENT = 0x7F80  # all exponent bits set: inf or NaN (bfloat16 travels as uint16 patterns)


def nonfinite_arrays(arrays: dict) -> list[str]:
    """Names (in order) of the floating-point arrays that hold a NaN or an inf."""
    bad, mlx_names, flags = [], [], []
    for name, a in arrays.items():
        if isinstance(a, np.ndarray):
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                bad.append(name)
            continue
        if str(a.dtype).split(".")[-1] in FLOAT_DTYPES:
            import mlx.core as mx

            mlx_names.append(name)
            flags.append(mx.all(mx.isfinite(a)))
    if flags:
        import mlx.core as mx

        ok = mx.stack(flags)
        mx.eval(ok)  # one sync for every tensor
        bad.extend(n for n, good in zip(mlx_names, np.array(ok).tolist()) if not good)
    order = {n: i for i, n in enumerate(arrays)}
    return sorted(bad, key=order.__getitem__)


def nonfinite_in_file(path, entries: list[dict]) -> list[str]:
    """Names of the tensors among `entries` (manifest entries of one safetensors file whose
    header was checked) that hold a NaN or an inf."""
    floats = [e for e in entries if e["dtype"] in FLOAT_DTYPES and e["offsets"][1] > e["offsets"][0]]
    if not floats:
        return []
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    bad = []
    for e in floats:
        begin, end = e["offsets"]
        dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[e["dtype"]]
        flat = raw[begin:end].view(dtype)
        for start in range(0, flat.size, _CHUNK):
            part = flat[start:start + _CHUNK]
            if e["dtype"] == "bfloat16":
                finite = not ((part & _BF16_EXPONENT) == _BF16_EXPONENT).any()
            else:
                finite = bool(np.isfinite(part).all())
            if not finite:
                bad.append(e["name"])
                break
    return bad
