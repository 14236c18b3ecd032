"""Domain experts in a training run: the run's domain record, its validation, the secretary's accuracy.

The trainer calls `attach_run_domains` once its data is read (the mapping's names are checked
against the data's domains there), hands the sampler the per-token domain ids, and validates with
`validate_domains`: the validation loss with each token's domain (hard mode routes within it, as
in training) and the secretary's accuracy on the validation split's windows."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from tinymoe.data.batches import eval_batches
from tinymoe.domains import check_domain_names, describe, parse_domain_experts
from tinymoe.errors import TinyMoeError
from tinymoe.nn.domain import attach_domains, secretary_terms, set_domain
from tinymoe.train.evaluate import evaluate


def attach_run_domains(model, train, data, stages) -> dict | None:
    """The run's domain record (tinymoe.domains.describe), attached to `model`; None without
    --domain-experts."""
    if not train.domain_experts:
        return None
    if stages is not None:
        raise TinyMoeError("--domain-experts does not combine with --stages")
    check_domain_names(parse_domain_experts(train.domain_experts, model.cfg.moe_experts), data.domain_names)
    record = describe(train, model.cfg.moe_experts, data.domain_names)
    attach_domains(model, record)
    return record


def secretary_accuracy(model, tokens: np.ndarray, domain_ids: np.ndarray, batch_size: int, context: int,
                       max_batches: int | None = None) -> float | None:
    """Share of validation windows (with one mapped domain over the secretary's prefix) whose domain
    the secretary names; None when no window qualifies."""
    correct = labelled = 0.0
    windows = zip(eval_batches(tokens, batch_size, context, max_batches),
                  eval_batches(domain_ids, batch_size, context, max_batches))
    for (inputs, _), (domains, _) in windows:
        _, right, n = secretary_terms(model, mx.array(inputs), mx.array(domains))
        correct, labelled = correct + right.item(), labelled + n.item()
    return correct / labelled if labelled else None


def validate_domains(model, data, train, context: int, max_batches: int | None, record: dict) -> dict:
    """The trainer's validation for a run with domain experts (see the module docstring)."""
    mask = data.val_mask if train.loss_on == "target" else None
    result = evaluate(model, data.val_tokens, data.tokenizer.token_byte_lengths(), train.batch_size, context,
                      max_batches, mask, domains=data.val_domain_ids)
    if "secretary" in model:
        accuracy = secretary_accuracy(model, data.val_tokens, data.val_domain_ids, train.batch_size, context,
                                      max_batches)
        result["secretary_accuracy"] = accuracy
        record["secretary_val_accuracy"] = accuracy
    return result


def per_domain_eval(model, held, byte_lengths: np.ndarray, batch_size: int, context: int,
                    max_batches: int | None = None, routed: bool = False, by_secretary: bool = False) -> dict:
    """{domain: evaluate(...)} over each domain's held-out tokens on their own (`held`:
    tinymoe.data.prepare.HeldOut). routed: a domain with experts is scored with every token routed
    within them, as `sample --domain D` does; by_secretary: each window within the domain the
    secretary picks (`secretary_routed_eval`); otherwise routing is free."""
    mapped = getattr(model, "domain_routing", None)
    results = {}
    for d, name in enumerate(held.domain_names):
        keep = np.asarray(held.domain_ids) == d
        if not keep.any():
            continue
        if by_secretary:
            results[name] = secretary_routed_eval(model, np.asarray(held.tokens)[keep], byte_lengths, batch_size,
                                                  context, max_batches)
            continue
        fixed = routed and mapped is not None and name in mapped.experts
        set_domain(model, name if fixed else None)
        try:
            results[name] = evaluate(model, np.asarray(held.tokens)[keep], byte_lengths, batch_size, context,
                                     max_batches)
        finally:
            set_domain(model, None)
        results[name]["routed_within"] = mapped.experts[name] if fixed else None
    return results


def secretary_routed_eval(model, tokens: np.ndarray, byte_lengths: np.ndarray, batch_size: int, context: int,
                          max_batches: int | None = None) -> dict:
    """Like `evaluate`, with each window routed within the experts of the domain the secretary
    reads off its first tokens (what `sample --domain auto` does), whatever the run's mode; also
    "secretary_picks": how many windows went to each domain."""
    import math

    import mlx.nn as nn

    from tinymoe.nn.domain import prefix_features

    routing = model.domain_routing
    to_data_id = np.array([int(np.flatnonzero(routing.class_of_N == c)[0]) if (routing.class_of_N == c).any()
                           else routing.mapped_N.size - 1 for c in range(len(routing.classes))], dtype=np.int32)
    layers = [b.moe for b in model.blocks if b.is_moe]
    hard = [m.domain_hard for m in layers]
    nats, n_tokens, n_bytes = 0.0, 0, 0
    picks = np.zeros(len(routing.classes), dtype=np.int64)
    try:
        for m in layers:
            m.domain_hard = True
        for inputs, targets in eval_batches(tokens, batch_size, context, max_batches):
            x = mx.array(inputs)
            P = min(model.secretary_prefix, x.shape[1])
            chosen = np.array(mx.argmax(model.secretary(prefix_features(model, x[:, :P])[:, -1]), axis=-1))
            picks += np.bincount(chosen, minlength=picks.size)
            domains = np.repeat(to_data_id[chosen][:, None], x.shape[1], axis=1)
            logits, _ = model(x, domains_BL=mx.array(domains))
            nats += nn.losses.cross_entropy(logits.astype(mx.float32), mx.array(targets), reduction="sum").item()
            n_tokens += targets.size
            n_bytes += int(byte_lengths[targets].sum())
    finally:
        for m, h in zip(layers, hard):
            m.domain_hard = h
    if not n_tokens:
        return {"loss": None, "bits_per_byte": None, "tokens": 0, "secretary_picks": {}}
    return {"loss": nats / n_tokens, "bits_per_byte": nats / math.log(2) / n_bytes if n_bytes else None,
            "tokens": n_tokens, "secretary_picks": dict(zip(routing.classes, picks.tolist()))}
