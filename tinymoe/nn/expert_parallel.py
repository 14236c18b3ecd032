"""Expert parallelism: each rank of a group holds E/N experts of every MoE layer.

Shapes: T this rank's tokens, N ranks, D model width, K slots per token, E experts (all ranks),
S the slots (token, k) that chose one of this rank's experts.

MLX 0.32 has no all-to-all, its ring backend refuses sum_scatter, and send/recv have no
gradient (all measured), so tokens travel by all_gather and all_sum (the layer's routing stays
on each rank):
  1. all_gather the tokens x (T, D), their expert ids and gates: every rank sees the group's
     N*T tokens and keeps the S slots that chose its experts (picked on the host, so only those
     are computed: S is about N*T*K/N = T*K, one rank's share of the expert work);
  2. its experts run on those slots (any dispatch backend) and their outputs are added into
     (N*T, D) rows, zero where another rank's experts answer;
  3. all_sum of those partial rows gives every token its full output; each rank keeps its own T.
MLX differentiates all_gather and all_sum rank-locally (all_sum's gradient is the cotangent
itself, all_gather's the own slice of it: measured), which is not the gradient of the group's
loss. The two exchanges therefore carry their own VJPs: the gradient of a gathered input is the
all_sum of every rank's cotangent (each rank used those rows), and the gradient of a partial
output is the all_gather of every rank's output cotangent (each rank's rows got a share from
it). An expert's weight gradient so collects the whole group's loss; a dense weight's the own
rank's, as in data parallel (tinymoe.train.distributed averages each accordingly).

Traffic per MoE layer and micro-batch, forward: all_gather of (N*T, D) activations + all_sum of
(N*T, D) outputs; backward the same two in reverse. docs/distributed.md puts numbers on it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from tinymoe.errors import TinyMoeError
from tinymoe.nn.dispatch import run_experts
from tinymoe.nn.moe import SwiGLUExperts


def gather_rows(x: mx.array, group) -> mx.array:
    """(N*T, ...) = every rank's x (T, ...) in rank order; gradient: the all_sum of the
    cotangents' own rows (every rank's loss used these rows)."""
    rank = group.rank()

    @mx.custom_function
    def gather(x):
        return mx.distributed.all_gather(x, group=group)

    @gather.vjp
    def gather_vjp(x, cotangent, output):  # one input: MLX hands the arrays themselves, not tuples
        rows = x.shape[0]
        return mx.distributed.all_sum(cotangent, group=group)[rank * rows:(rank + 1) * rows]

    return gather(x)


def sum_own_rows(partial: mx.array, group) -> mx.array:
    """This rank's T rows of the all_sum of every rank's partial (N*T, D); gradient: the
    all_gather of every rank's cotangent (each rank's partial fed every rank's rows)."""
    rank, size = group.rank(), group.size()

    @mx.custom_function
    def own(p):
        rows = p.shape[0] // size
        return mx.distributed.all_sum(p, group=group)[rank * rows:(rank + 1) * rows]

    @own.vjp
    def own_vjp(p, cotangent, output):
        return mx.distributed.all_gather(cotangent, group=group)

    return own(partial)


class ShardedExperts(SwiGLUExperts):
    """Rows [rank * E/N, (rank + 1) * E/N) of a layer's experts, standing in for them: the layer
    still sees E experts (its router, capacity and load statistics are unchanged) and calls
    `run_experts`, which sends the tokens to the ranks that hold their experts and back. The
    weights keep their names, so a gathered checkpoint is the single-process one."""

    def __init__(self, full: SwiGLUExperts, group):
        nn.Module.__init__(self)
        rank, size = group.rank(), group.size()
        total = full.num_experts
        if total % size:
            raise TinyMoeError(f"{total} experts do not split over {size} ranks (--expert-parallel needs a divisor "
                               f"of the expert count)")
        local = total // size
        self.first = rank * local
        self.w_gate, self.w_up, self.w_down = (w[self.first:self.first + local]
                                               for w in (full.w_gate, full.w_up, full.w_down))
        self.total, self.local = total, local
        self._group = group

    @property
    def num_experts(self) -> int:
        return self.total

    def float_weights(self) -> tuple:
        raise TinyMoeError("expert-choice routing does not run expert-parallel (each expert picks from the whole "
                           "batch); use a token-choice router or data parallel")

    def run_experts(self, backend: str, x_TD, indices_TK, gates_TK, w_gate, w_up, w_down) -> mx.array:
        """y (T, D): every token's output from the experts of whichever rank holds them."""
        group, first, local = self._group, self.first, self.local
        x_all = gather_rows(x_TD, group)  # (N*T, D)
        gates_all = gather_rows(gates_TK, group)  # (N*T, K)
        ids_all = np.array(mx.distributed.all_gather(mx.stop_gradient(indices_TK), group=group))  # (N*T, K)
        tok_S, slot_S = np.nonzero((ids_all >= first) & (ids_all < first + local))  # this rank's slots
        partial = mx.zeros((x_all.shape[0], x_TD.shape[1]), dtype=x_TD.dtype)  # (N*T, D)
        if tok_S.size:
            tok = mx.array(tok_S.astype(np.int32))
            ids_S1 = mx.array((ids_all[tok_S, slot_S] - first).astype(np.int32))[:, None]  # (S, 1) local rows
            gates_S1 = gates_all[tok, mx.array(slot_S.astype(np.int32))][:, None]  # (S, 1)
            y_SD = run_experts(backend, x_all[tok], ids_S1, gates_S1, w_gate, w_up, w_down)  # (S, D)
            partial = partial.at[tok].add(y_SD)
        return sum_own_rows(partial, group)  # (T, D)


def shard_model(model, group) -> None:
    """Every MoE layer of `model` keeps this rank's E/N experts (the others are dropped)."""
    for i in model.moe_layers():
        layer = model.blocks[i].moe
        layer.experts = ShardedExperts(layer.experts, group)


def is_sharded(name: str) -> bool:
    """Whether a weight (or its optimizer state) is held in E/N rows per rank."""
    return ".moe.experts." in f".{name}"
