"""Routers: which experts each token goes to, with what gate, and the router's own losses.

Shapes: T tokens, D model width, E experts, K slots per token. Every router scores tokens with one
float32 linear map (`weight` (E, D)), whatever the model dtype, and wraps whatever it selects with
(top-k, sorting, thresholds) in `mx.stop_gradient`: only gate values carry gradient back. A router
returns a `RoutingResult`: indices and gates (T, K), probabilities (T, E), its losses (see
`router_losses`), the share of slots per expert (`load`) and, for routers that leave slots unused,
`selected` (T, K) bool. Each router's options, active-expert rule and extra parameters are declared
once in tinymoe.router_registry, which `make_router` reads. The names (docs/routers.md has the
papers and when to use each):

  topk           softmax over experts, top-k; `order` softmax-topk (renormalise the k gates when
                 `norm`) or topk-softmax (Mixtral: softmax over the k chosen logits).
  switch         top-1, gate = the chosen probability, jittered router input (Switch Transformer).
  noisy          logits + N(0,1) * softplus(x W_noise), learned noise scale (Shazeer et al. 2017).
  jitter         topk with the router input multiplied by U(1-eps, 1+eps) while training.
  sigmoid-bias   sigmoid scores; a balancing bias, nudged after each step from the observed load,
                 is added for selection only (DeepSeek-V3); optional node-limited groups.
  expert-choice  each expert takes its top-C tokens (Zhou et al. 2022); not causal.
  smart          topk + jitter + a learned softmax temperature (+ the entropy bonus, see config).
  dynamic        the fewest experts (k_min..k_max) whose probabilities reach a threshold.

Randomness (noise, jitter) is drawn only in training mode and only from the `key` passed in, so a
resumed run reproduces an uninterrupted one (tinymoe.train.step derives keys from seed and step).

Lean routing (`router(x, lean=True)`, eval mode only): what sampling runs. It returns indices and
gates alone (no distribution, losses or load: nothing at sampling time reads them) and selects
with the fewest operations that give the same experts and gates: an argmax for one slot, a
partition for two (with two slots the combine's sum does not depend on their order), a sort
for more; and, where the router's gates are the softmax over the chosen logits (topk-softmax) or
the renormalised chosen probabilities (equal to it: softmax is increasing, so the top-k
probabilities are those of the top-k logits), the softmax of the k chosen logits instead of all
E. Routers whose result needs more (unrenormalised probabilities, node-limited groups, dynamic
k, expert choice) keep their full computation and drop only the losses. On a decoded token these
few operations are a visible share of the time (docs/performance.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from tinymoe.router_registry import spec_of

LOG_TEMPERATURE_RANGE = (math.log(0.1), math.log(10.0))  # smart: keep the temperature sane


@dataclass
class RoutingResult:
    """What a router decided for T tokens (E experts, K slots per token, C tokens per expert).

    The loss fields are named as in tinymoe.nn.moe.LAYER_LOSSES, so `router_losses(...)` unpacks
    into them. A router that uses every slot leaves `selected` None; expert choice also fills the
    per-expert view (`tokens_EC`, `gates_EC`) that the MoE layer runs directly.
    """

    indices: mx.array  # (T, K) expert of each slot, best first (lean: any order for K <= 2)
    gates: mx.array  # (T, K) weight of each slot in the combine (0 for an unused slot)
    # None in a lean result (see the module docstring):
    probs: mx.array | None = None  # (T, E) the router's distribution over experts (losses, inspect)
    balance_loss: mx.array | None = None  # () see router_losses
    z_loss: mx.array | None = None  # ()
    entropy_loss: mx.array | None = None  # ()
    load: mx.array | None = None  # (E,) share of the selected slots per expert, sums to 1
    selected: mx.array | None = None  # (T, K) bool: which slots are used; None = all
    tokens_EC: mx.array | None = None  # (E, C) expert choice: each expert's tokens, best first
    gates_EC: mx.array | None = None  # (E, C) expert choice: their gates


def router_losses(logits_TE, probs_TE, indices_TK, num_experts: int, selected_TK=None) -> dict:
    """The losses every router reports (each weighted by its own ModelConfig weight).

    balance_loss  E * sum_e f_e * P_e (Switch Transformer, generalised to k > 1): f_e = share of the
                  selected slots that went to e (T*K of them when all are selected; a constant for
                  the gradient), P_e = mean probability of e over tokens. 1 when balanced, up to E.
    z_loss        mean over tokens of logsumexp(logits)^2 (ST-MoE): keeps router logits small.
    entropy_loss  ln E - mean over tokens of the entropy of probs: 0 for uniform routing; its
                  weight is an entropy *bonus* (minimising it raises the entropy).
    """
    onehot = indices_TK[..., None] == mx.arange(num_experts)  # (T, K, E)
    if selected_TK is not None:
        onehot = onehot & selected_TK[..., None]
    counts = mx.sum(onehot, axis=(0, 1)).astype(mx.float32)  # (E,)
    load = mx.stop_gradient(counts / mx.maximum(mx.sum(counts), 1.0))  # f_e, sums to 1
    balance = num_experts * mx.sum(load * mx.mean(probs_TE, axis=0))
    z = mx.mean(mx.square(mx.logsumexp(logits_TE, axis=-1)))
    entropy = -mx.sum(probs_TE * mx.log(mx.maximum(probs_TE, 1e-20)), axis=-1)  # (T,)
    return {"balance_loss": balance, "z_loss": z, "entropy_loss": math.log(num_experts) - mx.mean(entropy),
            "load": load}


def top_k(scores_TE: mx.array, k: int) -> mx.array:
    """Indices of the k highest scores per token, best first. # (T, K)"""
    return mx.stop_gradient(mx.argsort(-mx.stop_gradient(scores_TE), axis=-1)[:, :k])


def select(scores_TE: mx.array, k: int, ordered: bool) -> mx.array:
    """Lean top-k for inference (no gradient): indices of the k highest scores per token, best
    first when `ordered` or k == 1, else in any order. # (T, K)"""
    if k == 1:
        return mx.argmax(scores_TE, axis=-1, keepdims=True)  # first of equal maxima, as top_k
    if not ordered:
        E = scores_TE.shape[-1]
        return mx.argpartition(scores_TE, kth=E - k, axis=-1)[:, E - k:]
    return mx.argsort(-scores_TE, axis=-1)[:, :k]


def limit_groups(scores_TE: mx.array, groups: int, group_topk: int) -> mx.array:
    """Node-limited routing (DeepSeek-V2/V3): experts form `groups` equal groups; a token may only
    pick experts from its `group_topk` best groups, a group scored by the sum of its two best
    scores. The other experts' scores become -inf (for selection only)."""
    if groups <= 1:
        return scores_TE
    T, E = scores_TE.shape
    per_group = E // groups
    grouped = mx.stop_gradient(scores_TE).reshape(T, groups, per_group)  # (T, G, E/G)
    best = mx.sort(grouped, axis=-1)[..., -min(2, per_group):]
    chosen = top_k(mx.sum(best, axis=-1), group_topk)  # (T, M)
    keep_TG = mx.any(chosen[..., None] == mx.arange(groups), axis=1)  # (T, G)
    keep_TE = mx.repeat(keep_TG, per_group, axis=1)  # (T, E)
    return mx.where(keep_TE, scores_TE, -mx.inf)


def _renormalise(gates_TK: mx.array) -> mx.array:
    return gates_TK / mx.maximum(mx.sum(gates_TK, axis=-1, keepdims=True), 1e-20)


class Router(nn.Module):
    """The shared part: float32 scoring, optional input jitter, softmax top-k selection."""

    random = False  # True when training draws random numbers (needs a key per step)

    def __init__(self, d_model: int, num_experts: int, top_k: int, norm: bool = True,
                 order: str = "softmax-topk", jitter_eps: float = 0.0, groups: int = 1, group_topk: int = 1):
        super().__init__()
        self.weight = mx.random.normal((num_experts, d_model)) * (1.0 / math.sqrt(d_model))
        self.num_experts, self.top_k, self.norm, self.order = num_experts, top_k, norm, order
        self.jitter_eps, self.groups, self.group_topk = jitter_eps, groups, group_topk
        self.random = jitter_eps > 0

    def logits(self, x_TD: mx.array, key=None) -> mx.array:
        x = x_TD.astype(mx.float32)
        if self.training and self.jitter_eps > 0:
            # Multiplicative input jitter (Switch Transformer): the router cannot lean on tiny
            # differences between tokens, which smooths its decisions early in training.
            eps = self.jitter_eps
            x = x * mx.random.uniform(1.0 - eps, 1.0 + eps, x.shape, key=key)
        return x @ self.weight.astype(mx.float32).T  # (T, E)

    def __call__(self, x_TD: mx.array, key=None, lean: bool = False, allowed_TE: mx.array | None = None):
        """allowed_TE: (T, E) or (E,) bool, domain routing (tinymoe.nn.domain): a token may pick
        only its allowed experts; the others get probability 0 and are never selected."""
        if allowed_TE is not None:
            return self.masked(x_TD, key, lean, allowed_TE)
        if self.is_lean(lean):
            return self.lean_softmax_topk(self.logits(x_TD))
        return self.softmax_topk(self.logits(x_TD, key))

    def masked(self, x_TD: mx.array, key, lean: bool, allowed_TE: mx.array):
        """Routing restricted to the allowed experts: their logits only (the softmax renormalises
        over them), and selection by a score where every other expert ranks below every allowed
        one, so a token never leaves its set even if an allowed probability underflows to 0."""
        logits = mx.where(allowed_TE, self.logits(x_TD, None if self.is_lean(lean) else key), -mx.inf)
        probs = mx.softmax(logits, axis=-1)  # (T, E): exactly 0 outside the set
        rank_TE = mx.where(allowed_TE, probs, -1.0)
        lean = self.is_lean(lean)
        indices = self.lean_select(rank_TE) if lean else top_k(rank_TE, self.top_k)  # (T, K)
        if self.order == "topk-softmax":
            gates = mx.softmax(mx.take_along_axis(logits, indices, axis=-1), axis=-1)
        else:
            gates = mx.take_along_axis(probs, indices, axis=-1)
            gates = _renormalise(gates) if self.norm else gates
        if lean:
            return RoutingResult(indices, gates)
        return RoutingResult(indices, gates, probs, **router_losses(logits, probs, indices, self.num_experts))

    def is_lean(self, lean: bool) -> bool:
        """Lean routing is for inference: training always gets the full result (and its noise)."""
        return lean and not self.training

    def lean_select(self, scores_TE: mx.array) -> mx.array:
        # Order matters only from three slots on: a sum of two gated outputs is the same either way.
        return select(scores_TE, self.top_k, ordered=self.top_k > 2)

    def lean_softmax_topk(self, logits_TE: mx.array):
        """softmax_topk's indices and gates, lean (see the module docstring)."""
        if self.groups == 1 and (self.order == "topk-softmax" or self.norm):
            indices = self.lean_select(logits_TE)
            return RoutingResult(indices, mx.softmax(mx.take_along_axis(logits_TE, indices, axis=-1), axis=-1))
        probs = mx.softmax(logits_TE, axis=-1)  # gates or group scores need the full distribution
        indices = self.lean_select(limit_groups(probs, self.groups, self.group_topk))
        if self.order == "topk-softmax":
            return RoutingResult(indices, mx.softmax(mx.take_along_axis(logits_TE, indices, axis=-1), axis=-1))
        gates = mx.take_along_axis(probs, indices, axis=-1)
        return RoutingResult(indices, _renormalise(gates) if self.norm else gates)

    def softmax_topk(self, logits_TE: mx.array):
        probs = mx.softmax(logits_TE, axis=-1)  # (T, E)
        indices = top_k(limit_groups(probs, self.groups, self.group_topk), self.top_k)  # (T, K)
        if self.order == "topk-softmax":
            # Mixtral: softmax over the k chosen logits (equal to renormalised top-k probabilities).
            gates = mx.softmax(mx.take_along_axis(logits_TE, indices, axis=-1), axis=-1)
        else:
            gates = mx.take_along_axis(probs, indices, axis=-1)  # (T, K)
            gates = _renormalise(gates) if self.norm else gates
        return RoutingResult(indices, gates, probs, **router_losses(logits_TE, probs, indices, self.num_experts))


class TopKRouter(Router):
    """Softmax over experts, then the top-k; gates renormalised to sum to 1 when `norm`."""

    def __init__(self, d_model, num_experts, top_k, norm=True, router_order="softmax-topk", router_groups=1,
                 router_group_topk=1):
        super().__init__(d_model, num_experts, top_k, norm, router_order, 0.0, router_groups, router_group_topk)


class JitterRouter(Router):
    """Top-k with multiplicative input jitter U(1-eps, 1+eps) while training."""

    def __init__(self, d_model, num_experts, top_k, norm=True, router_order="softmax-topk", jitter_eps=0.01):
        super().__init__(d_model, num_experts, top_k, norm, router_order, jitter_eps)


class SwitchRouter(Router):
    """Top-1; the gate is the chosen expert's probability (never renormalised, else it would be 1
    and the router would get no gradient); jittered input while training. `top_k` and `norm` are
    ignored (the validator requires moe_topk 1)."""

    def __init__(self, d_model, num_experts, top_k=1, norm=False, jitter_eps=0.01):
        super().__init__(d_model, num_experts, 1, norm=False, jitter_eps=jitter_eps)


class NoisyRouter(Router):
    """Noisy top-k gating: H = logits + N(0,1) * softplus(x W_noise) * noise_scale while training,
    then softmax over the k best H (the paper's order; without `norm`: their softmax-over-all-E
    probabilities). W_noise starts at zero (noise std softplus(0) = 0.69)."""

    def __init__(self, d_model, num_experts, top_k, norm=True, noise_scale=1.0):
        super().__init__(d_model, num_experts, top_k, norm, "topk-softmax" if norm else "softmax-topk")
        self.w_noise = mx.zeros((num_experts, d_model))
        self.noise_scale = noise_scale
        self.random = noise_scale > 0

    def __call__(self, x_TD, key=None, lean: bool = False):
        logits = self.logits(x_TD)
        if self.is_lean(lean):  # eval mode: no noise
            return self.lean_softmax_topk(logits)
        if self.training and self.noise_scale > 0:
            std = nn.softplus(x_TD.astype(mx.float32) @ self.w_noise.astype(mx.float32).T)  # (T, E)
            logits = logits + self.noise_scale * std * mx.random.normal(logits.shape, key=key)
        return self.softmax_topk(logits)


class SmartRouter(Router):
    """Top-k over softmax(logits / temperature) with a learned temperature and input jitter; the
    trainer adds the load-balancing loss and the entropy bonus (entropy_weight)."""

    def __init__(self, d_model, num_experts, top_k, norm=True, router_order="softmax-topk", jitter_eps=0.01):
        super().__init__(d_model, num_experts, top_k, norm, router_order, jitter_eps)
        self.log_temperature = mx.zeros((1,))  # temperature exp(0) = 1 at the start

    def temperature(self) -> mx.array:
        return mx.exp(mx.clip(self.log_temperature.astype(mx.float32), *LOG_TEMPERATURE_RANGE))

    def __call__(self, x_TD, key=None, lean: bool = False):
        if self.is_lean(lean):
            return self.lean_softmax_topk(self.logits(x_TD) / self.temperature())
        return self.softmax_topk(self.logits(x_TD, key) / self.temperature())


class SigmoidBiasRouter(Router):
    """Sigmoid scores s; experts chosen by top-k of s + selection_bias (within the best groups when
    grouped); gates are s itself (renormalised over the k when `norm`). The bias is not trained by
    the optimizer (it is frozen) but nudged by `after_step`: +rate for an expert below the mean load,
    -rate above it (DeepSeek-V3's auxiliary-loss-free balancing)."""

    def __init__(self, d_model, num_experts, top_k, norm=True, bias_rate=0.001, router_groups=1, router_group_topk=1):
        super().__init__(d_model, num_experts, top_k, norm, groups=router_groups, group_topk=router_group_topk)
        self.selection_bias = mx.zeros((num_experts,))
        self.freeze(recurse=False, keys=["selection_bias"])  # saved with the weights, never trained
        self.bias_rate = bias_rate

    def __call__(self, x_TD, key=None, lean: bool = False):
        logits = self.logits(x_TD)
        scores = mx.sigmoid(logits)  # (T, E)
        if self.is_lean(lean):
            indices = self.lean_select(limit_groups(scores + self.selection_bias, self.groups, self.group_topk))
            gates = mx.take_along_axis(scores, indices, axis=-1)
            return RoutingResult(indices, _renormalise(gates) if self.norm else gates)
        biased = mx.stop_gradient(scores) + mx.stop_gradient(self.selection_bias)
        indices = top_k(limit_groups(biased, self.groups, self.group_topk), self.top_k)  # (T, K)
        gates = mx.take_along_axis(scores, indices, axis=-1)  # (T, K)
        gates = _renormalise(gates) if self.norm else gates
        # A distribution over experts for the balance and entropy terms and for inspect.
        probs = scores / mx.sum(scores, axis=-1, keepdims=True)  # (T, E)
        return RoutingResult(indices, gates, probs, **router_losses(logits, probs, indices, self.num_experts))

    def after_step(self, load_E: mx.array) -> None:
        load = load_E.astype(mx.float32)
        self.selection_bias = self.selection_bias + self.bias_rate * mx.sign(mx.mean(load) - load)


class DynamicRouter(Router):
    """The fewest experts, at least k_min and at most k_max, whose softmax probabilities add up to
    `threshold` (Huang et al. 2024, "Harder Tasks Need More Experts"). Slots are k_max wide; the
    unused ones have gate 0 and selected False. k_max 0 means top_k."""

    def __init__(self, d_model, num_experts, top_k, norm=True, k_min=1, k_max=0, dynamic_threshold=0.5):
        super().__init__(d_model, num_experts, k_max or top_k, norm)
        self.k_min, self.threshold = k_min, dynamic_threshold

    def __call__(self, x_TD, key=None, lean: bool = False):
        logits = self.logits(x_TD)
        probs = mx.softmax(logits, axis=-1)  # (T, E)
        lean = self.is_lean(lean)
        # Best first in both modes: the threshold is a running sum in that order.
        indices = select(probs, self.top_k, ordered=True) if lean else top_k(probs, self.top_k)  # (T, Kmax)
        chosen = mx.take_along_axis(probs, indices, axis=-1)  # (T, Kmax)
        # Slot j is used when the mass before it is still short of the threshold (or j < k_min).
        before = mx.cumsum(mx.stop_gradient(chosen), axis=-1) - mx.stop_gradient(chosen)
        selected = mx.stop_gradient((before < self.threshold) | (mx.arange(self.top_k) < self.k_min))
        gates = mx.where(selected, chosen, 0.0)
        gates = _renormalise(gates) if self.norm else gates
        if lean:
            return RoutingResult(indices, gates, selected=selected)
        losses = router_losses(logits, probs, indices, self.num_experts, selected)
        return RoutingResult(indices, gates, probs, **losses, selected=selected)


class ExpertChoiceRouter(Router):
    """Each expert takes the C tokens with its highest softmax probability, C = capacity_factor *
    T * K / E (capacity factor 1 when 0 is given): balanced by construction, a token may get 0..E
    experts. Per token the result is E slots (slot e = expert e), selected where e took the token;
    the result also carries the per-expert view (`tokens_EC`, `gates_EC` (E, C)) that MoELayer runs.
    Not causal: whether an expert takes a token depends on every other token in the batch."""

    def __init__(self, d_model, num_experts, top_k, norm=True, capacity_factor=0.0, eval_capacity_factor=0.0):
        super().__init__(d_model, num_experts, top_k)  # gates are probabilities: `norm` does not apply
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor

    def capacity(self, T: int) -> int:
        factor = (self.capacity_factor if self.training else self.eval_capacity_factor) or self.capacity_factor
        return min(T, max(1, math.ceil((factor or 1.0) * T * self.top_k / self.num_experts)))

    def __call__(self, x_TD, key=None, lean: bool = False):
        logits = self.logits(x_TD)
        probs = mx.softmax(logits, axis=-1)  # (T, E)
        T, E = probs.shape
        tokens_EC = top_k(probs.T, self.capacity(T))  # (E, C) token ids, best first
        gates_EC = mx.take_along_axis(probs.T, tokens_EC, axis=-1)  # (E, C)
        taken_ET = mx.zeros((E, T), mx.int32).at[mx.arange(E)[:, None], tokens_EC].add(1)
        selected = mx.stop_gradient(taken_ET.T > 0)  # (T, E)
        indices = mx.broadcast_to(mx.arange(E), (T, E))  # (T, E): slot e is expert e
        gates = mx.where(selected, probs, 0.0)
        if self.is_lean(lean):  # the per-expert view is what the layer runs; only the losses go
            return RoutingResult(indices, gates, selected=selected, tokens_EC=tokens_EC, gates_EC=gates_EC)
        losses = router_losses(logits, probs, indices, E, selected)  # balance is 1 by construction
        return RoutingResult(indices, gates, probs, **losses, selected=selected, tokens_EC=tokens_EC,
                             gates_EC=gates_EC)


def make_router(name: str, d_model: int, num_experts: int, top_k: int, norm: bool = True, **opt) -> Router:
    """The router called `name` (tinymoe.router_registry.ROUTERS), built from its registry spec:
    its class with the options the spec lists, taken from `opt` (ModelConfig field names: router_order,
    jitter_eps, noise_scale, ...; others are ignored); missing ones keep the class defaults, which are
    ModelConfig's."""
    spec = spec_of(name)
    cls = globals()[spec.cls]
    return cls(d_model, num_experts, top_k, norm, **{o: opt[o] for o in spec.options if o in opt})
