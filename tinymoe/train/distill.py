"""The distillation term: forward KL from a cached teacher prediction to the student, per position.

Both methods compare the student's distribution at temperature T, s = softmax(z / T), with the
teacher's at the same temperature, and multiply by T^2 (so the gradient's scale does not shrink as
T grows, as in Hinton et al.'s distillation).

- `topk`: the cache holds the teacher's K most likely ids with log-probabilities and the log of
  the mass outside them. These are K + 1 buckets: the K ids and "everything else". The teacher's
  bucket probabilities are tempered as if the rest were one outcome, q_b ∝ p_b^(1/T) (exact at
  T = 1), the student's rest bucket is its own mass outside the K ids, and the term is
  KL(q || s) over the buckets. It is exact for what it compares but blind to the shape of the
  tail: the student learns how much mass the tail gets, not where it goes.
- `sample`: the cache holds K ids drawn from the teacher, x_1..x_K ~ p. At T = 1 each draw has
  weight 1/K and sum_i (log p(x_i) - log s(x_i)) / K is an unbiased estimate of KL(p || s), whose
  gradient in the student's logits is unbiased too (the "Random Sampling KD" of Sparse Logit
  Sampling, ACL 2025). At T != 1 the target is p^(1/T) / Z and the draws are reweighted by
  self-normalised importance weights w_i ∝ p(x_i)^(1/T - 1), with log Z estimated from the same
  draws: consistent, no longer exactly unbiased.

Positions are averaged like the cross entropy: over every position, or over the target mask.
"""

from __future__ import annotations

import math

import mlx.core as mx

# Stands in for log 0 on the student's side where the K ids cover the vocabulary: finite, so no
# 0 * inf reaches a gradient.
_LOG_ZERO = -1e30


def _student_logp(logits_BLV: mx.array, temperature: float) -> mx.array:
    z = logits_BLV.astype(mx.float32) / temperature
    return z - mx.logsumexp(z, axis=-1, keepdims=True)


def kd_topk(logits_BLV, ids_BLK, logp_BLK, rest_BL, temperature: float = 1.0) -> mx.array:
    """KL(teacher buckets || student buckets) per position, (B, L)."""
    ls_BLV = _student_logp(logits_BLV, temperature)
    ls_BLK = mx.take_along_axis(ls_BLV, ids_BLK, axis=-1)
    # The student's rest bucket: its log-mass over the ids outside the K (those set to ~log 0).
    hidden = mx.put_along_axis(mx.zeros_like(ls_BLV), ids_BLK, mx.array(_LOG_ZERO, mx.float32), axis=-1)
    ls_rest_BL = mx.logsumexp(ls_BLV + hidden, axis=-1)
    t_BLB = mx.concatenate([logp_BLK, rest_BL[..., None]], axis=-1) / temperature  # (B, L, K+1)
    lq_BLB = t_BLB - mx.logsumexp(t_BLB, axis=-1, keepdims=True)
    q_BLB = mx.exp(lq_BLB)
    neg_entropy = mx.sum(mx.where(q_BLB > 0, q_BLB * lq_BLB, 0.0), axis=-1)
    ls_BLB = mx.concatenate([ls_BLK, ls_rest_BL[..., None]], axis=-1)
    cross = -mx.sum(q_BLB * ls_BLB, axis=-1)
    return (temperature ** 2) * (neg_entropy + cross)


def kd_sample(logits_BLV, ids_BLK, logp_BLK, temperature: float = 1.0) -> mx.array:
    """The importance-weighted estimate of KL(teacher^(1/T) || student) per position, (B, L)."""
    k = ids_BLK.shape[-1]
    ls_BLK = mx.take_along_axis(_student_logp(logits_BLV, temperature), ids_BLK, axis=-1)
    a_BLK = (1.0 / temperature - 1.0) * logp_BLK  # log of the unnormalised weights; 0 at T = 1
    norm_BL1 = mx.logsumexp(a_BLK, axis=-1, keepdims=True)
    w_BLK = mx.exp(a_BLK - norm_BL1)
    log_z_BL1 = norm_BL1 - math.log(k)  # log E_p[p^(1/T - 1)], estimated from the draws
    target_BLK = logp_BLK / temperature - log_z_BL1
    return (temperature ** 2) * mx.sum(w_BLK * (target_BLK - ls_BLK), axis=-1)


def kd_loss(logits_BLV, ids_BLK, logp_BLK, rest_BL, method: str, temperature: float, mask_BL=None) -> mx.array:
    """The mean distillation term over positions (over the target mask when given)."""
    if method == "topk":
        per_BL = kd_topk(logits_BLV, ids_BLK, logp_BLK, rest_BL, temperature)
    else:
        per_BL = kd_sample(logits_BLV, ids_BLK, logp_BLK, temperature)
    if mask_BL is None:
        return mx.mean(per_BL)
    return mx.sum(per_BL * mask_BL) / mx.maximum(mx.sum(mask_BL), 1.0)
