"""Selective expert loading: a model that holds only one domain's experts, read from the memory map.

`open_domain_model` opens a checkpoint of a run with domain experts the way offloading does
(tinymoe.io.mmap_experts: non-expert weights read and hashed, experts mapped, none read), so the
secretary can choose the domain from the non-expert weights alone (`sample --domain auto`).
`load_domain_experts` then copies domain D's experts out of the map, each verified against its
own digest, stacks them in increasing id order as each MoE layer's experts, and fixes every layer
to D's routing (tinymoe.nn.domain.set_domain) with the expert ids renumbered into that stack
(`MoELayer.expert_slots`).

Why the output equals the fully loaded model routed with `--domain D`: the router is the same
full router with the same mask, so every token picks the same ids with the same gates; the
renumbering keeps the experts' order, so the dispatch groups the same tokens in the same order,
and each expert computes on the same bytes. tests/test_domains_loading.py checks it token for token.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from tinymoe.domains import experts_of, read_record
from tinymoe.errors import TinyMoeError
from tinymoe.nn.domain import set_domain


def open_domain_model(path, dispatch: str = "auto", verify_hashes: bool = True):
    """(model without experts, mapped experts, manifest, tokenizer, ckpt) of a domain run."""
    from tinymoe.io.mmap_experts import open_mapped

    model, mapped, manifest, tokenizer, ckpt = open_mapped(path, dispatch, verify_hashes)
    if read_record(manifest) is None:
        raise TinyMoeError(f"{ckpt}: this run has no domain experts (train with --domain-experts); "
                           f"--load-domain-experts-only needs them")
    if "quantization" in manifest:
        raise TinyMoeError("--load-domain-experts-only reads float checkpoints (this one is quantized)")
    if model.cfg.eval_capacity_factor > 0:
        raise TinyMoeError("--load-domain-experts-only needs routing without an eval capacity "
                           "(it depends on the number of experts a layer holds)")
    return model, mapped, manifest, tokenizer, ckpt


def load_domain_experts(model, mapped, manifest: dict, domain: str) -> dict:
    """Load domain `domain`'s experts into `model` (see the module docstring); returns what was
    read: {"domain", "experts", "expert_bytes_read", "expert_bytes_total", "weight_bytes"}."""
    record = read_record(manifest)
    ids = experts_of(record, domain)
    slots_E = np.zeros(model.cfg.moe_experts, dtype=np.int32)
    slots_E[ids] = np.arange(len(ids), dtype=np.int32)  # others are never chosen: the mask excludes them
    read = total = 0
    for i in model.moe_layers():
        moe = model.blocks[i].moe
        prefix = f"blocks.{i}.moe.experts."
        for name in [n for n in mapped.names() if n.startswith(prefix)]:
            view = mapped.views[name]
            total += view.nbytes
            stack = mx.stack([mapped.expert(name, e) for e in ids])  # (E_D, out, in)
            read += sum(view[e].nbytes for e in ids)
            setattr(moe.experts, name[len(prefix):], stack)
        moe.expert_slots = slots_E
    set_domain(model, domain)
    mx.eval(model.parameters())
    return {"domain": domain, "experts": list(ids), "expert_bytes_read": int(read),
            "expert_bytes_total": int(total), "weight_bytes": parameter_bytes(model),
            "secretary_bytes": parameter_bytes(model, "secretary.")}


def parameter_bytes(model, only: str | None = None) -> int:
    """Bytes of the weights the model holds (what stays resident for sampling): the language
    model's (everything but the secretary), or those whose names start with `only`."""
    return int(sum(a.nbytes for n, a in tree_flatten(model.parameters())
                   if (n.startswith(only) if only else not n.startswith("secretary."))))


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux /proc; None elsewhere)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None
