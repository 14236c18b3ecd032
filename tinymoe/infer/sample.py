"""Autoregressive sampling with a KV cache: temperature, top-k, top-p, seeded.

`generate` yields token ids one at a time so the CLI can stream text. The prompt is run once
(prefill) to fill each layer's cache; then every new token costs one single-token forward. The
model conditions on the window tokens[start:]; when that window would exceed the context length,
`start` jumps so the window keeps the last half-context, and the cache is rebuilt from it
(positions past the trained context were never seen in training).
`generate_uncached` re-runs the whole window each step with the same window rule: the slow
reference the tests compare against.

Overlap: each step's graph is built from the previous token while that token is still being
computed (`mx.async_eval`), so Python's work for step n+1 runs during MLX's work for step n and
the host waits only for the token it is about to yield. The random draws happen in the same order
as a step-by-step loop's, so seeded samples do not change; only a window slide (which needs the
token values) waits first.

The model runs in eval mode while `generate` runs (the caller's mode comes back afterwards):
routers draw no training noise and apply the eval-mode capacity, and each forward asks for no
router losses or statistics, so the MoE layers route lean (tinymoe.nn.routers), with the same
experts and gates.
"""

from __future__ import annotations

import time

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
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, routing: list | None = None,
             timing: dict | None = None):
    """Yield up to `max_tokens` new token ids. `routing`, if given, receives per-step routing
    (one forward per generated token after the prefill, the last token's included). `timing`, if
    given, is kept up to date: prompt_tokens and prefill_s (until the first token is known),
    decode_tokens and decode_s (the tokens after the first, and the time they took)."""
    training = model.training
    model.train(False)
    try:
        yield from _generate(model, prompt_ids, max_tokens, temperature, top_k, top_p, seed, routing, timing)
    finally:
        model.train(training)


def _generate(model, prompt_ids, max_tokens, temperature, top_k, top_p, seed, routing, timing):
    require_causal(model.cfg)  # expert choice would see tokens that are not generated yet
    if seed is not None:
        mx.random.seed(seed)
    context = model.cfg.context
    tokens = list(prompt_ids)[-context:]
    if not tokens:
        raise ValueError("generate needs at least one prompt token")
    start, n_prompt = 0, len(tokens)  # the model sees tokens[start:]
    began = time.perf_counter()

    def step(ids_1L, caches):  # the next token, lazily; no router losses or statistics (unused here)
        logits, _ = model(ids_1L, caches, routing, stats=False)
        return pick_token(logits[0, -1], temperature, top_k, top_p)

    caches = model.make_caches()
    pending = step(mx.array([tokens]), caches)
    mx.async_eval(pending)
    first_at = None
    for n in range(max_tokens):
        slides = len(tokens) + 1 - start > context  # appending this token overflows the window
        wanted = n + 1 < max_tokens or routing is not None  # the last forward only routes
        if wanted and not slides:  # queue the next step before waiting for this token
            following = step(pending.reshape(1, 1), caches)
            mx.async_eval(following)
        token = pending.item()
        now = time.perf_counter()
        if first_at is None:
            first_at = now
        if timing is not None:
            timing.update(prompt_tokens=n_prompt, prefill_s=first_at - began, decode_tokens=n,
                          decode_s=now - first_at)
        yield token
        tokens.append(token)
        if wanted and slides:
            start = len(tokens) - context // 2
            caches = model.make_caches()
            following = step(mx.array([tokens[start:]]), caches)
            mx.async_eval(following)
        if wanted:
            pending = following


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
