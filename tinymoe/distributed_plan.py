"""Per-rank memory and bytes exchanged per step of a distributed run, from a config alone.

Data parallel over N ranks (tinymoe.train.distributed): every rank holds the whole model, its
gradients and optimizer state, and the activations of B/N rows of each micro-batch. Once per
step, one all_sum carries the gradients (float32: accumulated micro-batches are summed in it);
flattening them into that one message and receiving its sum holds two more copies of them.
MLX's ring backend reduces in a ring: each rank sends 2 (N-1)/N of the array's bytes.

Expert parallel (--expert-parallel N = the rank count, tinymoe.nn.expert_parallel): every rank
holds E/N experts of each MoE layer, their gradients and their optimizer state, so only the
replicated weights' gradients are summed at the step's end. In exchange, every MoE layer of every
micro-batch moves activations (T = B/N x context tokens per rank, D the width, K slots):
  forward   all_gather x (N-1) T D, ids (N-1) T K (int32) and gates (N-1) T K,
            all_sum of the partial outputs (N T D): 2 (N-1) T D
  backward  all_sum of the gathered inputs' gradient: 2 (N-1) T D, of the gates': 2 (N-1) T K,
            all_gather of the outputs' gradient: (N-1) T D
in the activations' dtype (ids: 4 bytes). Memory adds the gathered inputs and partial outputs (N T D each) and
the S ~ T K slot rows the rank's experts compute (inputs and outputs), per MoE layer.
Nothing here imports MLX: `launched()` tells the CLI whether this process is one rank of a
group before anything loads MLX.
"""

from __future__ import annotations

import os

from tinymoe.config import ModelConfig
from tinymoe.errors import TinyMoeError
from tinymoe.names import DTYPE_BYTES
from tinymoe.planner import GIB, param_counts, plan, train_peak

GRAD_BYTES = 4  # gradients travel in float32
# Environment variables a launcher sets in every process it starts (mlx.launch's ring backend;
# mpirun's Open MPI and MPICH).
LAUNCH_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def launched() -> bool:
    """True in a process started by `mlx.launch` (or mpirun) as one rank of a group."""
    return any(name in os.environ for name in LAUNCH_ENV)


def ring_all_sum_bytes(array_bytes: float, ranks: int) -> float:
    """Bytes one rank sends for an all_sum of `array_bytes` over `ranks` in a ring."""
    return 2 * (ranks - 1) / ranks * array_bytes


def plan_ranks(cfg: ModelConfig, *, ranks: int, expert_parallel: int = 1, batch: int, grad_accum: int = 1,
               context: int | None = None, param_dtype: str = "float32", optimizer: str = "adamw",
               state_dtype: str = "float32", checkpoint_every: int = 0, **budget) -> dict:
    """One rank's memory (planner.plan's parts, adjusted) and the bytes it sends per step."""
    if ranks < 2:
        raise TinyMoeError(f"--ranks {ranks}: a distributed plan needs at least 2 ranks")
    if expert_parallel not in (1, ranks):
        raise TinyMoeError(f"--expert-parallel {expert_parallel} with {ranks} ranks: the experts split over all "
                           f"ranks ({ranks}) or none (1); MLX's ring backend has no sub-groups")
    if batch % ranks:
        raise TinyMoeError(f"batch {batch} does not split over {ranks} ranks (each takes an equal share)")
    sharded = expert_parallel > 1
    if sharded and not cfg.is_moe:
        raise TinyMoeError("--expert-parallel: this model has no MoE layer to split")
    if sharded and cfg.moe_experts % ranks:
        raise TinyMoeError(f"{cfg.moe_experts} experts do not split over {ranks} ranks")
    if sharded and optimizer != "adamw":
        raise TinyMoeError(f"--expert-parallel trains with adamw only (not {optimizer})")
    rows = batch // ranks
    context = context or cfg.context
    result = plan(cfg, mode="train", batch=rows, context=context, param_dtype=param_dtype, optimizer=optimizer,
                  state_dtype=state_dtype, checkpoint_every=checkpoint_every, grad_accum=grad_accum, **budget)
    counts = param_counts(cfg)
    p_bytes, s_bytes = DTYPE_BYTES[param_dtype], DTYPE_BYTES[state_dtype]
    parts = result["bytes"]
    tokens = rows * context  # T: one rank's tokens per micro-batch
    replicated = counts.total
    exchange_per_micro = 0.0
    if sharded:
        away = counts.expert * (ranks - 1) // ranks  # expert weights held by the other ranks
        replicated = counts.total - counts.expert
        parts["weights"] -= away * p_bytes
        parts["gradients"] -= int(away * parts["gradients"] / counts.total)  # per-weight gradient bytes
        parts["optimizer"] -= 2 * away * s_bytes
        parts["update_transient"] = parts["weights"] + parts["gradients"] + parts["optimizer"]
        d, k = cfg.d_model, cfg.moe_topk
        per_layer = (2 * ranks * tokens * d + 2 * tokens * k * d) * p_bytes + ranks * tokens * k * 4
        parts["expert_exchange"] = counts.moe_layers * per_layer
        n1 = ranks - 1
        # x, partial outputs, their gradients: 6 (N-1) T D; ids (int32) and gates with their gradient
        per_layer_sent = 6 * n1 * tokens * d * p_bytes + n1 * tokens * k * (4 + 3 * p_bytes)
        exchange_per_micro = counts.moe_layers * per_layer_sent
    # The exchange flattens the replicated gradients into one message and receives its sum: two
    # more copies at the step's end (float32).
    parts["gradient_exchange"] = 2 * replicated * GRAD_BYTES
    total, rule = train_peak(parts, grad_accum)
    gradient_sent = ring_all_sum_bytes(replicated * GRAD_BYTES, ranks)
    return {**result, "bytes": parts, "total_bytes": total, "total_rule": rule, "fits": total <= result["budget_bytes"],
            "ranks": ranks, "expert_parallel": expert_parallel, "global_batch": batch, "grad_accum": grad_accum,
            "sent_per_step": {"gradients": int(gradient_sent),
                              "expert_exchange": int(exchange_per_micro * grad_accum)},
            "sent_per_step_total": int(gradient_sent + exchange_per_micro * grad_accum),
            "tokens_per_step": batch * grad_accum * context}


def format_ranks(result: dict, title: str, link_gbps: float = 10.0) -> str:
    """The per-rank plan as text: memory parts, then bytes sent per step and their time on a link."""
    a = result["assumptions"]
    mode = "data parallel" if result["expert_parallel"] == 1 else f"experts split over {result['ranks']} ranks"
    gib = lambda n: f"{n / GIB:9.3f} GiB"  # noqa: E731
    mib = lambda n: f"{n / 2**20:10.2f} MiB"  # noqa: E731
    lines = [f"{title}: {result['ranks']} ranks, {mode}; global batch {result['global_batch']} "
             f"({a['batch']} rows per rank) x {result['grad_accum']} micro-batches, context {a['context']}",
             "  memory per rank"]
    for name, n in result["bytes"].items():
        lines.append(f"    {name:<17} {gib(n)}")
    lines.append(f"    {'total':<17} {gib(result['total_bytes'])}  "
                 f"({'fits' if result['fits'] else 'does NOT fit'} in {result['budget_bytes'] / GIB:.2f} GiB usable)")
    lines.append(f"      = {result['total_rule']}")
    lines.append("  sent per rank per step")
    for name, n in result["sent_per_step"].items():
        lines.append(f"    {name:<17} {mib(n)}")
    sent = result["sent_per_step_total"]
    seconds = sent * 8 / (link_gbps * 1e9)
    lines.append(f"    {'total':<17} {mib(sent)}  = {seconds * 1e3:.1f} ms at {link_gbps:g} Gbit/s (a lower bound: "
                 f"{result['tokens_per_step']:,} tokens per step)")
    return "\n".join(lines)
