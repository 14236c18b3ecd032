"""Expert offloading for sampling: at most N experts per MoE layer in memory, LRU, from a map.

`load_model_offloaded` opens a checkpoint with its experts memory-mapped (tinymoe.io.mmap_experts)
and replaces each MoE layer's router with `OffloadRouter`. That wrapper runs the real router,
reads the chosen expert ids on the host, makes sure those experts are in the layer's
`ExpertCache` (copying a missing one out of the mapped file), stacks them in increasing id order
into the layer's expert weights and hands the MoE layer indices renumbered into that stack. The
layer then runs its usual dispatch backend on the small stack.

Why the results are identical to the fully loaded model: the renumbering keeps the experts'
order, so the dispatch plan (tokens sorted by expert) groups exactly the same tokens in the same
order, and every expert computes on the same bytes. tests/test_memory.py checks the
tokens. The router losses are computed inside the real router from the real ids.

Quantized experts are served the same way: an expert is the slice [e] of its packed weights,
scales and biases (all tensors named `<layer>.moe.experts.*`), copied out of the map together.

Refused for expert-choice routing and for an eval-mode expert capacity: both depend on the
number of experts in the layer, which the renumbered stack changes.

A forward that needs more distinct experts in one layer than the cache holds (a long prompt)
loads them all for that call and evicts down to N afterwards: N bounds the memory between
calls, not within a prefill. Hit rate counts, per layer and call, each distinct expert needed.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from tinymoe.errors import TinyMoeError

class ExpertCache:
    """Least-recently-used experts of one MoE layer: id -> its slice of every expert tensor
    (w_gate, w_up, w_down; for quantized experts also their scales and biases)."""

    def __init__(self, mapped, prefix: str, capacity: int):
        self.mapped, self.prefix, self.capacity = mapped, prefix, capacity
        self.resident: OrderedDict[int, tuple] = OrderedDict()
        self.hits = self.misses = 0
        self.num_experts = mapped.num_experts(f"{prefix}.w_gate")
        # Attribute names on the experts module, in the file's order.
        self.tensors = [n[len(prefix) + 1:] for n in mapped.names() if n.startswith(prefix + ".")]

    def stack(self, ids: list[int]) -> dict:
        """Attribute name -> stacked (len(ids), ...) tensor of experts `ids` (sorted), loading
        missing ones."""
        for e in ids:
            if e in self.resident:
                self.hits += 1
                self.resident.move_to_end(e)
            else:
                self.misses += 1
                weights = tuple(self.mapped.expert(f"{self.prefix}.{t}", e) for t in self.tensors)
                mx.eval(weights)
                self.resident[e] = weights
        stacked = {t: mx.stack([self.resident[e][i] for e in ids]) for i, t in enumerate(self.tensors)}
        while len(self.resident) > self.capacity:  # the stack above keeps this call's experts alive
            self.resident.popitem(last=False)
        return stacked


class OffloadRouter(nn.Module):
    """Wraps a layer's router: routes as before, then loads the chosen experts on demand."""

    def __init__(self, router, experts, cache: ExpertCache):
        super().__init__()
        self.inner = router
        # Plain attributes, not child modules: the experts module is already in the tree.
        object.__setattr__(self, "_experts", experts)
        object.__setattr__(self, "_cache", cache)

    def __call__(self, x, lean: bool = False):
        out = self.inner(x, lean=lean)
        indices = out.indices
        ids = sorted(set(np.array(indices).reshape(-1).tolist()))  # host sync: loading is data-dependent
        for name, stacked in self._cache.stack(ids).items():
            setattr(self._experts, name, stacked)
        table = np.zeros(self._cache.num_experts, dtype=np.uint32)
        table[ids] = np.arange(len(ids), dtype=np.uint32)  # monotonic: keeps the experts' order
        renumbered = mx.array(table)[indices].astype(indices.dtype)
        return dataclasses.replace(out, indices=renumbered)


def load_model_offloaded(path, resident_experts: int, dispatch: str = "auto", verify_hashes: bool = True):
    """(model, manifest, tokenizer, ckpt, caches) with at most `resident_experts` experts per
    MoE layer resident between forward calls; caches: block index -> ExpertCache.

    Opened by the checkpoint reader like every load (tinymoe.io.reader): with verify_hashes
    every file but experts.safetensors is hashed now, and each expert is checked against its
    own digest the first time it is copied out of the map."""
    from tinymoe.io.mmap_experts import open_mapped

    if resident_experts < 1:
        raise TinyMoeError(f"--resident-experts must be at least 1, got {resident_experts}")
    model, mapped, manifest, tokenizer, ckpt = open_mapped(path, dispatch, verify_hashes)
    cfg = model.cfg
    # Both size their work by the number of experts the layer holds, which offloading changes.
    if getattr(cfg, "router", "topk") == "expert-choice" or getattr(cfg, "eval_capacity_factor", 0.0) > 0:
        raise TinyMoeError("--resident-experts needs token-choice routing without an eval capacity "
                           "(this checkpoint uses expert choice or eval_capacity_factor)")
    caches = {}
    for i in model.moe_layers():
        moe = model.blocks[i].moe
        prefix = f"blocks.{i}.moe.experts"
        cache = ExpertCache(mapped, prefix, resident_experts)
        # Drop the lazy initialisers so nothing can ever evaluate a full-size expert stack.
        for name in cache.tensors:
            setattr(moe.experts, name, mx.zeros((0,)))
        moe.router = OffloadRouter(moe.router, moe.experts, cache)
        caches[i] = cache
    return model, manifest, tokenizer, ckpt, caches


def cache_stats(caches: dict) -> dict:
    hits = sum(c.hits for c in caches.values())
    misses = sum(c.misses for c in caches.values())
    lookups = hits + misses
    return {"hits": hits, "misses": misses, "hit_rate": round(hits / lookups, 4) if lookups else None,
            "resident_per_layer_max": max((len(c.resident) for c in caches.values()), default=0)}
