"""Process-wide MLX backend setup, done before `mlx.core` is first imported.

The `mlx[cpu]` wheel for Linux links a reference BLAS that runs fp32 matmuls at about 5 GFLOP/s.
If an OpenBLAS shared library is loaded into the process with RTLD_GLOBAL *before* MLX is
imported, MLX's BLAS symbols resolve to it instead (about 10-35x faster matmuls here, 8x faster
training). `tinymoe/__init__.py` calls `setup()` so every entry point gets this for free.
Set TINYMOE_NO_OPENBLAS=1 to opt out, or TINYMOE_OPENBLAS=/path/libopenblas.so to choose a file.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

# Debian/Ubuntu (libopenblas0-pthread / -openmp / -serial), Fedora, Homebrew-on-Linux layouts.
_CANDIDATES = (
    "/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_state = {"done": False, "openblas": None, "reason": "not attempted"}


def setup() -> None:
    """Preload OpenBLAS on Linux if possible. Idempotent and cheap (no MLX import)."""
    if _state["done"]:
        return
    _state["done"] = True
    if not sys.platform.startswith("linux"):
        _state["reason"] = "not Linux (MLX uses Accelerate/Metal)"
        return
    if os.environ.get("TINYMOE_NO_OPENBLAS"):
        _state["reason"] = "disabled by TINYMOE_NO_OPENBLAS"
        return
    if "mlx.core" in sys.modules:
        _state["reason"] = "mlx.core was imported before tinymoe; too late to preload"
        return
    explicit = os.environ.get("TINYMOE_OPENBLAS")
    paths = [explicit] if explicit else [p for p in _CANDIDATES if os.path.exists(p)]
    for path in paths:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            _state["reason"] = f"could not load {path}: {exc}"
            continue
        _state["openblas"] = path
        _state["reason"] = "loaded"
        return
    if not paths:
        _state["reason"] = "no OpenBLAS found (Debian/Ubuntu: apt-get install libopenblas0-pthread)"


def blas_in_use() -> str:
    """Name of the BLAS the process actually has mapped (read from /proc/self/maps on Linux)."""
    if sys.platform == "darwin":
        return "Accelerate"
    import mlx.core  # noqa: F401  (MLX's BLAS is mapped only once MLX is loaded)

    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    if "libopenblas" in maps:
        return f"OpenBLAS ({_state['openblas'] or 'loaded by another library'})"
    if "mlx_cpu.libs/libblas" in maps or "libblas" in maps:
        return "reference BLAS bundled with mlx[cpu] (slow)"
    return "unknown"


def openblas_status() -> tuple[str | None, str]:
    return _state["openblas"], _state["reason"]


def default_device_name() -> str:
    import mlx.core as mx

    return "gpu" if mx.default_device() == mx.gpu else "cpu"


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 (n x n) @ (n x n) throughput on the default device, in GFLOP/s."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b)
    for _ in range(2):  # warm-up: first calls allocate and (on GPU) compile
        mx.eval(a @ b)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    seconds = (time.perf_counter() - start) / repeats
    return 2 * n**3 / seconds / 1e9


def metal_device_info() -> dict | None:
    """MLX's facts about the Mac GPU, or None where Metal is unavailable.

    Keys (MLX's Metal backend): device_name (the chip, e.g. "Apple M2 Max"), architecture,
    memory_size (bytes of unified memory), max_recommended_working_set_size (bytes: the GPU
    working-set limit in force, macOS's recommendedMaxWorkingSetSize, which
    `sudo sysctl iogpu.wired_limit_mb=N` raises), max_buffer_length, resource_limit.
    """
    import mlx.core as mx

    if not mx.metal.is_available():
        return None
    try:
        info = mx.device_info(mx.gpu) if hasattr(mx, "device_info") else mx.metal.device_info()
    except Exception:  # an MLX without either spelling: the caller falls back to assumptions
        return None
    return dict(info) or None


def mac_memory_facts() -> dict | None:
    """{chip, memory_gib, working_set_gib} of this Mac's GPU (see metal_device_info), or None."""
    info = metal_device_info()
    if not info or not info.get("memory_size") or not info.get("max_recommended_working_set_size"):
        return None
    return {"chip": str(info.get("device_name", "unknown Apple GPU")),
            "memory_gib": int(info["memory_size"]) / 2**30,
            "working_set_gib": int(info["max_recommended_working_set_size"]) / 2**30}
