"""Planning distillation from a config alone: a teacher cache's size, its read pattern, the teacher's memory.

No MLX and no numpy: the same arithmetic serves `tinymoe plan`, the cache writer
(tinymoe.data.teacher_cache) and the docs.

- **Disk.** A position costs K ids (2 bytes when the vocabulary fits uint16, else 4) and K
  log-probabilities (2 or 4 bytes), plus 4 bytes of rest mass for `topk`.
- **Training reads it mapped, never loads it.** Each micro-batch reads B x L rows (the windows'
  positions), rows of consecutive positions being contiguous; the pages stay in the OS page
  cache, which the system may evict at any time, so the cache adds no resident memory a run must
  reserve, and the first pass over a cache larger than the page cache reads the disk.
- **Building it** holds the teacher's weights and one forward pass over a batch of chunks:
  activations of a forward without backward (one layer's working set at a time), the logits and
  log-probabilities in float32, their host copy, and the float64 rows top-k and sampling use.
"""

from __future__ import annotations

from tinymoe.config import ModelConfig
from tinymoe.names import DTYPE_BYTES


def id_bytes(vocab_size: int) -> int:
    return 2 if vocab_size <= 65535 else 4


def bytes_per_token(k: int, method: str, vocab_size: int, dtype: str) -> int:
    """Disk bytes of one cached position."""
    return k * (id_bytes(vocab_size) + DTYPE_BYTES[dtype]) + (4 if method == "topk" else 0)


def cache_read_per_step(k: int, method: str, vocab_size: int, dtype: str, batch: int, context: int,
                        grad_accum: int = 1) -> int:
    """Bytes a training step reads from the mapped cache."""
    return bytes_per_token(k, method, vocab_size, dtype) * batch * context * grad_accum


def teacher_forward_bytes(cfg: ModelConfig, batch_chunks: int) -> dict:
    """The working set of one teacher forward pass over `batch_chunks` chunks of its context."""
    tokens = batch_chunks * cfg.context
    d, h = cfg.d_model, max(cfg.d_ff, cfg.expert_d_ff * max(1, cfg.moe_topk))
    layer = tokens * (6 * d + 3 * h) * 4 + batch_chunks * cfg.n_heads * cfg.context * cfg.context * 4 * 2
    logits = tokens * cfg.vocab_size * 4 * 3  # logits, log-probabilities, host copy
    rows = tokens * cfg.vocab_size * 8 * 2  # float64 rows: the rest mass / the sampling CDF
    return {"activations": layer, "logits": logits, "host_rows": rows}


def format_cache_lines(k: int, method: str, vocab_size: int, dtype: str, tokens: int | None = None,
                       batch: int | None = None, context: int | None = None, grad_accum: int = 1) -> list[str]:
    """What a cache costs on disk and how training reads it, as plan lines."""
    per = bytes_per_token(k, method, vocab_size, dtype)
    lines = [f"  teacher cache     {method} k={k} {dtype}: {per} bytes/token on disk"
             + (f", {tokens * per / 2**20:,.1f} MiB for {tokens:,} positions" if tokens else "")]
    if batch and context:
        read = cache_read_per_step(k, method, vocab_size, dtype, batch, context, grad_accum)
        lines.append(f"  cache reads       memory-mapped, not loaded: {read / 2**10:,.1f} KiB per step "
                     f"({batch * grad_accum} windows x {context} positions); held by the OS page cache, "
                     f"not counted in the total")
    return lines
