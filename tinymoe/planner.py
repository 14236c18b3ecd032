"""Memory planning from a ModelConfig alone: parameter counts and the bytes a run will need.

Nothing here allocates a model or imports MLX: every count is arithmetic on the config, which is
what makes planning a 7B-parameter model possible on a small machine. `tests/test_planner.py`
checks the counts against `count_params(Model(cfg))` for every preset small enough to build and
against scaled-down copies of the large ones.

Memory model (bytes; every figure is an estimate except the parameter counts):
  weights        total params x bytes of the parameter dtype
  gradients      the same again: `value_and_grad` returns a dense gradient for every weight,
                 including the zero slices of experts no token was routed to (float32 when
                 bfloat16 gradients are accumulated; float16 adds a float32 unscaled copy)
  optimizer      adamw: two moments for every weight. sparse-adamw: two moments for the
                 non-expert weights plus, for the experts, only the share that has received
                 gradient (`expert_state_fraction`; 1.0 is the honest training default, since
                 load balancing routes some token to every expert within a few steps).
                 adafactor: R + C statistics per (R, C) matrix (per expert, for that same share
                 of experts) and a full v per vector (`_adafactor_state_elements`)
  update         MLX's update is functional: clipped gradients and new weights exist before the
                 old ones are freed, and so do new and old optimizer state: adamw's compiled
                 update holds its inputs until it returns, and for every optimizer the step
                 keeps the previous weights and state until the update is evaluated, to roll a
                 non-finite update back exactly (tinymoe.train.step)
  activations    what backprop keeps per token and layer (see `_activation_bytes`), attention
                 scores (MLX's attention backward materialises the L x L probabilities) and the
                 logits; assumes a sparse dispatch backend (grouped/gather: K experts per token)
                 in the parameter dtype (the loss adds a float32 copy of the logits); with
                 activation checkpointing a recomputed block keeps only its input, plus one
                 block's activations while it is recomputed

The total is the larger of two moments of the step, not the sum of the parts (`train_peak`):
  backward       weights + optimizer + activations: the saved tensors are all alive at the end
                 of the forward pass, before any gradient exists; the backward pass frees each
                 layer's saved tensors as it produces that layer's gradients, and a layer's
                 activations outweigh its gradients at these batch sizes, so the sum only falls
  update         weights + optimizer + gradients + update_transient: the activations are freed
                 by the end of the backward pass, before the update allocates its copies
so peak = weights + optimizer + max(activations, gradients + update_transient). With gradient
accumulation (grad_accum > 1) the earlier micro-batches' gradient sum is alive during each
later backward pass, so the gradients join that moment too (a bfloat16 run sums them in
float32). Measured (docs/memory.md, benchmarks/precision_memory.py and benchmarks/memory.py):
the plain sum over-estimated the activation-bound runs by up to 60%; this rule is within 15%
of every measured peak, high by up to 10% where activations dominate (adding the gradients to
the backward moment would give 19%) and low by up to 13% for bfloat16 runs whose update
dominates (the mixed-precision update's float32 temporaries are not counted). Narrow, shallow
models (d_model 64-128, 2-4 blocks) at long contexts hold 10-25% more in the backward pass than
the activation estimate (tests/test_planner_peak.py measures a 6-block one within 15%).

Sampling needs the weights (only `resident_experts` experts per MoE layer when offloading; with
`quant_bits`, `tinymoe quantize`'s layout: each quantized weight bits/8 bytes plus a scale and a
bias of the parameter dtype per `group_size` weights, routers, norms and biases in float) and
the KV cache, no gradients or optimizer state; offloading adds the prefill's working set
(tinymoe.infer.offload: a prompt may touch more experts than the cache keeps).

The verdict compares the total with a usable budget. On a Mac it is the Metal working-set limit
actually in force (`recommendedMaxWorkingSetSize`, read from MLX by tinymoe.backend and passed in
through `machine_budget`); elsewhere it assumes the 48 GB Mac the presets are sized for, at 75%
of its memory: Metal's default limit on Apple Silicon Macs with more than 36 GB, the remaining
quarter being left to macOS and other programs.
"""

from __future__ import annotations

from dataclasses import dataclass

from tinymoe.config import ModelConfig
from tinymoe.errors import TinyMoeError
from tinymoe.names import DTYPE_BYTES, OPTIMIZERS
from tinymoe.router_registry import active_experts, active_params, router_factored_state, router_params

DEFAULT_MEMORY_GIB = 48.0
DEFAULT_USABLE_FRACTION = 0.75  # Metal's default GPU working-set limit on large-memory Macs
GIB = 2**30
# The two moments of a training step whose larger one is the peak (see the module docstring);
# any other part is alive at both. distributed_plan adds expert_exchange (forward/backward) and
# gradient_exchange (after the backward pass, before the update).
BACKWARD_PARTS = ("activations", "expert_exchange")
UPDATE_PARTS = ("gradients", "update_transient", "gradient_exchange")


def train_peak(parts: dict[str, int], grad_accum: int = 1) -> tuple[int, str]:
    """(peak bytes, how it is formed) of a training step's parts: the parts alive throughout
    plus the larger of the backward moment and the update moment. grad_accum > 1: the gradient
    sum is alive in both."""
    backward = [k for k in BACKWARD_PARTS if k in parts]
    if grad_accum > 1 and "gradients" in parts:
        backward.append("gradients")
    update = [k for k in UPDATE_PARTS if k in parts]
    steady = [k for k in parts if k not in backward and k not in update]
    total = sum(parts[k] for k in steady) + max(sum(parts[k] for k in backward), sum(parts[k] for k in update))
    return total, " + ".join(steady + [f"max({' + '.join(backward) or '0'}, {' + '.join(update) or '0'})"])


@dataclass
class ParamCounts:
    total: int
    active: int  # per token: embeddings, attention, dense FFNs, routers, shared and K of E experts
    expert: int  # all expert weights (the part that lives in experts.safetensors)
    per_expert: int  # one expert of one MoE layer
    moe_layers: int


def _attention_params(cfg: ModelConfig) -> int:
    dh = cfg.head_dim
    q, kv = cfg.n_heads * dh, cfg.n_kv_heads * dh
    n = cfg.d_model * (q + 2 * kv) + q * cfg.d_model
    if cfg.attn_bias:
        n += q + 2 * kv
    return n


def _shared_expert_params(cfg: ModelConfig) -> int:
    """Always-active experts of one MoE layer: one dense SwiGLU of width shared_experts x H."""
    return getattr(cfg, "shared_experts", 0) * 3 * cfg.d_model * cfg.expert_d_ff


def moe_layer_count(cfg: ModelConfig) -> int:
    """How many blocks `cfg.layer_is_moe`, in closed form: a config may claim 10**9 layers (a typo,
    a fuzzer) and the planner, which the memory check runs before anything is built, must still
    answer at once. MoE layers are L >= moe_first_dense with (L + 1) % moe_every == 0."""
    if not cfg.is_moe or cfg.moe_every <= 0 or cfg.n_layers <= max(cfg.moe_first_dense, 0):
        return 0
    # multiples of moe_every among L + 1 in [moe_first_dense + 1, n_layers]
    return cfg.n_layers // cfg.moe_every - max(cfg.moe_first_dense, 0) // cfg.moe_every


def _layer_kinds(cfg: ModelConfig) -> tuple[tuple[bool, int], tuple[bool, int]]:
    """((False, dense blocks), (True, MoE blocks)): the per-layer sums below multiply, not loop."""
    moe = moe_layer_count(cfg)
    return (False, cfg.n_layers - moe), (True, moe)


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d = cfg.d_model
    per_expert = 3 * d * cfg.expert_d_ff
    total = cfg.vocab_size * d + d  # embedding + final norm
    if not cfg.tie_embeddings:
        total += cfg.vocab_size * d
    expert = moe_layers = 0
    for is_moe, count in _layer_kinds(cfg):
        total += count * (2 * d + _attention_params(cfg))  # two RMSNorms + attention
        if is_moe:
            moe_layers += count
            total += count * (router_params(cfg) + cfg.moe_experts * per_expert + _shared_expert_params(cfg))
            expert += count * cfg.moe_experts * per_expert
        else:
            total += count * 3 * d * cfg.d_ff
    return ParamCounts(total, active_params(cfg, total, per_expert), expert, per_expert, moe_layers)


def _adafactor_state_elements(cfg: ModelConfig, expert_state_fraction: float) -> float:
    """Statistics tinymoe.optim.adafactor keeps: rows + cols per trainable matrix, every element of a
    vector. Not counted: the step counters (4 bytes per expert and expert tensor)."""
    d, h, dh = cfg.d_model, cfg.expert_d_ff, cfg.head_dim
    q, kv = cfg.n_heads * dh, cfg.n_kv_heads * dh
    n = (cfg.vocab_size + d) * (1 if cfg.tie_embeddings else 2) + d  # embedding, head, final norm
    for is_moe, count in _layer_kinds(cfg):
        layer = 2 * d + (q + d) + 2 * (kv + d) + (d + q)  # two norms, wq, wk, wv, wo
        if cfg.attn_bias:
            layer += q + 2 * kv
        if not is_moe:
            n += count * (layer + 3 * (cfg.d_ff + d))
            continue
        layer += router_factored_state(cfg)  # e.g. noisy's second (E, D) matrix; a frozen bias has none
        shared = getattr(cfg, "shared_experts", 0)
        if shared:
            layer += 3 * (shared * h + d)
        n += count * (layer + expert_state_fraction * cfg.moe_experts * 3 * (h + d))
    return n


def _activation_bytes(cfg: ModelConfig, batch: int, context: int, act_bytes: int, checkpoint_every: int = 0) -> int:
    """Tensors backprop keeps alive for one micro-batch (a sum of the main saved tensors).
    checkpoint_every N > 0: every Nth block keeps only its input (d per token) and is recomputed
    in the backward pass, when one block's full activations exist again for a moment."""
    d, h, kv = cfg.d_model, cfg.expert_d_ff, cfg.n_kv_heads * cfg.head_dim
    tokens = batch * context
    attn = 6 * d + 3 * kv  # norm in/out, q, k, v, rotated q/k, attention output, projection
    scores_layer = batch * cfg.n_heads * context * context * 2  # scores + probabilities
    kept_share = 1.0 - (cfg.n_layers // checkpoint_every) / cfg.n_layers if checkpoint_every else 1.0
    per_token, largest = 0.0, 0
    for is_moe, count in _layer_kinds(cfg):
        if is_moe:
            # norm in/out, router logits + probs, then per routed slot: gathered input, gate, up,
            # silu, product, output; and the combined output
            layer = attn + 3 * d + 3 * cfg.moe_experts + cfg.moe_topk * (2 * d + 4 * h)
        else:
            layer = attn + 3 * d + 4 * cfg.d_ff
        per_token += count * (kept_share * layer + (1 - kept_share) * d)
        largest = max(largest, layer) if count else largest
    scores = cfg.n_layers * kept_share * scores_layer
    if checkpoint_every:  # the recomputed block's activations during its backward
        per_token += largest
        scores += scores_layer
    logits = 3 * cfg.vocab_size * act_bytes  # logits, log-softmax and their gradient
    if act_bytes < 4:  # the loss is computed on a float32 copy of the logits
        logits += cfg.vocab_size * 4
    return int((tokens * per_token + scores) * act_bytes + tokens * logits)


def machine_budget(mac: dict | None) -> tuple[float, float, str]:
    """(memory GiB, usable fraction, where they come from) for planning on this machine. `mac`:
    tinymoe.backend.mac_memory_facts() (chip, memory_gib, working_set_gib), None off a Mac."""
    if mac:
        return (mac["memory_gib"], min(1.0, mac["working_set_gib"] / mac["memory_gib"]),
                f"the Metal working-set limit in force on this {mac['chip']}")
    return (DEFAULT_MEMORY_GIB, DEFAULT_USABLE_FRACTION,
            "the default Metal working-set limit of a 48 GB Mac (assumed: this is not a Mac)")


def presets_that_fit(memory_gib: float, usable_fraction: float) -> dict[str, bool]:
    """Each preset's training run at its own batch, optimizer and dtypes: does it fit the budget?"""
    from tinymoe.config import load_preset, preset_names

    fits = {}
    for name in preset_names():
        model_cfg, train_cfg = load_preset(name)
        fits[name] = plan(model_cfg, batch=train_cfg.batch_size, optimizer=train_cfg.optimizer,
                          state_dtype=train_cfg.optimizer_state_dtype, grad_accum=train_cfg.grad_accum,
                          memory_gib=memory_gib,
                          usable_fraction=usable_fraction)["fits"]
    return fits


def float_params(cfg: ModelConfig) -> int:
    """Parameters `tinymoe quantize` keeps in float: routers, norms and attention biases."""
    dh = cfg.head_dim
    biases = (cfg.n_heads + 2 * cfg.n_kv_heads) * dh if cfg.attn_bias else 0
    return (moe_layer_count(cfg) * router_params(cfg) + (2 * cfg.n_layers + 1) * cfg.d_model
            + cfg.n_layers * biases)


def weight_bytes(params: int, float_part: int, p_bytes: int, quant_bits: int = 0, group_size: int = 64) -> float:
    """Bytes of `params` weights of which `float_part` stay float: the rest packed at quant_bits
    (0 = float) with a scale and a bias of p_bytes per group."""
    if not quant_bits:
        return params * p_bytes
    packed = params - float_part
    return float_part * p_bytes + packed * quant_bits / 8 + 2 * p_bytes * packed / group_size


def plan(cfg: ModelConfig, *, mode: str = "train", batch: int = 1, context: int | None = None,
         param_dtype: str = "float32", optimizer: str = "adamw", state_dtype: str = "float32",
         expert_state_fraction: float = 1.0, resident_experts: int = 0, prompt_tokens: int | None = None,
         quant_bits: int = 0, group_size: int = 64, checkpoint_every: int = 0, grad_accum: int = 1,
         memory_gib: float = DEFAULT_MEMORY_GIB, usable_fraction: float = DEFAULT_USABLE_FRACTION,
         limit_source: str = "the default Metal GPU working-set limit") -> dict:
    """Parameters, memory per component (bytes), total, and whether it fits the budget."""
    if mode not in ("train", "sample"):
        raise TinyMoeError(f"unknown plan mode '{mode}' (choose from train, sample)")
    for name, value in (("param dtype", param_dtype), ("optimizer state dtype", state_dtype)):
        if value not in DTYPE_BYTES:
            raise TinyMoeError(f"unknown {name} '{value}' (choose from {', '.join(DTYPE_BYTES)})")
    if optimizer not in OPTIMIZERS:
        raise TinyMoeError(f"unknown optimizer '{optimizer}' (choose from {', '.join(OPTIMIZERS)})")
    if not 0 <= expert_state_fraction <= 1:
        raise TinyMoeError(f"expert state fraction must be in [0, 1], got {expert_state_fraction}")
    if batch <= 0 or grad_accum <= 0 or memory_gib <= 0 or not 0 < usable_fraction <= 1:
        raise TinyMoeError("batch, micro-batches and memory must be positive and the usable fraction in (0, 1]")
    if resident_experts < 0:
        raise TinyMoeError(f"resident experts must be >= 0, got {resident_experts}")
    if quant_bits and (mode != "sample" or quant_bits not in (4, 8) or group_size not in (32, 64, 128)):
        raise TinyMoeError("quantized weights (4 or 8 bits, group size 32, 64 or 128) are for --mode sample")
    context = context or cfg.context
    counts = param_counts(cfg)
    p_bytes, s_bytes = DTYPE_BYTES[param_dtype], DTYPE_BYTES[state_dtype]
    parts: dict[str, int] = {}
    if mode == "sample":
        resident = counts.total
        if resident_experts and cfg.is_moe:
            kept = min(resident_experts, cfg.moe_experts)
            resident -= counts.moe_layers * (cfg.moe_experts - kept) * counts.per_expert
        parts["weights"] = int(weight_bytes(resident, float_params(cfg), p_bytes, quant_bits, group_size))
        kv = cfg.n_kv_heads * cfg.head_dim
        parts["kv_cache"] = 2 * cfg.n_layers * batch * context * kv * p_bytes
        if resident_experts and cfg.is_moe:
            # The prefill of one layer holds every expert the prompt touches twice (cache entries
            # and the stacked copy) before evicting down to N; distinct experts assume balanced
            # routing: E (1 - (1 - K/E)^tokens).
            tokens = batch * (prompt_tokens or context)
            k = min(active_experts(cfg), cfg.moe_experts)
            distinct = cfg.moe_experts * (1 - (1 - k / cfg.moe_experts) ** tokens)
            expert_bytes = weight_bytes(counts.per_expert, 0, p_bytes, quant_bits, group_size)
            parts["offload_prefill"] = int(max(0.0, 2 * distinct - kept) * expert_bytes)
    else:
        parts["weights"] = counts.total * p_bytes
        # float16 gradients are unscaled into a float32 copy (tinymoe.train.loss_scale), and
        # accumulated bfloat16 gradients are summed in float32 (tinymoe.train.step): the update
        # then gets float32 gradients
        if param_dtype == "float16":
            parts["gradients"] = counts.total * (p_bytes + 4)
        else:
            parts["gradients"] = counts.total * (4 if grad_accum > 1 else p_bytes)
        non_expert = counts.total - counts.expert
        with_state = non_expert + (counts.expert if optimizer == "adamw" else counts.expert * expert_state_fraction)
        if optimizer == "adafactor":
            parts["optimizer"] = int(_adafactor_state_elements(cfg, expert_state_fraction) * s_bytes)
        else:
            parts["optimizer"] = int(2 * with_state * s_bytes)
        parts["activations"] = _activation_bytes(cfg, batch, context, p_bytes, checkpoint_every)
        # The update's peak holds a second copy of the gradients, weights and optimizer state;
        # see the module docstring.
        parts["update_transient"] = parts["weights"] + parts["gradients"] + parts["optimizer"]
    if mode == "train":
        total, rule = train_peak(parts, grad_accum)
    else:
        total, rule = sum(parts.values()), " + ".join(parts)
    budget = int(memory_gib * GIB * usable_fraction)
    return {"mode": mode, "params": {"total": counts.total, "active": counts.active, "expert": counts.expert},
            "bytes": parts, "total_bytes": total, "total_rule": rule, "budget_bytes": budget,
            "fits": total <= budget,
            "assumptions": {"batch": batch, "grad_accum": grad_accum, "context": context, "param_dtype": param_dtype,
                            "optimizer": optimizer, "optimizer_state_dtype": state_dtype,
                            "expert_state_fraction": expert_state_fraction,
                            "resident_experts": resident_experts, "quant_bits": quant_bits,
                            "group_size": group_size if quant_bits else None, "checkpoint_every": checkpoint_every,
                            "memory_gib": memory_gib,
                            "usable_fraction": usable_fraction, "limit_source": limit_source}}


def format_plan(result: dict, title: str) -> str:
    """The plan as an aligned text table."""
    gib = lambda n: f"{n / GIB:9.2f} GiB"  # noqa: E731
    p, a = result["params"], result["assumptions"]
    weights = f"{a['quant_bits']}-bit, group size {a['group_size']}" if a.get("quant_bits") else a["param_dtype"]
    if a.get("checkpoint_every") and result["mode"] == "train":
        weights += f", every {a['checkpoint_every']} block(s) recomputed"
    accum = f" x {a['grad_accum']} micro-batches" if a.get("grad_accum", 1) > 1 and result["mode"] == "train" else ""
    lines = [f"{title} ({result['mode']}: batch {a['batch']}{accum}, context {a['context']}, weights {weights}"
             + (f", {a['optimizer']} state {a['optimizer_state_dtype']}" if result["mode"] == "train" else "")
             + (f", {a['resident_experts']} resident experts/layer" if a["resident_experts"] else "") + ")",
             f"  parameters        {p['total']:>15,} total   {p['active']:>15,} active per token"]
    for name, n in result["bytes"].items():
        lines.append(f"  {name:<17} {gib(n)}")
    lines.append(f"  {'total':<17} {gib(result['total_bytes'])}  = {result['total_rule']}")
    verdict = "fits" if result["fits"] else "does NOT fit"
    lines.append(f"  {verdict} in {gib(result['budget_bytes']).strip()} usable "
                 f"({a['usable_fraction']:.0%} of {a['memory_gib']:.4g} GiB, "
                 f"{a.get('limit_source', 'the default Metal GPU working-set limit')}; the rest is left to the OS)")
    return "\n".join(lines)
