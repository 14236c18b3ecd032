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
class RunData:
    tokenizer: object
    train_tokens: np.ndarray  # (N_train,)
    val_tokens: np.ndarray  # (N_val,)
    domain_names: list
    sources: list
    val_domain_ids: np.ndarray | None = None  # (N_val,) index into domain_names, for routing analysis


def prepare_data(train: TrainConfig, tokenizer=None) -> RunData:
    """Read, tokenize (cached) and split the training text; train a tokenizer when asked."""
    sources = train.data or [str(bundled_corpus_dir())]
    docs = read_documents(sources)
    if tokenizer is None:
        kind, vocab = parse_tokenizer_spec(train.tokenizer)
        tokenizer = ByteTokenizer() if kind == "bytes" else train_sentencepiece([d.text for d in docs], vocab)
    data = tokenize_documents(docs, tokenizer, cache_dir() / "tokens")
    tr, va = split_train_val(data, train.val_fraction)
    return RunData(tokenizer, np.asarray(tr.tokens), np.asarray(va.tokens), data.domain_names, sources,
                   np.asarray(va.domain_ids))


@dataclass
class HeldOut:
    """Tokens to score or route, what they are, and their per-token domains."""

    tokens: np.ndarray  # (N,)
    what: str  # "given data" or "validation split", for messages
    domain_ids: np.ndarray  # (N,) index into domain_names
    domain_names: list


def held_out_tokens(manifest: dict, tokenizer, data) -> HeldOut:
    """All of `data` (file specs) if given, else the checkpoint's own validation split."""
    from tinymoe.config import from_dict

    if data:
        given = tokenize_documents(read_documents(list(data)), tokenizer, cache_dir() / "tokens")
        return HeldOut(np.asarray(given.tokens), "given data", np.asarray(given.domain_ids), given.domain_names)
    train_cfg = from_dict(TrainConfig, manifest.get("train", {}), "checkpoint train config")
    run_data = prepare_data(train_cfg, tokenizer)
    if run_data.val_tokens.size == 0:
        raise TinyMoeError("the checkpoint's run has no validation split; pass --data")
    return HeldOut(run_data.val_tokens, "validation split", run_data.val_domain_ids, run_data.domain_names)
