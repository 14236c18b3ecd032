"""Where and how the fused dispatch kernels launch: device checks, grid limits, templates.

The kernels run only when the default device is the GPU and a kernel backend exists there
(Metal on a Mac, MLX's CUDA build elsewhere), and they are launched on the GPU stream
explicitly. Both halves matter: without a stream a kernel built while the default device is the
CPU throws on MLX's CUDA build ("[custom_kernel] Only supports the GPU") and on Metal (MLX >=
0.32) silently runs on the GPU although the user chose the CPU. Everywhere else, and for dtypes
or grids the kernels do not take, callers use the pure-MLX references.

Kernel objects are built on first use and reused; the template passed to MLX is derived from the
arrays themselves (every input and output dtype is in it, see tinymoe.nn.kernels.sources), since
MLX caches compiled kernels by name plus template arguments. Whether kernels that can run are
also *trusted* (they passed their first-use check against the references) is
tinymoe.nn.kernels.trust's business, which the ops ask before they launch.
"""

from __future__ import annotations

import math

import mlx.core as mx

from tinymoe.nn.kernels.sources import INDEX_INPUTS, KERNELS, KernelSpec

# 256 threads is a safe threadgroup on every Apple GPU and a common CUDA block, and a multiple
# of the SIMD width, so the SIMD kernel's groups of 32 lanes never straddle two threadgroups.
THREADS_PER_GROUP = 256
# MLX passes grid sizes as int32 and its CUDA launcher computes the block count
# (grid + block - 1) / block in signed int, which overflows above 2**31 - 256; the kernels index
# with uint32. Larger problems take the reference path.
MAX_GRID_THREADS = 2**31 - THREADS_PER_GROUP
KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def metal_available() -> bool:
    """True where `mx.fast.metal_kernel` objects can actually run (a Mac GPU)."""
    return bool(mx.metal.is_available())


def cuda_available() -> bool:
    """True on MLX's CUDA backend, where the same bodies run through `mx.fast.cuda_kernel`."""
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available() and hasattr(mx.fast, "cuda_kernel"))


def default_device_is_gpu() -> bool:
    return mx.default_device() == mx.gpu


def device_backend() -> str | None:
    """'metal' or 'cuda' when the default device is a GPU the kernels can run on, else None."""
    if not default_device_is_gpu():
        return None
    if metal_available():
        return "metal"
    if cuda_available():
        return "cuda"
    return None


def launch_stream():
    """The stream every kernel is launched on: the GPU's default stream, never implied."""
    return mx.gpu


def backend_for(dtypes, n_threads: int) -> str | None:
    """The kernel backend that can take one call, or None for the reference path: every dtype
    must have a kernel, the grid must fit, and the default device must be a kernel-capable GPU."""
    if any(dt not in KERNEL_DTYPES for dt in dtypes) or n_threads > MAX_GRID_THREADS:
        return None
    return device_backend()


def grid_threads(name: str, out_shape) -> int:
    """Threads a launch of kernel `name` uses: `lanes` per output element."""
    return math.prod(out_shape) * KERNELS[name].lanes


def _make_kernel(spec: KernelSpec, backend: str):
    if backend == "metal":
        return mx.fast.metal_kernel(
            name=f"tinymoe_{spec.name}",
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            source=spec.metal_source,
        )
    return mx.fast.cuda_kernel(
        name=f"tinymoe_{spec.name}",
        input_names=list(spec.inputs),
        output_names=list(spec.outputs),
        source=spec.cuda_source,
        header=spec.cuda_header,
    )


# Built on first use: constructing kernels where they cannot run would be wasted work, and the
# objects are reused across calls (MLX caches the compiled library per template instance).
_KERNEL_CACHE: dict[tuple[str, str], object] = {}


def _kernel(name: str, backend: str):
    key = (name, backend)
    if key not in _KERNEL_CACHE:
        _KERNEL_CACHE[key] = _make_kernel(KERNELS[name], backend)
    return _KERNEL_CACHE[key]


def template_for(spec: KernelSpec, dtypes: dict) -> list:
    """MLX template arguments from {array name: dtype}: each type parameter is the dtype of the
    arrays it stands for (which must agree), then the template ints are appended by the caller."""
    template = []
    for tname, arrays in spec.types:
        seen = {dtypes[a] for a in arrays}
        if len(seen) != 1:
            raise ValueError(f"{spec.name}: {', '.join(arrays)} must share one dtype, got {seen}")
        template.append((tname, seen.pop()))
    for name in INDEX_INPUTS:
        if name in dtypes and dtypes[name] != mx.uint32:
            raise ValueError(f"{spec.name}: index input {name} must be uint32")
    return template


def launch(name: str, backend: str, inputs, ints, out_shape, out_dtype) -> mx.array:
    """Run kernel `name` on a 1-D grid (`lanes` threads per output element), on the GPU stream.

    `ints`: the template ints [("D", D), ("K", K)]; the type parameters come from the arrays.
    """
    spec = KERNELS[name]
    dtypes = dict(zip(spec.inputs, (a.dtype for a in inputs)))
    dtypes.update(dict.fromkeys(spec.outputs, out_dtype))
    template = template_for(spec, dtypes) + list(ints)
    n_threads = grid_threads(name, out_shape)
    if n_threads == 0:
        return mx.zeros(out_shape, dtype=out_dtype)
    (out,) = _kernel(name, backend)(
        inputs=inputs,
        template=template,
        grid=(n_threads, 1, 1),
        threadgroup=(THREADS_PER_GROUP, 1, 1),
        output_shapes=[out_shape],
        output_dtypes=[out_dtype],
        stream=launch_stream(),
    )
    return out
