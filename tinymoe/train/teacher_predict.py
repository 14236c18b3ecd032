"""What the teacher predicts at each position of a token stream: chunks, forward passes, top-k or draws.

The student's batch sampler draws windows of its own context at random starts, so a cache must
hold one prediction per position of the whole training stream, whatever window later reads it.
The teacher reads the stream in chunks of its own context that overlap by `left` tokens: chunk j
starts where chunk j-1 ended minus `left`, and supplies the predictions of the positions after its
first `left` ones. Every position therefore sees at least `left` tokens of left context (the
stream's first positions fewer), at most the teacher's full context; the last chunk is moved back
to end at the stream's end. The prediction at position p is the teacher's distribution over the
token at p + 1; the last position's looks past the end of the stream (no window ever reads it).
"""

from __future__ import annotations

import numpy as np


def chunk_plan(n_tokens: int, context: int, left: int) -> list[tuple[int, int, int]]:
    """(start, keep_from, end) per chunk: the teacher reads tokens[start:end] and its predictions
    for positions [keep_from, end) are kept. The kept ranges tile [0, n_tokens) in order."""
    if not 0 <= left < context:
        raise ValueError(f"left context {left} must be in [0, {context})")
    if n_tokens <= context:
        return [(0, 0, n_tokens)] if n_tokens else []
    chunks, covered, start = [], 0, 0
    while covered < n_tokens:
        start = min(start, n_tokens - context)
        end = start + context
        chunks.append((start, covered, end))
        covered, start = end, end - left
    return chunks


def topk_rows(logp_TV: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k most likely ids of each row (most likely first; ties: the lower id first), their
    log-probabilities, and the log of the mass outside them (-inf when k covers the vocabulary)."""
    T, V = logp_TV.shape
    # Partition first (the full sort costs V log V per row), then order the k: a stable sort of
    # -logp keeps equal values in id order, so a build is deterministic.
    part_TK = np.sort(np.argpartition(-logp_TV, k - 1, axis=1)[:, :k], axis=1) if k < V else \
        np.broadcast_to(np.arange(V), (T, V))
    order_TK = np.argsort(-np.take_along_axis(logp_TV, part_TK, axis=1), axis=1, kind="stable")
    ids_TK = np.take_along_axis(part_TK, order_TK, axis=1)
    top_TK = np.take_along_axis(logp_TV, ids_TK, axis=1)
    if k >= V:
        return ids_TK, top_TK, np.full(T, -np.inf, dtype=np.float32)
    outside = logp_TV.astype(np.float64, copy=True)
    np.put_along_axis(outside, ids_TK, -np.inf, axis=1)
    peak = outside.max(axis=1, keepdims=True)  # finite: k < V leaves one entry per row
    rest_T = (peak[:, 0] + np.log(np.exp(outside - peak).sum(axis=1))).astype(np.float32)
    return ids_TK, top_TK, rest_T


def sample_rows(logp_TV: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """k independent draws per row from exp(logp) (inverse CDF in float64), and their log-probabilities."""
    T, V = logp_TV.shape
    cdf_TV = np.cumsum(np.exp(logp_TV.astype(np.float64)), axis=1)
    cdf_TV /= cdf_TV[:, -1:]  # the float32 probabilities sum to 1 only approximately
    u_TK = rng.random((T, k))
    # One searchsorted over all rows: row r's CDF is shifted by r, so rows cannot mix.
    shifted = (cdf_TV + np.arange(T)[:, None]).ravel()
    flat = np.searchsorted(shifted, (u_TK + np.arange(T)[:, None]).ravel(), side="right")
    ids_TK = np.minimum(flat.reshape(T, k) - np.arange(T)[:, None] * V, V - 1)
    return ids_TK, np.take_along_axis(logp_TV, ids_TK, axis=1)


def predict_chunks(model, tokens: np.ndarray, chunks: list[tuple[int, int, int]]):
    """The teacher's log-probabilities (T, V) float32 for the kept positions of `chunks` (all of one
    length), in stream order."""
    import mlx.core as mx

    x = mx.array(np.stack([np.asarray(tokens[s:e], dtype=np.int32) for s, _, e in chunks]))  # (B, C)
    logits, _ = model(x)
    logp = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), axis=-1, keepdims=True)
    logp = np.array(logp)  # (B, C, V)
    return np.concatenate([logp[i, keep - s:] for i, (s, keep, _) in enumerate(chunks)])
