"""The Mixture-of-Experts FFN: a router, stacked SwiGLU experts, and a dispatch backend.

Shapes: T tokens (batch and sequence flattened), D model width, E experts, K experts per token,
H expert hidden width. The router runs in float32 whatever the model dtype, and its top-k indices
are wrapped in `stop_gradient`: only the gate values carry gradient back to the router.

Router losses (each with its own weight in ModelConfig, added to the LM loss by the trainer):
  load-balancing (Switch Transformer, generalised to k > 1):
      E * sum_e f_e * P_e, with f_e = share of the T*K routed slots that went to expert e
      (a constant for the gradient) and P_e = mean router probability of e over tokens.
      It is 1 for perfectly uniform routing and grows towards E as routing collapses.
      (Dividing the counts by T instead of T*K gives a minimum of K, a common slip.)
  z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2, keeps router logits small.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from tinymoe.dispatch import run_experts


class TopKRouter(nn.Module):
    """Softmax over experts, then the top-k; gates renormalised to sum to 1 when `norm`."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, norm: bool = True):
        super().__init__()
        self.weight = mx.random.normal((num_experts, d_model)) * (1.0 / math.sqrt(d_model))
        self.num_experts, self.top_k, self.norm = num_experts, top_k, norm

    def __call__(self, x_TD: mx.array):
        logits = x_TD.astype(mx.float32) @ self.weight.astype(mx.float32).T  # (T, E)
        probs = mx.softmax(logits, axis=-1)
        # Sorted by probability, so slot 0 is each token's first choice.
        indices = mx.stop_gradient(mx.argsort(-probs, axis=-1)[:, : self.top_k])  # (T, K)
        gates = mx.take_along_axis(probs, indices, axis=-1)  # (T, K)
        if self.norm:
            gates = gates / mx.sum(gates, axis=-1, keepdims=True)
        info = router_losses(logits, probs, indices, self.num_experts)
        return indices, gates, info, probs


def router_losses(logits_TE, probs_TE, indices_TK, num_experts: int) -> dict:
    T, K = indices_TK.shape
    onehot = indices_TK[..., None] == mx.arange(num_experts)  # (T, K, E)
    slots_per_expert = mx.sum(onehot, axis=(0, 1)).astype(mx.float32)  # (E,)
    load = mx.stop_gradient(slots_per_expert / (T * K))  # f_e, sums to 1
    mean_prob = mx.mean(probs_TE, axis=0)  # P_e
    balance = num_experts * mx.sum(load * mean_prob)
    z = mx.mean(mx.square(mx.logsumexp(logits_TE, axis=-1)))
    return {"balance_loss": balance, "z_loss": z, "load": load}


class SwiGLUExperts(nn.Module):
    """E SwiGLU FFNs stacked into three arrays, so one expert is one slice of each."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, out_scale: float = 1.0):
        super().__init__()
        s_in, s_hid = 1.0 / math.sqrt(d_model), out_scale / math.sqrt(d_hidden)
        self.w_gate = mx.random.uniform(-s_in, s_in, (num_experts, d_hidden, d_model))
        self.w_up = mx.random.uniform(-s_in, s_in, (num_experts, d_hidden, d_model))
        self.w_down = mx.random.uniform(-s_hid, s_hid, (num_experts, d_model, d_hidden))

    def params_per_expert(self) -> int:
        return sum(w[0].size for w in (self.w_gate, self.w_up, self.w_down))


class MoELayer(nn.Module):
    def __init__(self, d_model, num_experts, top_k, d_hidden, norm=True, out_scale=1.0):
        super().__init__()
        self.router = TopKRouter(d_model, num_experts, top_k, norm)
        self.experts = SwiGLUExperts(num_experts, d_model, d_hidden, out_scale)
        self.dispatch = "dense"  # set by Model.set_dispatch; not a parameter

    def __call__(self, x: mx.array, routing: list | None = None):
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        indices, gates, losses, probs = self.router(x_TD)
        if routing is not None:  # analysis only (inspect, sample --show-routing)
            routing.append({"indices": indices, "gates": gates, "probs": probs})
        e = self.experts
        y = run_experts(self.dispatch, x_TD, indices, gates.astype(x.dtype), e.w_gate, e.w_up, e.w_down)
        return y.reshape(shape), losses
