"""Run under `mlx.launch -n N`: one MoE layer with its experts split over the ranks against the
same layer whole in one process (every rank builds both from the same seed). Each rank takes its
rows of one batch; the loss is sum(y * w) over the whole batch. For each case DISPATCH:E:SHARED,
writes the largest difference of the output rows, the input gradient, each rank's expert
gradients (against their rows of the whole layer's) and the replicated weights' (the ranks' sum
against the whole layer's) to OUT/rank-R-CASE.json."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from tinymoe.nn.expert_parallel import ShardedExperts
from tinymoe.nn.moe import MoELayer


def main(out: Path, dispatch: str, experts: int, shared: int) -> None:
    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    mx.random.seed(7)
    layer = MoELayer(16, experts, 2, 24, shared_experts=shared)
    layer.dispatch = dispatch
    x_TD, w_TD = mx.random.normal((12, 16)), mx.random.normal((12, 16))  # the whole batch

    def loss(x, w):
        y, _ = layer(x)
        return mx.sum(y * w), y

    whole = nn.value_and_grad(layer, lambda x, w: loss(x, w)[0])
    _, g_whole = whole(x_TD, w_TD)
    dx_whole = mx.grad(lambda x: loss(x, w_TD)[0])(x_TD)
    y_whole = loss(x_TD, w_TD)[1]
    rows = slice(rank * 12 // size, (rank + 1) * 12 // size)
    layer.experts = ShardedExperts(layer.experts, group)
    local = layer.experts.local
    _, g_split = whole(x_TD[rows], w_TD[rows])
    dx_split = mx.grad(lambda x: loss(x, w_TD[rows])[0])(x_TD[rows])
    y_split = loss(x_TD[rows], w_TD[rows])[1]
    ref, got = dict(tree_flatten(g_whole)), dict(tree_flatten(g_split))
    errors = {"y": float(mx.max(mx.abs(y_split - y_whole[rows]))),
              "dx": float(mx.max(mx.abs(dx_split - dx_whole[rows]))),
              "y_scale": float(mx.max(mx.abs(y_whole))), "names": sorted(got)}
    for name, g in got.items():
        if ".experts." in f".{name}":  # this rank's rows of the whole layer's gradient, no exchange
            expected = ref[name][rank * local:(rank + 1) * local]
        else:  # a replicated weight: each rank's share of the gradient adds up to the whole
            g, expected = mx.distributed.all_sum(g, group=group), ref[name]
        errors[name] = float(mx.max(mx.abs(g - expected)))
    (out / f"rank-{rank}-{dispatch}-{experts}-{shared}.json").write_text(json.dumps(errors))


if __name__ == "__main__":
    for case in sys.argv[2:]:
        dispatch, experts, shared = case.split(":")
        main(Path(sys.argv[1]), dispatch, int(experts), int(shared))
