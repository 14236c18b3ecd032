"""Quantized weights and the matmuls that read them: stacked experts, linear layers, embeddings.

MLX affine quantization (`mx.quantize`) splits every row of a weight (out, in) into groups of
`group_size` consecutive inputs; each group keeps a scale and a bias (float, the weight's dtype)
and each weight becomes a `bits`-bit integer q with w ~ scale * q + bias, packed 32/bits to a
uint32. A stacked expert tensor (E, out, in) quantizes row by row too, so expert e's packed
weights, scales and biases are exactly the slices [e] of three tensors: one expert stays one
contiguous range of each (read, mapped and offloaded alone), as in float.

Which matmul is fastest depends on the device (docs/performance.md, measured): on a GPU the
quantized kernels (`mx.quantized_matmul`, `mx.gather_qmm`) read the packed bytes directly. MLX's
CPU backend runs them one row at a time, 10-25x slower than a float matmul at 16 or more rows
but faster than dequantizing at one or two. So on the CPU a product with few rows (decoding)
uses the quantized kernel and one with more rows (prefill) dequantizes the weight and runs an
ordinary BLAS matmul; the dequantized product is the dequantized float model's exactly.

Shapes: E experts, H expert hidden width, D model width, n rows.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

BITS = (4, 8)  # what `tinymoe quantize` offers; MLX's affine mode packs these without waste
GROUP_SIZES = (32, 64, 128)
MODE = "affine"
# On the CPU, products with more rows than this dequantize the weight first (measured above).
CPU_QMM_MAX_ROWS = 2
PROJECTIONS = ("w_gate", "w_up", "w_down")
SCALES, BIASES = "_scales", "_biases"  # suffixes of the stacked experts' extra tensors


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


class QWeight(NamedTuple):
    """One stacked, quantized expert projection: (E, out, in * bits / 32) packed uint32 and
    (E, out, in / group_size) scales and biases."""

    packed: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    @property
    def num_experts(self) -> int:
        return self.packed.shape[0]

    def dequantize(self) -> mx.array:
        """The float (E, out, in) weights these stand for."""
        return mx.dequantize(self.packed, self.scales, self.biases, self.group_size, self.bits, mode=MODE)

    def expert(self, e: int) -> mx.array:
        return mx.dequantize(self.packed[e], self.scales[e], self.biases[e], self.group_size, self.bits, mode=MODE)


def num_experts(w) -> int:
    return w.num_experts if isinstance(w, QWeight) else w.shape[0]


def as_float(w) -> mx.array:
    return w.dequantize() if isinstance(w, QWeight) else w


def expert_matmul(x_nD: mx.array, w, e: int) -> mx.array:
    """x @ w[e].T for one expert's rows, float or quantized (the faster kernel for the shape)."""
    if not isinstance(w, QWeight):
        return x_nD @ w[e].T
    if on_cpu() and x_nD.shape[0] > CPU_QMM_MAX_ROWS:
        return x_nD @ w.expert(e).T
    return mx.quantized_matmul(x_nD, w.packed[e], w.scales[e], w.biases[e], transpose=True,
                               group_size=w.group_size, bits=w.bits, mode=MODE)


def gathered_matmul(x_N1D: mx.array, w, expert_ids: mx.array, sorted_ids: bool, rows=None) -> mx.array:
    """Row n times expert expert_ids[n]'s weight, transposed: `gather_mm`, or `gather_qmm` on
    packed weights. `rows`, if given, picks the row of x (its batch dimensions flattened) for
    each entry of expert_ids instead of broadcasting x against them."""
    if isinstance(w, QWeight):
        return mx.gather_qmm(x_N1D, w.packed, w.scales, w.biases, lhs_indices=rows, rhs_indices=expert_ids,
                             transpose=True, group_size=w.group_size, bits=w.bits, mode=MODE,
                             sorted_indices=sorted_ids)
    return mx.gather_mm(x_N1D, w.swapaxes(-1, -2), lhs_indices=rows, rhs_indices=expert_ids,
                        sorted_indices=sorted_ids)


class QuantizedSwiGLUExperts(nn.Module):
    """The stacked experts of tinymoe.nn.moe.SwiGLUExperts, quantized: per projection the packed
    weights (`w_up`), `w_up_scales` and `w_up_biases`, each with the experts on the first axis."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, group_size: int, bits: int,
                 dtype=mx.float32):
        super().__init__()
        self.group_size, self.bits = group_size, bits
        for name, (out_dim, in_dim) in (("w_gate", (d_hidden, d_model)), ("w_up", (d_hidden, d_model)),
                                        ("w_down", (d_model, d_hidden))):
            # Placeholders with the packed shapes (lazy zeros: free until a checkpoint fills them).
            setattr(self, name, mx.zeros((num_experts, out_dim, in_dim * bits // 32), mx.uint32))
            setattr(self, name + SCALES, mx.zeros((num_experts, out_dim, in_dim // group_size), dtype))
            setattr(self, name + BIASES, mx.zeros((num_experts, out_dim, in_dim // group_size), dtype))
        self.freeze()  # inference only: nothing here has a gradient

    @classmethod
    def from_float(cls, experts, group_size: int, bits: int) -> "QuantizedSwiGLUExperts":
        E, H, D = experts.w_gate.shape
        q = cls(E, D, H, group_size, bits, experts.w_gate.dtype)
        for name in PROJECTIONS:
            packed, scales, biases = mx.quantize(getattr(experts, name), group_size, bits, mode=MODE)
            setattr(q, name, packed)
            setattr(q, name + SCALES, scales)
            setattr(q, name + BIASES, biases)
        return q

    @property
    def num_experts(self) -> int:
        return self.w_gate.shape[0]

    def weights(self) -> tuple[QWeight, QWeight, QWeight]:
        return tuple(QWeight(getattr(self, n), getattr(self, n + SCALES), getattr(self, n + BIASES),
                             self.group_size, self.bits) for n in PROJECTIONS)

    def float_weights(self) -> tuple[mx.array, mx.array, mx.array]:
        return tuple(w.dequantize() for w in self.weights())

    def params_per_expert(self) -> int:
        """Weights one expert stands for (as in float), not the packed words that hold them."""
        return sum(getattr(self, n + SCALES)[0].size * self.group_size for n in PROJECTIONS)


class QLinear(nn.QuantizedLinear):
    """MLX's quantized linear layer, dequantizing first for many rows on the CPU (see above)."""

    def __call__(self, x):
        if on_cpu() and x.size // x.shape[-1] > CPU_QMM_MAX_ROWS:
            w = mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits, mode=MODE)
            y = x @ w.T
            return y + self.bias if "bias" in self else y
        return super().__call__(x)


class QEmbedding(nn.QuantizedEmbedding):
    """MLX's quantized embedding; `as_linear` (tied output head) follows QLinear's rule."""

    def as_linear(self, x):
        if on_cpu() and x.size // x.shape[-1] > CPU_QMM_MAX_ROWS:
            w = mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits, mode=MODE)
            return x @ w.T
        return super().as_linear(x)
