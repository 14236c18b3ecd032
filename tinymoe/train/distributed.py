"""Data-parallel training with MLX's own engine: the group of ranks `mlx.launch` starts.

`mlx.launch -n 2 --backend ring -- tinymoe train ...` starts one process per rank and tells each
its rank through the environment (`MLX_RANK` and `MLX_HOSTFILE` for the ring backend,
`OMPI_COMM_WORLD_RANK` under MPI). A process started that way joins the group; one started
without it never touches `mx.distributed`, so the single-process path costs nothing extra.

What the ranks share, and how (measured on MLX 0.32.4, CPU, ring backend):
- every rank draws the same global batch and keeps its rows (tinymoe.data.batches.ShardedSampler),
  so the ranks together see exactly the batch one process would;
- after the micro-batches are accumulated, one `all_sum` per dtype carries every gradient and
  every logged statistic (loss, router load); dividing by the rank count gives the average, the
  same bits on every rank, so each rank takes the same finite/skip decision, clips by the same
  norm, applies the same update and moves its router state (the sigmoid-bias router's balancing
  bias) by the same load: the weights never drift apart;
- a checksum of the weights is compared at the start and at every checkpoint, so a rank that did
  drift (another MLX build, another data file) stops the run with one line.

When a peer process dies, MLX's ring backend raises "connection to a peer was lost" at the next
collective (within milliseconds): the trainer turns that into one line and stops, the last
checkpoint untouched. A peer that hangs without dying (a frozen machine, a pulled cable: TCP
waits forever) is caught by the watchdog below: no step for `timeout_s` seconds ends the process.
`mlx.launch` itself stops the remaining ranks with SIGTERM once one of them exits; a rank that
gets it says so in one line instead of dying silently.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from tinymoe.distributed_plan import launched
from tinymoe.errors import TinyMoeError
from tinymoe.nn.expert_parallel import is_sharded, shard_model

DEFAULT_TIMEOUT_S = 900.0  # a checkpoint of a large model on rank 0 keeps the others waiting this long at most


class Ranks:
    """This process's place in the group and the collectives the trainer needs."""

    def __init__(self, group, timeout_s: float = DEFAULT_TIMEOUT_S, expert_parallel: int = 1):
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.watchdog = Watchdog(self.rank, timeout_s)
        if expert_parallel not in (1, self.size):
            raise TinyMoeError(f"--expert-parallel {expert_parallel} with {self.size} ranks: MLX's ring backend has "
                               f"no sub-groups, so the experts split over all ranks (--expert-parallel {self.size}) "
                               f"or none (1)")
        # Each rank holds E/N experts (tinymoe.nn.expert_parallel); their gradients need no exchange.
        self.shards_experts = expert_parallel > 1

    @property
    def writer(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics and progress."""
        return self.rank == 0

    def average(self, grads, sums: tuple):
        """The rank-average of a gradient tree and the step's statistics: one all_sum per dtype."""
        leaves = tree_flatten(grads) + [(f"\0stat{i}", v) for i, v in enumerate(sums)]
        by_dtype: dict = {}
        out = {}
        for name, a in leaves:
            if self.shards_experts and is_sharded(name):  # already the whole group's gradient
                out[name] = a / self.size
                continue
            by_dtype.setdefault(a.dtype, []).append((name, a))
        for group in by_dtype.values():
            flat = mx.concatenate([a.reshape(-1) for _, a in group])  # one message instead of one per tensor
            flat = mx.distributed.all_sum(flat, group=self.group) / self.size
            start = 0
            for name, a in group:
                out[name] = flat[start:start + a.size].reshape(a.shape)
                start += a.size
        averaged = tree_unflatten([(n, out[n]) for n, _ in tree_flatten(grads)])
        return averaged, tuple(out[f"\0stat{i}"] for i in range(len(sums)))

    def norm(self, grads) -> mx.array:
        """The global gradient norm when experts are sharded: the replicated weights' part once,
        every rank's experts' part summed over the ranks."""
        flat = tree_flatten(grads)
        dense = sum((mx.sum(mx.square(g.astype(mx.float32))) for n, g in flat if not is_sharded(n)), mx.array(0.0))
        experts = sum((mx.sum(mx.square(g.astype(mx.float32))) for n, g in flat if is_sharded(n)), mx.array(0.0))
        return mx.sqrt(dense + mx.distributed.all_sum(experts, group=self.group))

    @staticmethod
    def clip(grads, norm: mx.array, max_norm: float):
        """Scale by the global norm exactly as one process's clip would."""
        if max_norm <= 0:
            return grads
        scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
        return tree_map(lambda g: (g * scale).astype(g.dtype), grads)

    def all_true(self, flag: mx.array) -> mx.array:
        """True on every rank only if true on every rank (a NaN in one rank's experts rolls all back)."""
        return mx.distributed.all_sum(flag.astype(mx.float32), group=self.group) == self.size

    def shard_state(self, state):
        """This rank's rows of every expert-shaped array of a (full) tree: optimizer state."""
        local = {}
        for name, a in tree_flatten(state):
            if is_sharded(name) and isinstance(a, mx.array) and a.ndim:
                rows = a.shape[0] // self.size
                a = a[self.rank * rows:(self.rank + 1) * rows]
            local[name] = a
        return tree_unflatten(list(local.items()))

    def gather_state(self, named: dict) -> dict:
        """Every rank's rows of each expert array put together (all ranks call it): the
        single-process arrays a checkpoint stores."""
        if not self.shards_experts:
            return named
        return {n: mx.distributed.all_gather(a, group=self.group) if is_sharded(n) and a.ndim else a
                for n, a in named.items()}

    def check_same(self, arrays: list, what: str) -> None:
        """Stop with one line unless every rank holds the same `arrays` (compared by a checksum)."""
        local = np.array([_checksum(arrays)], dtype=np.float64)
        sums = np.array(mx.distributed.all_gather(mx.array(local.astype(np.float32)), group=self.group))
        if not np.all(sums == sums[0]):
            # A peer that stopped leaves zeros in the gather (the ring fails it without raising).
            raise TinyMoeError(f"rank {self.rank}: the {self.size} ranks do not hold the same {what} (checksums "
                               f"{', '.join(f'{s:.6g}' for s in sums)}): a rank stopped (see its error) or a machine "
                               f"has another tinymoe, MLX, checkpoint or data file")

    def close(self) -> None:
        """Training is over (done or failed): no watchdog, and a SIGTERM from the launcher now
        just ends the process. Raising from the handler here would land in an exit handler
        (MLX's own cleanup) as a traceback after the run's one line had been printed."""
        self.watchdog.stop()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def lost(self, exc: BaseException, step: int, kept) -> TinyMoeError:
        """The one line for a collective that failed because a peer is gone."""
        where = f"the last checkpoint {kept} is intact" if kept else "no checkpoint had been saved yet"
        return TinyMoeError(f"rank {self.rank}: lost the connection to another rank at step {step} ({exc}); "
                            f"training stopped and {where}")


def _checksum(arrays: list) -> float:
    """One number per rank: a position-weighted sum, so swapped values change it too (one
    evaluation for all arrays)."""
    sums = []
    for i, a in enumerate(arrays):
        a = a.astype(mx.float32).reshape(-1)
        sums.append(mx.sum(a * ((mx.arange(a.size, dtype=mx.float32) % 97 + 1) * (i + 1))))
    return float(mx.sum(mx.stack(sums)).item()) if sums else 0.0


def join(force: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S, expert_parallel: int = 1) -> Ranks | None:
    """The group when this process was launched as one of several ranks, else None. `force`
    joins whatever the environment says and fails when no backend can start; a group of one
    trains as a single process."""
    if not (force or launched()):
        return None
    if not mx.distributed.is_available():
        raise TinyMoeError("this MLX build has no distributed backend (mx.distributed.is_available() is False)")
    try:
        group = mx.distributed.init(strict=force)  # forced: an error rather than a silent group of one
    except RuntimeError as exc:
        raise TinyMoeError(f"cannot join the distributed group: {exc}") from None
    if group.size() == 1:
        if expert_parallel > 1:
            raise TinyMoeError(f"--expert-parallel {expert_parallel}: this process is the only rank; start the "
                               f"ranks with mlx.launch -n {expert_parallel} (docs/distributed.md)")
        return None
    ranks = Ranks(group, timeout_s, expert_parallel)
    _stop_on_sigterm(ranks.rank)
    return ranks


def _stop_on_sigterm(rank: int) -> None:
    """mlx.launch ends the other ranks with SIGTERM when one exits: say so, in one line."""
    def handler(signum, frame):
        raise TinyMoeError(f"rank {rank}: stopped by the launcher (another rank ended); "
                           f"checkpoints are written atomically, the last one is intact")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        # Exit handlers run last-registered first: this one, before MLX's distributed cleanup,
        # so a SIGTERM that arrives while the process is already exiting just ends it.
        atexit.register(signal.signal, signal.SIGTERM, signal.SIG_DFL)


class Watchdog:
    """Ends the process when no step completes for `timeout_s` seconds: a collective waiting on a
    peer that hangs (rather than dies) would otherwise wait forever. `beat()` after each step."""

    def __init__(self, rank: int, timeout_s: float):
        self.rank, self.timeout_s = rank, float(timeout_s)
        self.last = time.monotonic()
        self.step = 0
        self._thread = None

    def start(self) -> None:
        if self._thread is None and self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, daemon=True, name="tinymoe-watchdog")
            self._thread.start()

    def beat(self, step: int) -> None:
        self.last, self.step = time.monotonic(), step

    def stop(self) -> None:
        self.timeout_s = 0.0  # the thread sees it at its next look and returns

    def _watch(self) -> None:
        while self.timeout_s > 0:
            time.sleep(min(5.0, self.timeout_s / 4))
            if self.timeout_s > 0 and time.monotonic() - self.last > self.timeout_s:
                sys.stderr.write(f"error: rank {self.rank}: no progress for {self.timeout_s:g} s after step "
                                 f"{self.step} (another rank hangs or the network is down); stopping; "
                                 f"checkpoints are written atomically, the last one is intact\n")
                sys.stderr.flush()
                os._exit(1)


def lost_peer(exc: BaseException) -> bool:
    """Whether an MLX error comes from the distributed backend (a peer gone), not from the step."""
    text = str(exc).lower()
    return any(word in text for word in ("[ring]", "[mpi]", "peer", "socket", "connection"))


def refuse_unsplittable(train, stages) -> None:
    """Runs whose loss is not the mean of equal shares of the batch: their data-parallel average
    would not be the single-process step (the target-only mean divides by each rank's own count)."""
    if stages:
        raise TinyMoeError("--stages does not run distributed yet; train the stages in one process")
    if train.loss_on == "target":
        raise TinyMoeError("loss_on=target does not run distributed yet (each rank would average over its own "
                           "target tokens, not the batch's); train it in one process")


def shard_experts(model, optimizer, ranks: Ranks, optimizer_name: str) -> None:
    """--expert-parallel: every MoE layer keeps this rank's E/N experts, the optimizer their state."""
    if optimizer_name != "adamw":
        raise TinyMoeError(f"--expert-parallel needs --optimizer adamw ({optimizer_name} keeps its expert state in "
                           f"its own layout, not split by rank yet)")
    if not model.moe_layers():
        raise TinyMoeError("--expert-parallel: this model has no MoE layer to split")
    shard_model(model, ranks.group)
    optimizer.state = ranks.shard_state(optimizer.state)
    mx.eval(model.parameters(), optimizer.state)
