"""What a run trains and evaluates on: read, tokenize (cached) and split the training text."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinymoe.config import TrainConfig
from tinymoe.data.batches import split_train_val
from tinymoe.data.corpus import bundled_corpus_dir, read_documents
from tinymoe.data.tokens import tokenize_documents
from tinymoe.errors import TinyMoeError
from tinymoe.paths import cache_dir  # noqa: F401  (also imported from here)
from tinymoe.tokenizers.builtin import ByteTokenizer, parse_tokenizer_spec, train_sentencepiece


@dataclass
class Stream:
    """One data spec's own tokens, split (a staged run samples each spec by its weight)."""

    spec: str
    train_tokens: np.ndarray  # (N_train,)
    train_mask: np.ndarray  # (N_train,) uint8 target mask
    val_tokens: np.ndarray
    val_mask: np.ndarray


@dataclass
class RunData:
    tokenizer: object
    train_tokens: np.ndarray  # (N_train,)
    val_tokens: np.ndarray  # (N_val,)
    domain_names: list
    sources: list
    val_domain_ids: np.ndarray | None = None  # (N_val,) index into domain_names, for routing analysis
    train_mask: np.ndarray | None = None  # (N_train,) uint8: 1 on target tokens
    val_mask: np.ndarray | None = None  # (N_val,)
    streams: dict | None = None  # spec -> Stream, when each spec is its own stream (staged runs)
    long_targets: int = 0  # instruction examples whose targets alone are longer than a window
    train_domain_ids: np.ndarray | None = None  # (N_train,) index into domain_names (domain experts)

    @property
    def has_prompts(self) -> bool:
        """Whether any token is not a target (the data holds instruction examples)."""
        return any(m is not None and m.size and not m.all() for m in (self.train_mask, self.val_mask))


def _read_tokenizer(train: TrainConfig, docs: list, tokenizer):
    if tokenizer is not None:
        return tokenizer
    kind, vocab = parse_tokenizer_spec(train.tokenizer)
    return ByteTokenizer() if kind == "bytes" else train_sentencepiece([d.text for d in docs], vocab)


def prepare_data(train: TrainConfig, tokenizer=None, context: int | None = None, separate: bool = False) -> RunData:
    """Read, tokenize (cached) and split the training text; train a tokenizer when asked.
    `context`: instruction examples are cut to context + 1 tokens (tinymoe.data.tokens).
    `separate`: every data spec is its own stream, split on its own (staged runs)."""
    sources = train.data or [str(bundled_corpus_dir())]
    limit = context + 1 if context else None
    if not separate:
        docs = read_documents(sources)
        tokenizer = _read_tokenizer(train, docs, tokenizer)
        data = tokenize_documents(docs, tokenizer, cache_dir() / "tokens", limit)
        tr, va = split_train_val(data, train.val_fraction)
        return RunData(tokenizer, np.asarray(tr.tokens), np.asarray(va.tokens), data.domain_names, sources,
                       np.asarray(va.domain_ids), np.asarray(tr.mask), np.asarray(va.mask),
                       long_targets=data.long_targets, train_domain_ids=np.asarray(tr.domain_ids))
    docs = {spec: read_documents([spec]) for spec in sources}
    tokenizer = _read_tokenizer(train, [d for spec in sources for d in docs[spec]], tokenizer)
    streams, vals, long_targets = {}, [], 0
    for spec in sources:
        data = tokenize_documents(docs[spec], tokenizer, cache_dir() / "tokens", limit)
        tr, va = split_train_val(data, train.val_fraction)
        streams[spec] = Stream(spec, np.asarray(tr.tokens), np.asarray(tr.mask), np.asarray(va.tokens),
                               np.asarray(va.mask))
        vals.append(va)
        long_targets += data.long_targets
    names = sorted({n for va in vals for n in va.domain_names})
    val_domains = np.concatenate([np.asarray([names.index(n) for n in va.domain_names], dtype=np.uint8)[
        np.asarray(va.domain_ids, dtype=np.int64)] for va in vals])

    def joined(field):
        return np.concatenate([getattr(st, field) for st in streams.values()])

    return RunData(tokenizer, joined("train_tokens"), joined("val_tokens"), names, sources, val_domains,
                   joined("train_mask"), joined("val_mask"), streams, long_targets)


@dataclass
class HeldOut:
    """Tokens to score or route, what they are, their per-token domains and target mask."""

    tokens: np.ndarray  # (N,)
    what: str  # "given data" or "validation split", for messages
    domain_ids: np.ndarray  # (N,) index into domain_names
    domain_names: list
    mask: np.ndarray | None = None  # (N,) uint8, 1 on target tokens

    @property
    def has_prompts(self) -> bool:
        return self.mask is not None and bool(self.mask.size) and not bool(self.mask.all())


def held_out_tokens(manifest: dict, tokenizer, data) -> HeldOut:
    """All of `data` (file specs) if given, else the checkpoint's own validation split."""
    from tinymoe.config import from_dict

    context = manifest.get("model", {}).get("context")
    context = context if isinstance(context, int) and not isinstance(context, bool) and context > 0 else None
    if data:
        given = tokenize_documents(read_documents(list(data)), tokenizer, cache_dir() / "tokens",
                                   context + 1 if context else None)
        return HeldOut(np.asarray(given.tokens), "given data", np.asarray(given.domain_ids), given.domain_names,
                       np.asarray(given.mask))
    train_cfg = from_dict(TrainConfig, manifest.get("train", {}), "checkpoint train config")
    run_data = prepare_data(train_cfg, tokenizer, context, separate="stages" in manifest)
    if run_data.val_tokens.size == 0:
        raise TinyMoeError("the checkpoint's run has no validation split; pass --data")
    return HeldOut(run_data.val_tokens, "validation split", run_data.val_domain_ids, run_data.domain_names,
                   run_data.val_mask)
