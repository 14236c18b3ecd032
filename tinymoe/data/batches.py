"""Train/validation split of a token stream, the resumable batch sampler, evaluation windows."""

from __future__ import annotations

import numpy as np

from tinymoe.data.tokens import TokenData
from tinymoe.errors import TinyMoeError


def _take(data: TokenData, pieces: list[tuple[int, int]]) -> TokenData:
    if not pieces:
        return TokenData(
            np.empty(0, dtype=data.tokens.dtype),
            np.empty(0, dtype=np.uint8),
            list(data.domain_names),
        )
    tokens = np.concatenate([data.tokens[a:b] for a, b in pieces])
    domain_ids = np.concatenate([data.domain_ids[a:b] for a, b in pieces])
    return TokenData(tokens, domain_ids, list(data.domain_names))


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
    """Random (B, L+1) windows from a token stream, resumable."""

    def __init__(self, tokens: np.ndarray, batch_size: int, context: int, seed: int):
        if batch_size < 1 or context < 1:
            raise TinyMoeError(f"batch_size {batch_size} and context {context} must both be >= 1")
        _check_window(int(tokens.shape[0]), context)
        self.tokens = tokens
        self.batch_size = batch_size
        self.context = context
        self.seed = int(seed)
        self.batches_drawn = 0
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._offsets = np.arange(context + 1, dtype=np.int64)  # (L+1,)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        n_starts = int(self.tokens.shape[0]) - self.context  # last start leaves L+1 tokens
        starts = self._rng.integers(0, n_starts, size=self.batch_size)  # (B,)
        index = starts[:, None] + self._offsets  # (B, L+1)
        windows = np.asarray(self.tokens[index], dtype=np.int32)  # (B, L+1)
        self.batches_drawn += 1
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


def eval_batches(tokens: np.ndarray, batch_size: int, context: int, max_batches: int | None = None):
    """Yield (inputs, targets) over non-overlapping windows that cover the stream once.

    Window i reads tokens[i*L : i*L + L + 1]; a final window shorter than that is dropped and the
    last batch may have fewer than batch_size rows. A stream shorter than one window (an empty
    validation split, say) yields nothing rather than failing, so callers can report "no data".
    Argument checks run now, not at the first next()."""
    if batch_size < 1 or context < 1:
        raise TinyMoeError(f"batch_size {batch_size} and context {context} must both be >= 1")
    n_tokens = int(tokens.shape[0])
    n_windows = max(0, (n_tokens - 1) // context)
    n_batches = -(-n_windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max(0, int(max_batches)))
    offsets = np.arange(context + 1, dtype=np.int64)  # (L+1,)

    def generate():
        for batch in range(n_batches):
            first = batch * batch_size
            starts = np.arange(first, min(n_windows, first + batch_size), dtype=np.int64) * context
            windows = np.asarray(tokens[starts[:, None] + offsets], dtype=np.int32)  # (b, L+1)
            yield windows[:, :-1], windows[:, 1:]

    return generate()
