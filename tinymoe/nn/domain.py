"""Domain routing on a model: per-token expert masks from domain ids, a fixed sampling domain, and
the secretary that predicts a text's domain.

Shapes: B batch, L sequence, P secretary prefix, T = B*L tokens, E experts, N data domains, C
mapped domains (the secretary's classes, in the mapping's order).

A run's domain record (tinymoe.domains.describe, stored in its manifest) is attached to a model
with `attach_domains`: the model then turns each token's data domain id into (allowed (T, E),
mapped (T,)) (`DomainRouting.token_masks`), which the MoE layers use to mask routing (hard mode)
and to compute the supervision loss (tinymoe.nn.moe.domain_loss). `set_domain` fixes every layer
to one domain's experts for sampling.

The secretary is a linear classifier on the running mean of the first block's post-attention
residual over a text's first P tokens. That vector does not depend on routing (it is computed
before the first FFN), so the secretary can choose the domain *before* any MoE layer runs, and
from the non-expert weights alone (which is what selective loading needs). It is trained on every
prefix length 1..P at once (running means), so a short prompt is as much in-distribution as a long
one. Its input is wrapped in stop_gradient: it reads the trunk but never shapes it, so the LM
loss of a run with a secretary is the LM loss of the same run without one.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np


# The secretary's cross entropy enters the training loss times this. Adam's update of the
# secretary's own weights does not depend on the scale of its loss, but the global gradient-norm
# clip does: at full scale its gradient would shrink every other weight's step whenever it
# dominates the norm. (Its input is stop-gradient: no other weight gets its gradient at all.)
SECRETARY_LOSS_SCALE = 1e-3


class DomainRouting:
    """A run's mapping as arrays over the data's domain ids (plus one all-allowed row for ids past
    the table, e.g. a domain unseen in training)."""

    def __init__(self, record: dict, num_experts: int):
        names = list(record["data_domains"])
        self.classes = list(record["experts"])  # the secretary's classes
        self.hard = record["mode"] == "hard"
        self.allowed_NE = np.ones((len(names) + 1, num_experts), dtype=bool)
        self.mapped_N = np.zeros(len(names) + 1, dtype=np.float32)
        self.class_of_N = np.full(len(names) + 1, -1, dtype=np.int32)
        for c, (name, ids) in enumerate(record["experts"].items()):
            if name in names:
                d = names.index(name)
                self.allowed_NE[d] = False
                self.allowed_NE[d, ids] = True
                self.mapped_N[d], self.class_of_N[d] = 1.0, c
        self.experts = {name: list(ids) for name, ids in record["experts"].items()}

    def clip(self, domains):
        """Ids beyond the table (and negative ones) read the last, all-allowed row."""
        n = self.mapped_N.shape[0] - 1
        return mx.where((domains >= 0) & (domains < n), domains, n)

    def token_masks(self, domains_BL) -> tuple[mx.array, mx.array]:
        """(allowed (T, E) bool, mapped (T,) float32) of every token."""
        ids_T = self.clip(mx.array(domains_BL).reshape(-1).astype(mx.int32))
        return mx.array(self.allowed_NE)[ids_T], mx.array(self.mapped_N)[ids_T]

    def allowed_E(self, name: str) -> np.ndarray:
        mask = np.zeros(self.allowed_NE.shape[1], dtype=bool)
        mask[self.experts[name]] = True
        return mask


class Secretary(nn.Module):
    """Domain logits from a pooled hidden state: one linear layer (C, D) with a bias."""

    def __init__(self, d_model: int, num_classes: int):
        super().__init__()
        self.proj = nn.Linear(d_model, num_classes)

    def __call__(self, pooled_D):
        # The input has unit RMS (prefix_features), so |pooled| = sqrt(D): scaling the logits by
        # sqrt(D) lets a weight step of the optimizer's size (~lr) move a logit by ~lr * D, and the
        # secretary is decisive after tens of steps rather than thousands.
        return self.proj(pooled_D.astype(mx.float32)) * math.sqrt(pooled_D.shape[-1])


def attach_domains(model, record: dict) -> None:
    """Give `model` the run's domain routing (and an untrained secretary when the run has one, so
    its weights can be loaded or trained)."""
    model.domain_routing = DomainRouting(record, model.cfg.moe_experts)
    for block in model.blocks:
        if block.is_moe:
            block.moe.domain_hard = model.domain_routing.hard
    if record.get("secretary"):
        model.secretary = Secretary(model.cfg.d_model, len(model.domain_routing.classes))
    model.secretary_prefix = int(record.get("secretary_prefix_tokens", 32))


def set_domain(model, name: str | None) -> None:
    """Route every token within domain `name`'s experts (None: back to the run's own routing)."""
    allowed = None if name is None else model.domain_routing.allowed_E(name)
    for block in model.blocks:
        if block.is_moe:
            block.moe.domain_allowed = allowed


def prefix_features(model, tokens_BP) -> mx.array:
    """Running means of the first block's post-attention residual over each prefix, scaled to unit
    RMS, stop-gradient. # (B, P, D)"""
    first = model.blocks[0]
    x = model.embed(tokens_BP)
    h = x + first.attn(first.attn_norm(x))  # causal: position p sees tokens 0..p only
    counts = mx.arange(1, tokens_BP.shape[1] + 1, dtype=mx.float32)[None, :, None]
    pooled = mx.cumsum(h.astype(mx.float32), axis=1) / counts
    # Unit RMS: the classifier sees the direction of the pooled state, not the residual stream's
    # scale (small at initialisation, growing in training), so it learns at the trunk's rate.
    return mx.stop_gradient(mx.fast.rms_norm(pooled, None, 1e-6))


def secretary_terms(model, tokens_BL, domains_BL) -> tuple[mx.array, mx.array, mx.array]:
    """(loss, correct rows, labelled rows) of the secretary on a batch: each row's label is the
    class of its first token's domain; rows whose prefix mixes domains, or whose domain has no
    mapping, are left out. The loss averages cross entropy over every prefix length; accuracy is
    at the full prefix."""
    routing = model.domain_routing
    P = min(model.secretary_prefix, tokens_BL.shape[1])
    domains = routing.clip(mx.array(domains_BL)[:, :P].astype(mx.int32))  # (B, P)
    labels_B = mx.array(routing.class_of_N)[domains[:, 0]]
    valid_B = ((labels_B >= 0) & mx.all(domains == domains[:, :1], axis=1)).astype(mx.float32)
    logits_BPC = model.secretary(prefix_features(model, tokens_BL[:, :P]))
    safe_B = mx.maximum(labels_B, 0)
    ce_BP = nn.losses.cross_entropy(logits_BPC, mx.broadcast_to(safe_B[:, None], logits_BPC.shape[:2]),
                                    reduction="none")
    n = mx.sum(valid_B)
    loss = mx.sum(mx.mean(ce_BP, axis=1) * valid_B) / mx.maximum(n, 1.0)
    correct = mx.sum((mx.argmax(logits_BPC[:, -1], axis=-1) == safe_B).astype(mx.float32) * valid_B)
    return loss, mx.stop_gradient(correct), mx.stop_gradient(n)


def predict_domain(model, token_ids: list[int]) -> tuple[str, float]:
    """The secretary's domain for a text (its first P tokens) and that domain's probability."""
    P = min(model.secretary_prefix, len(token_ids))
    tokens = mx.array([token_ids[:P]], dtype=mx.int32)
    probs = mx.softmax(model.secretary(prefix_features(model, tokens)[:, -1]), axis=-1)[0]
    c = int(mx.argmax(probs).item())
    return model.domain_routing.classes[c], float(probs[c].item())
