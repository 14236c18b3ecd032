"""Source text of the fused dispatch kernels, shared by `mx.fast.metal_kernel` and `cuda_kernel`.

This module is data: the five kernel bodies, the one-line prologues that define the flat thread
index `gid` on each backend, the CUDA header that gives the CUDA twins Metal's `simd_sum`, and a
`KernelSpec` per kernel naming its arguments and template parameters. Keeping the text apart
from the launch code is what lets the test suite compile these exact strings as C++ (with an
emulator), syntax-check the source MLX generates around them, and NVRTC-compile the CUDA twins,
all without a GPU.

Template parameters: MLX caches a compiled kernel by its name plus template arguments, so every
input and output dtype must be one of them, or a second dtype silently reuses the first dtype's
binary (MLX < 0.32.1 on CUDA, 0.22-0.26.1 on Metal). `KernelSpec.types` says which arrays each
type parameter stands for; the launcher derives the template from the arrays themselves.

Integer math is uint32: the launcher keeps every grid below 2**31 threads (minus a threadgroup),
so every flat index and offset (< N*D) is representable. D and K are template ints, so `/ D` and
the k loops are cheap; row counts come from an input's shape, so a rounded-up grid stays in
bounds (CUDA rounds the grid up to whole blocks; Metal trims it).
"""

from __future__ import annotations

from dataclasses import dataclass

# Lanes of a SIMD group (Metal) / warp (CUDA): 32 on every Apple GPU and every NVIDIA GPU.
SIMD_WIDTH = 32

METAL_PROLOGUE = "const uint32_t gid = thread_position_in_grid.x;\n"
CUDA_PROLOGUE = "const uint32_t gid = blockIdx.x * blockDim.x + threadIdx.x;\n"

# Metal has `simd_sum` built in; CUDA gets the same reduction from warp shuffles. Every lane of
# the warp must reach it (full mask), which the SIMD kernel's guard guarantees: it returns whole
# warps at a time. Guarded, so several kernels can share one translation unit.
CUDA_SIMD_HEADER = """
#ifndef TINYMOE_SIMD_SUM
#define TINYMOE_SIMD_SUM
__device__ __forceinline__ float simd_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}
#endif
"""

_GATHER_ROWS_BODY = """
// xs[p, d] = x[order[p] / K, d]: a plain copy, so no float round trip for half types.
const uint32_t n_rows = static_cast<uint32_t>(order_shape[0]);
const uint32_t p = gid / D;
const uint32_t d = gid - p * D;
if (p >= n_rows) {
  return;
}
const uint32_t t = order[p] / K;
xs[p * D + d] = x[t * D + d];
"""

_COMBINE_BODY = """
// y[t, d] = sum_k gates[t, k] * ys[pos[t, k], d], accumulated in float.
const uint32_t n_tokens = static_cast<uint32_t>(pos_shape[0]);
const uint32_t t = gid / D;
const uint32_t d = gid - t * D;
if (t >= n_tokens) {
  return;
}
float acc = 0.0f;
for (int k = 0; k < K; ++k) {
  const uint32_t tk = t * K + k;
  acc += static_cast<float>(gates[tk]) * static_cast<float>(ys[pos[tk] * D + d]);
}
y[t * D + d] = static_cast<ValT>(acc);
"""

_COMBINE_GRAD_YS_BODY = """
// dys[p, d] = gates.flat[order[p]] * dy[order[p] / K, d]: the scatter dys[pos[t, k]] += ...
// turned into a gather through `order`, so no two threads write the same element.
const uint32_t n_rows = static_cast<uint32_t>(order_shape[0]);
const uint32_t p = gid / D;
const uint32_t d = gid - p * D;
if (p >= n_rows) {
  return;
}
const uint32_t pair = order[p];
const uint32_t t = pair / K;
const float g = static_cast<float>(gates[pair]);
dys[p * D + d] = static_cast<ValT>(g * static_cast<float>(dy[t * D + d]));
"""

_COMBINE_GRAD_GATES_BODY = """
// dgates[t, k] = <dy[t], ys[pos[t, k]]>: one SIMD group of 32 lanes per (t, k) pair. Lane l
// reads elements l, l + 32, ... (neighbouring lanes, neighbouring addresses) and simd_sum adds
// the 32 partial sums in registers (nothing in shared memory). The guard returns whole SIMD
// groups (the grid is 32 threads per pair), so every lane of a live pair reaches simd_sum.
const uint32_t n_pairs = static_cast<uint32_t>(pos_shape[0]) * K;
const uint32_t pair = gid / 32;
const uint32_t lane = gid - pair * 32;
if (pair >= n_pairs) {
  return;
}
const uint32_t t = pair / K;
const uint32_t row = pos[pair];
float acc = 0.0f;
for (uint32_t d = lane; d < static_cast<uint32_t>(D); d += 32) {
  acc += static_cast<float>(dy[t * D + d]) * static_cast<float>(ys[row * D + d]);
}
acc = simd_sum(acc);
if (lane == 0) {
  dgates[pair] = static_cast<GateT>(acc);
}
"""

_GATHER_ROWS_GRAD_BODY = """
// dx[t, d] = sum_k dxs[pos[t, k], d]: each token pulls its K sorted rows back, in float.
const uint32_t n_tokens = static_cast<uint32_t>(pos_shape[0]);
const uint32_t t = gid / D;
const uint32_t d = gid - t * D;
if (t >= n_tokens) {
  return;
}
float acc = 0.0f;
for (int k = 0; k < K; ++k) {
  acc += static_cast<float>(dxs[pos[t * K + k] * D + d]);
}
dx[t * D + d] = static_cast<ValT>(acc);
"""

# Inputs that are always uint32 indices (the dispatch plan); every other array is typed by a
# template parameter.
INDEX_INPUTS = ("order", "pos")
TEMPLATE_INTS = ("D", "K")


@dataclass(frozen=True)
class KernelSpec:
    """One kernel: argument names in signature order, the shared body, and its template.

    `types`: (type parameter, names of the arrays whose dtype it is), in template order; the
    template is `types` then `TEMPLATE_INTS`. `lanes`: threads per output element (1, or
    SIMD_WIDTH for a kernel that reduces across a SIMD group).
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    body: str
    types: tuple[tuple[str, tuple[str, ...]], ...]
    lanes: int = 1

    @property
    def uses_simd(self) -> bool:
        return self.lanes > 1

    @property
    def metal_source(self) -> str:
        return METAL_PROLOGUE + self.body

    @property
    def cuda_source(self) -> str:
        return CUDA_PROLOGUE + self.body

    @property
    def cuda_header(self) -> str:
        return CUDA_SIMD_HEADER if self.uses_simd else ""

    @property
    def template_names(self) -> tuple[str, ...]:
        return tuple(t for t, _ in self.types) + TEMPLATE_INTS


KERNELS = {
    spec.name: spec
    for spec in (
        KernelSpec("gather_rows", ("x", "order"), ("xs",), _GATHER_ROWS_BODY,
                   (("ValT", ("x", "xs")),)),
        KernelSpec("combine", ("ys", "pos", "gates"), ("y",), _COMBINE_BODY,
                   (("ValT", ("ys", "y")), ("GateT", ("gates",)))),
        KernelSpec("combine_grad_ys", ("dy", "gates", "order"), ("dys",), _COMBINE_GRAD_YS_BODY,
                   (("ValT", ("dy", "dys")), ("GateT", ("gates",)))),
        KernelSpec("combine_grad_gates", ("dy", "ys", "pos"), ("dgates",),
                   _COMBINE_GRAD_GATES_BODY,
                   (("ValT", ("dy", "ys")), ("GateT", ("dgates",))), lanes=SIMD_WIDTH),
        KernelSpec("gather_rows_grad", ("dxs", "pos"), ("dx",), _GATHER_ROWS_GRAD_BODY,
                   (("ValT", ("dxs", "dx")),)),
    )
}

GATHER_ROWS_SOURCE = KERNELS["gather_rows"].metal_source
COMBINE_SOURCE = KERNELS["combine"].metal_source
COMBINE_GRAD_YS_SOURCE = KERNELS["combine_grad_ys"].metal_source
COMBINE_GRAD_GATES_SOURCE = KERNELS["combine_grad_gates"].metal_source
GATHER_ROWS_GRAD_SOURCE = KERNELS["gather_rows_grad"].metal_source
