"""Train/validation split of a token stream, the resumable batch samplers, evaluation windows.

A target mask (tinymoe.data.tokens) travels with the tokens: the split cuts it at the same places,
and the samplers and `eval_batches` return the mask of each window's targets next to them."""

from __future__ import annotations

import numpy as np

from tinymoe.data.tokens import TokenData
from tinymoe.errors import TinyMoeError


def _take(data: TokenData, pieces: list[tuple[int, int]]) -> TokenData:
    if not pieces:
        empty = np.empty(0, dtype=np.uint8)
        return TokenData(np.empty(0, dtype=data.tokens.dtype), empty, list(data.domain_names),
                         None if data.target_mask is None else empty)
    tokens = np.concatenate([data.tokens[a:b] for a, b in pieces])
    domain_ids = np.concatenate([data.domain_ids[a:b] for a, b in pieces])
    mask = None if data.target_mask is None else np.concatenate([data.target_mask[a:b] for a, b in pieces])
    return TokenData(tokens, domain_ids, list(data.domain_names), mask)


def split_train_val(
    data: TokenData, val_fraction: float = 0.1, block_tokens: int = 4096
) -> tuple[TokenData, TokenData]:
    """Deterministic split: every k-th block of `block_tokens` (k = round(1/val_fraction)) is
    validation. Streams too short for one block on each side hold out their last tokens instead."""
    if not 0.0 <= val_fraction < 1.0:
        raise TinyMoeError(f"val_fraction {val_fraction}: must be in [0, 1)")
    if block_tokens < 1:
        raise TinyMoeError(f"block_tokens {block_tokens}: must be at least 1")
    n_tokens = len(data)
    if val_fraction == 0.0 or n_tokens == 0:
        return data, _take(data, [])
    every_k = max(2, int(round(1.0 / val_fraction)))
    n_blocks = -(-n_tokens // block_tokens)  # the last block may be partial
    if n_blocks >= every_k:
        train_pieces, val_pieces = [], []
        for block in range(n_blocks):
            piece = (block * block_tokens, min(n_tokens, (block + 1) * block_tokens))
            (val_pieces if block % every_k == every_k - 1 else train_pieces).append(piece)
        return _take(data, train_pieces), _take(data, val_pieces)
    n_val = min(n_tokens - 1, max(1, int(round(n_tokens * val_fraction))))
    return _take(data, [(0, n_tokens - n_val)]), _take(data, [(n_tokens - n_val, n_tokens)])


# ----------------------------------------------------------------------------- batching


def _check_window(n_tokens: int, context: int) -> None:
    if n_tokens < context + 1:
        raise TinyMoeError(
            f"corpus has {n_tokens} tokens; it needs at least context+1 = {context + 1} "
            f"for one training window"
        )


class BatchSampler:
    """Random (B, L+1) windows from a token stream, resumable. With a target `mask` (N,), each
    batch is (inputs, targets, target mask (B, L)), else (inputs, targets). With a `teacher`
    cache (tinymoe.data.teacher_cache) over the same stream, each batch is (inputs, targets,
    target mask or ones, teacher ids, log-probabilities, rest), the teacher's predictions read at
    the inputs' stream positions (the prediction at p is for the token at p + 1, the target).
    With per-token `domains` (N,) (domain experts), each batch gains a last item: the inputs'
    domain ids (B, L) int32. Domains draw no random numbers: the sampler state is the same."""

    def __init__(self, tokens: np.ndarray, batch_size: int, context: int, seed: int, mask: np.ndarray | None = None,
                 teacher=None, domains: np.ndarray | None = None):
        if batch_size < 1 or context < 1:
            raise TinyMoeError(f"batch_size {batch_size} and context {context} must both be >= 1")
        _check_window(int(tokens.shape[0]), context)
        self.tokens, self.mask, self.teacher, self.domains = tokens, mask, teacher, domains
        self.batch_size = batch_size
        self.context = context
        self.seed = int(seed)
        self.batches_drawn = 0
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._offsets = np.arange(context + 1, dtype=np.int64)  # (L+1,)

    def next_batch(self) -> tuple:
        batch = self._next_windows()
        if self.domains is None:
            return batch
        return (*batch, np.asarray(self.domains[self._last_index[:, :-1]], dtype=np.int32))

    def _next_windows(self) -> tuple[np.ndarray, np.ndarray]:
        n_starts = int(self.tokens.shape[0]) - self.context  # last start leaves L+1 tokens
        starts = self._rng.integers(0, n_starts, size=self.batch_size)  # (B,)
        index = starts[:, None] + self._offsets  # (B, L+1)
        windows = np.asarray(self.tokens[index], dtype=np.int32)  # (B, L+1)
        self.batches_drawn += 1
        self._last_index = index
        if self.teacher is not None:
            mask = (np.asarray(self.mask[index[:, 1:]], dtype=np.float32) if self.mask is not None
                    else np.ones((self.batch_size, self.context), dtype=np.float32))
            return (windows[:, :-1], windows[:, 1:], mask, *self.teacher.gather(index[:, :-1]))
        if self.mask is not None:
            return windows[:, :-1], windows[:, 1:], np.asarray(self.mask[index[:, 1:]], dtype=np.float32)
        return windows[:, :-1], windows[:, 1:]  # inputs (B, L), targets (B, L)

    def state(self) -> dict:
        return {
            "seed": self.seed,
            "batches_drawn": self.batches_drawn,
            "rng": self._rng.bit_generator.state,
        }

    def load_state(self, state: dict) -> None:
        try:
            rng_state = state["rng"]
            if rng_state.get("bit_generator") != "PCG64":
                raise TinyMoeError(
                    f"sampler state uses {rng_state.get('bit_generator')!r}, not PCG64"
                )
            self._rng.bit_generator.state = rng_state
            self.seed = int(state["seed"])
            self.batches_drawn = int(state["batches_drawn"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TinyMoeError(f"sampler state is malformed: {exc!r}") from exc


class MixSampler(BatchSampler):
    """Random (B, L+1) windows from several streams: each row picks its stream with probability
    `weights` (a sampling mix), then a window of it. Always returns (inputs, targets, mask)."""

    def __init__(self, streams: list[tuple[np.ndarray, np.ndarray]], weights: list[float], batch_size: int,
                 context: int, seed: int):
        if len(streams) != len(weights) or not streams:
            raise TinyMoeError(f"{len(weights)} weights for {len(streams)} data streams")
        for tokens, _ in streams:
            _check_window(int(tokens.shape[0]), context)
        super().__init__(streams[0][0], batch_size, context, seed)
        self.streams = streams
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.n_starts = np.asarray([int(t.shape[0]) - context for t, _ in streams], dtype=np.int64)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        which = self._rng.choice(len(self.streams), size=self.batch_size, p=self.weights)  # (B,)
        starts = self._rng.integers(0, self.n_starts[which])  # (B,) one bound per row
        windows = np.empty((self.batch_size, self.context + 1), dtype=np.int32)  # (B, L+1)
        masks = np.empty((self.batch_size, self.context), dtype=np.float32)  # (B, L)
        for row, (s, start) in enumerate(zip(which, starts)):
            tokens, mask = self.streams[s]
            windows[row] = tokens[start:start + self.context + 1]
            masks[row] = mask[start + 1:start + self.context + 1]
        self.batches_drawn += 1
        return windows[:, :-1], windows[:, 1:], masks


class ShardedSampler:
    """One rank's rows of another sampler's batches: every rank draws the same global batch (the
    same seed and state) and keeps rows [rank * B/N, (rank + 1) * B/N) of each array, so N ranks
    together train on exactly the batch one process would. Its state is the wrapped sampler's."""

    def __init__(self, sampler: BatchSampler, rank: int, size: int):
        if sampler.batch_size % size:
            raise TinyMoeError(f"batch_size {sampler.batch_size} does not split over {size} ranks: each rank "
                               f"takes an equal share of every batch (use a multiple of {size})")
        self.sampler, self.rank, self.size = sampler, rank, size
        self.rows = sampler.batch_size // size

    def next_batch(self) -> tuple:
        first = self.rank * self.rows
        return tuple(a[first:first + self.rows] for a in self.sampler.next_batch())

    def state(self) -> dict:
        return self.sampler.state()

    def load_state(self, state: dict) -> None:
        self.sampler.load_state(state)

    @property
    def batches_drawn(self) -> int:
        return self.sampler.batches_drawn


def eval_batches(tokens: np.ndarray, batch_size: int, context: int, max_batches: int | None = None,
                 mask: np.ndarray | None = None):
    """Yield (inputs, targets) over non-overlapping windows that cover the stream once, and the
    targets' mask (b, L) as a third item when `mask` (N,) is given.

    Window i reads tokens[i*L : i*L + L + 1]; a final window shorter than that is dropped and the
    last batch may have fewer than batch_size rows. When `max_batches` leaves room for fewer
    windows than the stream holds, the windows scored are spread evenly over the whole stream
    (`spread_windows`), not its first ones: a split laid out domain after domain is then scored
    in every domain, by the trainer's validation and by `tinymoe eval --max-batches` alike.
    A stream shorter than one window (an empty validation split, say) yields nothing rather than
    failing, so callers can report "no data". Argument checks run now, not at the first next()."""
    if batch_size < 1 or context < 1:
        raise TinyMoeError(f"batch_size {batch_size} and context {context} must both be >= 1")
    max_windows = None if max_batches is None else max(0, int(max_batches)) * batch_size
    starts_W = spread_windows(int(tokens.shape[0]), context, max_windows)  # (W,)
    offsets = np.arange(context + 1, dtype=np.int64)  # (L+1,)

    def generate():
        for first in range(0, starts_W.size, batch_size):
            starts = starts_W[first:first + batch_size]
            index = starts[:, None] + offsets  # (b, L+1)
            windows = np.asarray(tokens[index], dtype=np.int32)
            if mask is not None:
                yield windows[:, :-1], windows[:, 1:], np.asarray(mask[index[:, 1:]], dtype=np.float32)
            else:
                yield windows[:, :-1], windows[:, 1:]

    return generate()


def spread_windows(n_tokens: int, context: int, max_windows: int | None) -> np.ndarray:
    """Start offsets of the non-overlapping windows (context + 1 tokens each, sharing one token
    with the next) of a stream of `n_tokens`: all of them, or `max_windows` spread evenly over the
    whole stream when fewer are asked for (0 asks for none). # (W,)"""
    n_windows = max(0, (n_tokens - 1) // context)
    if max_windows is None or n_windows <= max_windows:
        chosen = np.arange(n_windows, dtype=np.int64)
    elif max_windows <= 0:
        chosen = np.zeros(0, dtype=np.int64)
    else:
        chosen = np.unique(np.linspace(0, n_windows - 1, max_windows).round().astype(np.int64))
    return chosen * context
