"""Autoregressive sampling with a KV cache: temperature, top-k, top-p, seeded.

`generate` yields token ids one at a time so the CLI can stream text. The prompt is run once
(prefill) to fill each layer's cache; then every new token costs one single-token forward. The
model conditions on the window tokens[start:]; when that window would exceed the context length,
`start` jumps so the window keeps the last half-context, and the cache is rebuilt from it
(positions past the trained context were never seen in training).
`generate_uncached` re-runs the whole window each step with the same window rule: the slow
reference the tests compare against.
"""

from __future__ import annotations

import mlx.core as mx

from tinymoe.router_registry import require_causal


def pick_token(logits_V: mx.array, temperature: float, top_k: int, top_p: float) -> mx.array:
    """Next token id from one row of logits; temperature 0 means greedy."""
    logits = logits_V.astype(mx.float32)
    if temperature <= 0:
        return mx.argmax(logits, axis=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[..., -top_k]
        logits = mx.where(logits < kth, -mx.inf, logits)
    if 0 < top_p < 1:
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = mx.cumsum(probs, axis=-1) - probs
        sorted_logits = mx.where(before >= top_p, -mx.inf, sorted_logits)
        logits = mx.put_along_axis(mx.full(logits.shape, -mx.inf), order, sorted_logits, axis=-1)
    return mx.random.categorical(logits)


def generate(model, prompt_ids: list[int], max_tokens: int, temperature: float = 0.8,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, routing: list | None = None):
    """Yield up to `max_tokens` new token ids. `routing`, if given, receives per-step routing."""
    require_causal(model.cfg)  # expert choice would see tokens that are not generated yet
    if seed is not None:
        mx.random.seed(seed)
    context = model.cfg.context
    tokens = list(prompt_ids)[-context:]
    if not tokens:
        raise ValueError("generate needs at least one prompt token")
    start = 0  # the model sees tokens[start:]
    caches = model.make_caches()
    logits, _ = model(mx.array([tokens]), caches, routing)
    for _ in range(max_tokens):
        token = pick_token(logits[0, -1], temperature, top_k, top_p).item()
        yield token
        tokens.append(token)
        if len(tokens) - start > context:
            start = len(tokens) - context // 2
            caches = model.make_caches()
            logits, _ = model(mx.array([tokens[start:]]), caches, routing)
        else:
            logits, _ = model(mx.array([[token]]), caches, routing)


def generate_uncached(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding by re-running the whole window each step (reference for tests)."""
    context = model.cfg.context
    tokens = list(prompt_ids)[-context:]
    start, out = 0, []
    for _ in range(max_tokens):
        logits, _ = model(mx.array([tokens[start:]]))
        token = mx.argmax(logits[0, -1]).item()
        out.append(token)
        tokens.append(token)
        if len(tokens) - start > context:
            start = len(tokens) - context // 2
    return out
