"""Fused MoE dispatch ops: gather token rows into expert-sorted order, and combine them back.

Shapes: T tokens, K slots per token, N = T*K (token, slot) pairs, D model width. The caller's
dispatch plan sorts the pairs by expert id: `order` (N,) uint32 says sorted row p holds pair
order[p] (pair = t*K + k, so its token is order[p] // K) and `pos` (T, K) uint32 is the inverse
permutation (pair (t, k) sits at sorted row pos[t, k]). With both, every forward and backward
pass is a *gather* (each output element reads its own inputs; no scatter, no atomics):
  gather_rows  forward  xs[p] = x[order[p] // K]
               backward dx[t] = sum_k dxs[pos[t, k]]
  combine      forward  y[t] = sum_k gates[t, k] * ys[pos[t, k]]
               backward dys[p] = gates.flat[order[p]] * dy[order[p] // K]
                        dgates[t, k] = <dy[t], ys[pos[t, k]]>
Each op is a pure-MLX reference, a kernel body for `mx.fast.metal_kernel` (and, with a different
index prologue, `mx.fast.cuda_kernel`), and an `mx.custom_function` whose vjp uses the gradient
kernels, or the gradient references where no kernel can run (Linux CPU), so the same custom vjp
is exercised everywhere. Kernel objects are built on first use, only where the backend exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

# One thread per output element on a 1-D grid. 256 is a safe size on every Apple GPU and a
# common CUDA block; Metal trims the last group itself, CUDA rounds the grid up (hence guards).
THREADS_PER_GROUP = 256
# MLX passes grid sizes as int32 and the kernels index with uint32: larger problems use the
# reference path instead of overflowing.
MAX_GRID_THREADS = 2**31 - 1
KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


# --------------------------------------------------------------------------- references


def gather_rows_reference(x_TD: mx.array, order_N: mx.array, top_k: int) -> mx.array:
    """xs[p] = x[order[p] // K]: (N, D) token rows in expert-sorted order."""
    return x_TD[order_N // top_k]


def combine_reference(ys_ND: mx.array, pos_TK: mx.array, gates_TK: mx.array) -> mx.array:
    """y[t] = sum_k gates[t, k] * ys[pos[t, k]]: (T, D) in ys's dtype, accumulated in float32."""
    picked_TKD = ys_ND[pos_TK].astype(mx.float32)
    y_TD = mx.sum(picked_TKD * gates_TK.astype(mx.float32)[..., None], axis=1)
    return y_TD.astype(ys_ND.dtype)


def gather_rows_grad_reference(dxs_ND: mx.array, pos_TK: mx.array) -> mx.array:
    """dx[t] = sum_k dxs[pos[t, k]]: (T, D), the gather form of gather_rows' input gradient."""
    return mx.sum(dxs_ND[pos_TK].astype(mx.float32), axis=1).astype(dxs_ND.dtype)


def combine_grad_ys_reference(dy_TD: mx.array, gates_TK: mx.array, order_N: mx.array) -> mx.array:
    """dys[p] = gates.flat[order[p]] * dy[order[p] // K]: (N, D) in dy's dtype."""
    K = gates_TK.shape[1]
    g_N = gates_TK.reshape(-1)[order_N].astype(mx.float32)
    dys_ND = g_N[:, None] * dy_TD[order_N // K].astype(mx.float32)
    return dys_ND.astype(dy_TD.dtype)


def combine_grad_gates_reference(dy_TD: mx.array, ys_ND: mx.array, pos_TK: mx.array) -> mx.array:
    """dgates[t, k] = <dy[t], ys[pos[t, k]]>: (T, K) float32."""
    prod_TKD = dy_TD[:, None, :].astype(mx.float32) * ys_ND[pos_TK].astype(mx.float32)
    return mx.sum(prod_TKD, axis=-1)


# --------------------------------------------------------------------------- kernel sources
# Bodies are shared by Metal and CUDA; only the prologue that defines `gid` (the flat thread
# index) differs. D and K arrive as compile-time template ints, so `/ D` and the k loop are
# cheap; the row count comes from an input's shape so a rounded-up grid stays in bounds.
# Integer math is uint32: the Python side keeps every grid below 2**31 threads and every
# offset (< N*D) is then representable.

METAL_PROLOGUE = "const uint32_t gid = thread_position_in_grid.x;\n"
CUDA_PROLOGUE = "const uint32_t gid = blockIdx.x * blockDim.x + threadIdx.x;\n"

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
// dgates[t, k] = <dy[t], ys[pos[t, k]]>: one thread per (t, k) walks the D-long dot product.
const uint32_t n_pairs = static_cast<uint32_t>(pos_shape[0]) * K;
if (gid >= n_pairs) {
  return;
}
const uint32_t t = gid / K;
const uint32_t row = pos[gid];
float acc = 0.0f;
for (int d = 0; d < D; ++d) {
  acc += static_cast<float>(dy[t * D + d]) * static_cast<float>(ys[row * D + d]);
}
dgates[gid] = static_cast<GateT>(acc);
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


@dataclass(frozen=True)
class KernelSpec:
    """One kernel: argument names in signature order and the shared body."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    body: str

    @property
    def metal_source(self) -> str:
        return METAL_PROLOGUE + self.body

    @property
    def cuda_source(self) -> str:
        return CUDA_PROLOGUE + self.body


KERNELS = {
    spec.name: spec
    for spec in (
        KernelSpec("gather_rows", ("x", "order"), ("xs",), _GATHER_ROWS_BODY),
        KernelSpec("combine", ("ys", "pos", "gates"), ("y",), _COMBINE_BODY),
        KernelSpec("combine_grad_ys", ("dy", "gates", "order"), ("dys",), _COMBINE_GRAD_YS_BODY),
        KernelSpec(
            "combine_grad_gates", ("dy", "ys", "pos"), ("dgates",), _COMBINE_GRAD_GATES_BODY
        ),
        KernelSpec("gather_rows_grad", ("dxs", "pos"), ("dx",), _GATHER_ROWS_GRAD_BODY),
    )
}

GATHER_ROWS_SOURCE = KERNELS["gather_rows"].metal_source
COMBINE_SOURCE = KERNELS["combine"].metal_source
COMBINE_GRAD_YS_SOURCE = KERNELS["combine_grad_ys"].metal_source
COMBINE_GRAD_GATES_SOURCE = KERNELS["combine_grad_gates"].metal_source
GATHER_ROWS_GRAD_SOURCE = KERNELS["gather_rows_grad"].metal_source


# --------------------------------------------------------------------------- kernel plumbing


def metal_available() -> bool:
    """True where `mx.fast.metal_kernel` objects can actually run (a Mac GPU)."""
    return bool(mx.metal.is_available())


def cuda_available() -> bool:
    """True on MLX's CUDA backend, where the same bodies run through `mx.fast.cuda_kernel`."""
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available() and hasattr(mx.fast, "cuda_kernel"))


def _kernel_backend() -> str | None:
    if metal_available():
        return "metal"
    if cuda_available():
        return "cuda"
    return None


def _backend_for(dtype: mx.Dtype, n_threads: int) -> str | None:
    """The kernel backend to use for this call, or None for the reference path."""
    if dtype not in KERNEL_DTYPES or n_threads > MAX_GRID_THREADS:
        return None
    return _kernel_backend()


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
    )


# Built on first use: constructing kernels where they cannot run would be wasted work, and the
# objects are reused across calls (MLX caches the compiled library per template instance).
_KERNEL_CACHE: dict[tuple[str, str], object] = {}


def _kernel(name: str, backend: str):
    key = (name, backend)
    if key not in _KERNEL_CACHE:
        _KERNEL_CACHE[key] = _make_kernel(KERNELS[name], backend)
    return _KERNEL_CACHE[key]


def _launch(name, backend, inputs, template, n_threads, out_shape, out_dtype) -> mx.array:
    """Run one kernel on a 1-D grid of `n_threads` threads (one per output element)."""
    if n_threads == 0:
        return mx.zeros(out_shape, dtype=out_dtype)
    (out,) = _kernel(name, backend)(
        inputs=inputs,
        template=template,
        grid=(n_threads, 1, 1),
        threadgroup=(THREADS_PER_GROUP, 1, 1),
        output_shapes=[out_shape],
        output_dtypes=[out_dtype],
    )
    return out


# --------------------------------------------------------------------------- forward / backward


def _gather_rows_forward(x_TD, order_N, top_k):
    N, D = order_N.shape[0], x_TD.shape[1]
    backend = _backend_for(x_TD.dtype, N * D)
    if backend is None:
        return gather_rows_reference(x_TD, order_N, top_k)
    template = [("D", D), ("K", top_k)]
    return _launch("gather_rows", backend, [x_TD, order_N], template, N * D, (N, D), x_TD.dtype)


def _gather_rows_backward(dxs_ND, pos_TK, dtype):
    (T, K), D = pos_TK.shape, dxs_ND.shape[1]
    backend = _backend_for(dtype, dxs_ND.shape[0] * D)
    if backend is None:
        return gather_rows_grad_reference(dxs_ND, pos_TK).astype(dtype)
    template = [("ValT", dtype), ("D", D), ("K", K)]
    inputs = [dxs_ND.astype(dtype), pos_TK]
    return _launch("gather_rows_grad", backend, inputs, template, T * D, (T, D), dtype)


def _combine_forward(ys_ND, pos_TK, gates_TK):
    (T, K), (N, D) = pos_TK.shape, ys_ND.shape
    backend = _backend_for(ys_ND.dtype, N * D)
    if backend is None:
        return combine_reference(ys_ND, pos_TK, gates_TK)
    template = [("ValT", ys_ND.dtype), ("D", D), ("K", K)]
    inputs = [ys_ND, pos_TK, gates_TK]
    return _launch("combine", backend, inputs, template, T * D, (T, D), ys_ND.dtype)


def _combine_backward(dy_TD, ys_ND, pos_TK, gates_TK, order_N):
    """(dys (N, D) in ys's dtype, dgates (T, K) in gates's dtype)."""
    (T, K), (N, D) = pos_TK.shape, ys_ND.shape
    dy_TD = dy_TD.astype(ys_ND.dtype)
    backend = _backend_for(ys_ND.dtype, N * D)
    if backend is None or gates_TK.dtype not in KERNEL_DTYPES:
        dys_ND = combine_grad_ys_reference(dy_TD, gates_TK, order_N)
        dgates_TK = combine_grad_gates_reference(dy_TD, ys_ND, pos_TK).astype(gates_TK.dtype)
        return dys_ND, dgates_TK
    tmpl = [("D", D), ("K", K)]
    dys_ND = _launch(
        "combine_grad_ys",
        backend,
        [dy_TD, gates_TK, order_N],
        [("ValT", ys_ND.dtype)] + tmpl,
        N * D,
        (N, D),
        ys_ND.dtype,
    )
    dgates_TK = _launch(
        "combine_grad_gates",
        backend,
        [dy_TD, ys_ND, pos_TK],
        [("GateT", gates_TK.dtype)] + tmpl,
        T * K,
        (T, K),
        gates_TK.dtype,
    )
    return dys_ND, dgates_TK


# The custom functions take both index arrays so that every gradient stays a gather. Indices
# are not differentiable: their cotangents are zeros of their own shape and dtype.


@mx.custom_function
def _gather_rows_op(x_TD, order_N, pos_TK):
    return _gather_rows_forward(x_TD, order_N, pos_TK.shape[1])


@_gather_rows_op.vjp
def _gather_rows_vjp(primals, dxs_ND, xs_ND):
    x_TD, order_N, pos_TK = primals
    dx_TD = _gather_rows_backward(dxs_ND, pos_TK, x_TD.dtype)
    return dx_TD, mx.zeros_like(order_N), mx.zeros_like(pos_TK)


@mx.custom_function
def _combine_op(ys_ND, pos_TK, gates_TK, order_N):
    return _combine_forward(ys_ND, pos_TK, gates_TK)


@_combine_op.vjp
def _combine_vjp(primals, dy_TD, y_TD):
    ys_ND, pos_TK, gates_TK, order_N = primals
    dys_ND, dgates_TK = _combine_backward(dy_TD, ys_ND, pos_TK, gates_TK, order_N)
    return dys_ND, mx.zeros_like(pos_TK), dgates_TK, mx.zeros_like(order_N)


# --------------------------------------------------------------------------- public ops


def _as_index(a: mx.array) -> mx.array:
    return mx.stop_gradient(a.astype(mx.uint32))


def _inverse_permutation(perm_N: mx.array) -> mx.array:
    # argsort of a permutation is its inverse; O(N log N) but only paid when the caller has
    # not kept both halves of the plan.
    return mx.argsort(perm_N).astype(mx.uint32)


def gather_rows(x_TD, order_N, top_k, pos_TK=None) -> mx.array:
    """xs (N, D) with xs[p] = x[order[p] // top_k]; a kernel where one can run.

    `pos_TK` (T, K), the inverse of `order`, is what the backward gather needs; pass it when the
    dispatch plan has it, otherwise it is computed here with an argsort.
    """
    if x_TD.ndim != 2 or order_N.ndim != 1 or top_k < 1:
        raise ValueError("gather_rows expects x (T, D), order (N,) and top_k >= 1")
    T = x_TD.shape[0]
    if order_N.shape[0] != T * top_k:
        raise ValueError(f"order has {order_N.shape[0]} rows, expected T*K = {T}*{top_k}")
    order_N = _as_index(order_N)
    if pos_TK is None:
        pos_TK = _inverse_permutation(order_N).reshape(T, top_k)
    elif tuple(pos_TK.shape) != (T, top_k):
        raise ValueError(f"pos has shape {tuple(pos_TK.shape)}, expected ({T}, {top_k})")
    return _gather_rows_op(x_TD, order_N, _as_index(pos_TK))


def combine(ys_ND, pos_TK, gates_TK, order_N=None) -> mx.array:
    """y (T, D) with y[t] = sum_k gates[t, k] * ys[pos[t, k]], in ys's dtype; a kernel where
    one can run.

    `order_N` (N,), the inverse of `pos`, is what the backward gather for ys needs; pass it
    when the dispatch plan has it, otherwise it is computed here with an argsort.
    """
    if ys_ND.ndim != 2 or pos_TK.ndim != 2 or tuple(gates_TK.shape) != tuple(pos_TK.shape):
        raise ValueError("combine expects ys (N, D), pos (T, K) and gates (T, K)")
    T, K = pos_TK.shape
    if ys_ND.shape[0] != T * K:
        raise ValueError(f"ys has {ys_ND.shape[0]} rows, expected T*K = {T}*{K}")
    pos_TK = _as_index(pos_TK)
    if order_N is None:
        order_N = _inverse_permutation(pos_TK.reshape(-1))
    elif tuple(order_N.shape) != (T * K,):
        raise ValueError(f"order has shape {tuple(order_N.shape)}, expected ({T * K},)")
    return _combine_op(ys_ND, pos_TK, gates_TK, _as_index(order_N))
