"""Comparing runs on the same held-out tokens: bits per byte with bootstrap intervals, per domain,
paired against a baseline, beside each run's size, compute and time.

Every run is scored on the *same* windows: the validation split of the first run (or the given
`--data`), all its non-overlapping windows unless `max_windows` spreads fewer evenly over it
(tinymoe.data.batches.spread_windows: the trainer's validation picks its windows the same way).
Each window's summed nats, UTF-8 bytes and tokens are kept per domain, so every figure is a ratio
of sums over windows and the bootstrap (tinymoe.analysis.bootstrap) resamples windows, shared by
all runs so differences stay paired.

Runs whose configs differ only in their seed (and in settings that change nothing computed:
logging, checkpoints, validation, the dispatch backend) form one group; a group of several seeds
gets the mean over seeds and an interval over seeds and windows.

Refusals and warnings. Runs trained with different tokenizers are refused: their bits per byte
would still be comparable (it counts bytes, not tokens), but their held-out windows are not the
same text, and a window-paired comparison is what this command promises; score each with
`tinymoe eval --data FILE` instead. Runs trained on different data (files or validation fraction)
are compared, with a warning: the first run's validation text may be training text of another.

Estimates: training FLOPs = 6 x (active parameters, less an untied input embedding, which is a
lookup) x tokens + 6 x layers x context x d_model x tokens (attention scores and their use);
training time = the sum over metrics.jsonl's log windows of tokens / tokens per second (steps
only: validation and saving are not counted).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tinymoe.analysis import bootstrap
from tinymoe.errors import TinyMoeError

# Settings that change nothing a run computes: runs differing only in these (and the seed) are
# the same configuration.
NOT_COMPUTED = {"seed", "eval_every", "save_every", "log_every", "dispatch", "eval_batches", "max_bad_steps",
                "spike_factor", "spike_window"}


# ----------------------------------------------------------------------------- per run facts


def training_seconds(run_dir: Path) -> float | None:
    """Seconds spent in training steps, from the run's metrics.jsonl (None without one)."""
    from tinymoe.io import metrics_log

    path = Path(run_dir) / metrics_log.FILE_NAME
    if not path.is_file():
        return None
    seconds, previous = 0.0, 0
    for _, rec in metrics_log.read_records(path, warn=False):
        seen, rate = rec.get("tokens_seen"), rec.get("tokens_per_s")
        if not isinstance(seen, int) or not isinstance(rate, (int, float)):
            continue
        if seen > previous and rate > 0:
            seconds += (seen - previous) / rate
        previous = seen
    return seconds


def flops_estimate(model: dict, params_active: int, tokens: int) -> float:
    """Training FLOPs of `tokens` tokens (see the module docstring)."""
    weights = params_active - (0 if model.get("tie_embeddings", True) else model["vocab_size"] * model["d_model"])
    attention = model["n_layers"] * model["context"] * model["d_model"]
    return 6.0 * (weights + attention) * tokens


def config_key(manifest: dict) -> str:
    train = {k: v for k, v in manifest.get("train", {}).items() if k not in NOT_COMPUTED}
    return json.dumps({"model": manifest.get("model"), "train": train}, sort_keys=True)


def data_key(manifest: dict) -> str:
    data = manifest.get("data", {})
    files = data.get("files")
    if files is None:
        files = data.get("sources")
    return json.dumps({"files": files, "val_fraction": manifest.get("train", {}).get("val_fraction")}, sort_keys=True)


def tokenizer_fingerprint(tokenizer) -> str:
    """Equal exactly when two tokenizers split text the same way: the sha256 of what defines
    them (a sentencepiece model's bytes, a Hugging Face tokenizer.json), else their manifest
    entry (the byte tokenizer has nothing more to it)."""
    import hashlib

    for attr in ("model_proto", "tokenizer_json"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            data = value if isinstance(value, bytes) else str(value).encode()
            return f"{attr}:{hashlib.sha256(data).hexdigest()}"
    return json.dumps(tokenizer.to_manifest(), sort_keys=True)


def check_comparable(labels: list[str], manifests: list[dict], fingerprints: list[str]) -> list[str]:
    """Refuse runs of different tokenizers (one line); the warnings about differing data."""
    for label, manifest, fingerprint in zip(labels[1:], manifests[1:], fingerprints[1:]):
        if fingerprint != fingerprints[0]:
            raise TinyMoeError(f"{label} was trained with another tokenizer than {labels[0]} "
                               f"({_tokenizer_name(manifest)} vs {_tokenizer_name(manifests[0])}): their held-out "
                               f"windows are not the same text, so they cannot be compared window by window; bits per "
                               f"byte are still comparable across tokenizers: score each with tinymoe eval RUN --data "
                               f"FILE")
    warnings = []
    differing = [label for label, m in zip(labels[1:], manifests[1:]) if data_key(m) != data_key(manifests[0])]
    if differing:
        warnings.append(f"warning: {', '.join(differing)} trained on other data than {labels[0]} (files or "
                        f"validation fraction differ): all are scored on {labels[0]}'s held-out text, which may be "
                        f"training text of the others")
    return warnings


def _tokenizer_name(manifest: dict) -> str:
    tok = manifest.get("tokenizer")
    if isinstance(tok, dict):
        kind = tok.get("type") or tok.get("kind") or "tokenizer"
        vocab = tok.get("vocab_size")
        return f"{kind}{'' if vocab is None else ' vocab ' + str(vocab)}"
    return str(tok)


# ----------------------------------------------------------------------------- scoring


def score_windows(model, tokens: np.ndarray, byte_lengths: np.ndarray, domain_ids: np.ndarray | None,
                  n_domains: int, context: int, starts_W: np.ndarray, batch_size: int = 8) -> dict:
    """{"nats", "bytes", "tokens"}: arrays (W, D) of each window's sums per domain of its targets."""
    import mlx.core as mx
    import mlx.nn as nn

    D = max(1, n_domains)
    W = int(starts_W.size)
    nats, n_bytes, n_tok = np.zeros((W, D)), np.zeros((W, D)), np.zeros((W, D))
    offsets = np.arange(context + 1, dtype=np.int64)  # (L+1,)
    model.train(False)
    for first in range(0, W, batch_size):
        index = starts_W[first:first + batch_size, None] + offsets  # (b, L+1)
        windows = np.asarray(tokens[index], dtype=np.int32)
        logits, _ = model(mx.array(windows[:, :-1]))
        ce = np.array(nn.losses.cross_entropy(logits.astype(mx.float32), mx.array(windows[:, 1:]),
                                              reduction="none"), dtype=np.float64)  # (b, L)
        targets = windows[:, 1:]
        dom = (np.asarray(domain_ids[index[:, 1:]], dtype=np.int64) if domain_ids is not None and n_domains
               else np.zeros(targets.shape, dtype=np.int64))  # (b, L)
        lengths = np.asarray(byte_lengths, dtype=np.float64)[targets]  # (b, L)
        for d in range(D):
            on = dom == d
            nats[first:first + len(index), d] = (ce * on).sum(axis=1)
            n_bytes[first:first + len(index), d] = (lengths * on).sum(axis=1)
            n_tok[first:first + len(index), d] = on.sum(axis=1)
    return {"nats": nats, "bytes": n_bytes, "tokens": n_tok}


# ----------------------------------------------------------------------------- the comparison


def _interval(replicates) -> list[float]:
    low, high = bootstrap.percentile_interval(replicates)
    return [low, high]


def _bpb(nats, n_bytes) -> float:
    return bootstrap.ratio(nats, n_bytes) / math.log(2)


def summarise(runs: list[dict], baseline: int, replicates: int = bootstrap.DEFAULT_REPLICATES,
              seed: int = bootstrap.DEFAULT_SEED, domains: list | None = None) -> dict:
    """Groups of `runs` (each {"label", "manifest", "scores", ...}), their bits per byte and
    intervals, per domain, and paired differences against the group of run `baseline`."""
    groups: dict = {}
    for i, run in enumerate(runs):
        groups.setdefault(config_key(run["manifest"]), []).append(i)
    order = list(groups.values())
    base_group = next(g for g, members in enumerate(order) if baseline in members)
    n_windows = runs[0]["scores"]["nats"].shape[0]
    idx = bootstrap.window_indices(n_windows, replicates, seed)
    ln2 = math.log(2)
    domains = domains or []

    def totals(i, d=None):
        s = runs[i]["scores"]
        if d is None:
            return s["nats"].sum(axis=1), s["bytes"].sum(axis=1)
        return s["nats"][:, d], s["bytes"][:, d]

    def group_replicates(g, members, d=None, over_seeds=True):
        if len(members) == 1 or not over_seeds:
            reps = [bootstrap.ratio_replicates(*totals(i, d), idx) for i in members]
            return np.mean(reps, axis=0) / ln2
        num = np.stack([totals(i, d)[0] for i in members])
        den = np.stack([totals(i, d)[1] for i in members])
        seeds = bootstrap.seed_indices(len(members), replicates, seed * 7919 + g)
        return bootstrap.seed_mean_replicates(num, den, idx, seeds) / ln2

    out_groups = []
    base_reps = group_replicates(base_group, order[base_group])
    base_window_reps = group_replicates(base_group, order[base_group], over_seeds=False)
    for g, members in enumerate(order):
        first = runs[members[0]]
        per_seed = [_bpb(*totals(i)) for i in members]
        window_reps = group_replicates(g, members, over_seeds=False)
        entry = {"label": first["label"] if len(members) == 1 else _group_label(runs, members),
                 "runs": [runs[i]["label"] for i in members], "seeds": [runs[i]["seed"] for i in members],
                 "experts": first["experts"], "top_k": first["top_k"],
                 "params_total": first["params_total"], "params_active": first["params_active"],
                 "tokens": int(np.mean([runs[i]["tokens"] for i in members])),
                 "flops": float(np.mean([runs[i]["flops"] for i in members])),
                 "train_s": _mean_or_none([runs[i]["train_s"] for i in members]),
                 "bits_per_byte": float(np.mean(per_seed)), "per_seed": per_seed,
                 "ci_windows": _interval(window_reps), "ci_seeds": None,
                 "baseline": g == base_group, "diff": None, "diff_ci": None, "domains": {}}
        if len(members) > 1:
            entry["ci_seeds"] = _interval(group_replicates(g, members))
        if g != base_group:
            reps = group_replicates(g, members) - base_reps if len(members) > 1 or len(order[base_group]) > 1 \
                else window_reps - base_window_reps
            entry["diff"] = entry["bits_per_byte"] - float(np.mean([_bpb(*totals(i)) for i in order[base_group]]))
            entry["diff_ci"] = _interval(reps)
        for d, name in enumerate(domains):
            values = [_bpb(*totals(i, d)) for i in members]
            if all(math.isfinite(v) for v in values):
                entry["domains"][name] = {"bits_per_byte": float(np.mean(values)),
                                          "ci_windows": _interval(group_replicates(g, members, d, over_seeds=False))}
        out_groups.append(entry)
    return {"groups": out_groups, "windows": int(n_windows), "replicates": replicates, "bootstrap_seed": seed,
            "baseline": out_groups[base_group]["label"], "domains": domains}


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _group_label(runs, members) -> str:
    label = runs[members[0]]["label"]
    seed = runs[members[0]]["seed"]
    suffix = f"_seed-{seed}"
    return (label[:-len(suffix)] if label.endswith(suffix) else label) + f" ({len(members)} seeds)"


def score_runs(entries: list[tuple[str, str]], data: list | None = None, max_windows: int | None = None,
               batch_size: int = 8, dispatch: str = "auto", say=lambda line: None) -> tuple[list[dict], dict]:
    """Load and score every (label, run or checkpoint path) on the same held-out windows.
    Returns (runs, held-out description); each run {"label", "manifest", "scores", "seed", ...}."""
    from tinymoe.data.prepare import held_out_tokens
    from tinymoe.io.loader import load_model

    if not entries:
        raise TinyMoeError("nothing to compare: give run folders, checkpoints or a sweep folder")
    loaded = [load_model(path, dispatch) for _, path in entries]  # small models: all at once
    labels = [label for label, _ in entries]
    manifests = [m for _, m, _, _ in loaded]
    warnings = check_comparable(labels, manifests, [tokenizer_fingerprint(t) for _, _, t, _ in loaded])
    context = min(m["model"]["context"] for m in manifests)  # every model reads windows this long
    held = held_out_tokens(manifests[0], loaded[0][2], data)
    starts = _starts(held.tokens.shape[0], context, max_windows)
    if starts.size == 0:
        raise TinyMoeError(f"{held.what} is shorter than one window ({context + 1} tokens)")
    runs = []
    for (label, path), (model, manifest, tokenizer, ckpt) in zip(entries, loaded):
        say(f"scoring {label} on {starts.size} windows of {context} tokens")
        scores = score_windows(model, held.tokens, tokenizer.token_byte_lengths(), held.domain_ids,
                               len(held.domain_names or []), context, starts, batch_size)
        params = manifest.get("params") or {}
        total, active = params.get("total"), params.get("active")
        tokens = int(manifest.get("tokens_seen", 0))
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
        runs.append({"label": label, "path": str(path), "checkpoint": str(ckpt), "step": manifest.get("step"),
                     "manifest": manifest, "scores": scores, "seed": manifest.get("train", {}).get("seed"),
                     "experts": manifest["model"].get("moe_experts"), "top_k": manifest["model"].get("moe_topk"),
                     "params_total": total, "params_active": active, "tokens": tokens,
                     "flops": flops_estimate(manifest["model"], active or 0, tokens),
                     "train_s": training_seconds(run_dir) if run_dir is not None else None})
    info = {"what": held.what, "context": context, "windows": int(starts.size),
            "tokens": int(starts.size * context), "domains": list(held.domain_names or []), "warnings": warnings}
    return runs, info


def _starts(n_tokens: int, context: int, max_windows: int | None) -> np.ndarray:
    from tinymoe.data.batches import spread_windows

    return spread_windows(int(n_tokens), context, max_windows)
