"""Router statistics: what each MoE layer does with a stream of tokens.

Definitions (docs/inspect.md repeats them, with examples). A *slot* is one of a token's K routing
choices; a slot is *kept* unless the router dropped it (capacity overflow, or an unused slot of a
dynamic-k router: routing records may carry a `kept` (T, K) mask, and a missing mask means all kept).
  load[e]         share of kept slots that went to expert e; sums to 1 over experts.
  entropy         mean over tokens of the router's softmax entropy, in nats (ln E = no preference,
                  0 = one expert certain). It measures how decided the router is per token.
  load_cv         coefficient of variation of the load over experts, std/mean (population std):
                  0 for perfectly even load, sqrt(E-1) when one expert takes everything.
  dead expert     an expert whose load is below 10% of the uniform share 1/E.
  drop_rate       share of the T*K slots that were not kept (0 without a `kept` mask).
  domain_expert   for each domain d, the share of d's kept slots that went to expert e (rows sum to 1).
  expert_domain   for each expert e, the share of e's kept slots whose token came from domain d.
  specialization  I(domain; expert) / H(domain) over kept slots: mutual information between the
                  domain of a slot's token and the expert it went to, normalised by the domain
                  entropy. 1 = the expert alone tells the domain (domains use disjoint experts),
                  0 = routing is independent of the domain. None with fewer than two domains.
  coactivation    C[e][f] = share of tokens whose kept slots include both e and f (e != f);
                  C[e][e] = share of tokens sent to e. `lift` of a pair = C[e][f] / (C[e][e] C[f][f]):
                  above 1 the two experts fire together more often than independent choices would.
"""

from __future__ import annotations

import math

import numpy as np

from tinymoe.data.batches import spread_windows  # the windows validation scores too

DEAD_FRACTION = 0.1


# ----------------------------------------------------------------------------- pure statistics


def load_shares(counts_E) -> np.ndarray:
    counts = np.asarray(counts_E, dtype=np.float64)
    total = counts.sum()
    return counts / total if total else np.zeros(counts.size)


def load_cv(load_E) -> float:
    load = np.asarray(load_E, dtype=np.float64)
    mean = load.mean() if load.size else 0.0
    return float(load.std() / mean) if mean > 0 else 0.0


def count_dead(load_E) -> int:
    load = np.asarray(load_E, dtype=np.float64)
    return int(np.sum(load < DEAD_FRACTION / load.size))


def token_entropy(probs_TE) -> np.ndarray:
    """Softmax entropy of each token's router distribution, in nats. # (T,)"""
    p = np.asarray(probs_TE, dtype=np.float64)
    return -np.sum(p * np.log(np.maximum(p, 1e-30)), axis=-1)


def specialization_score(joint_DE) -> float | None:
    """I(D; X) / H(D) from a (domains x experts) table of counts; None when H(D) is 0."""
    joint = np.asarray(joint_DE, dtype=np.float64)
    total = joint.sum()
    if total <= 0:
        return None
    p = joint / total  # (D, E)
    p_d = p.sum(axis=1)  # (D,)
    p_e = p.sum(axis=0)  # (E,)
    nz_d = p_d[p_d > 0]
    h_d = float(-np.sum(nz_d * np.log(nz_d)))
    if h_d <= 1e-12:
        return None
    mask = p > 0
    outer = np.outer(p_d, p_e)  # (D, E)
    mi = float(np.sum(p[mask] * np.log(p[mask] / outer[mask])))
    return min(1.0, max(0.0, mi / h_d))  # clamp float noise at the ends


def top_pairs(coact_EE, n: int = 5) -> list[dict]:
    """The n expert pairs that fire together most often, with their lift over independence."""
    c = np.asarray(coact_EE, dtype=np.float64)
    E = c.shape[0]
    pairs = []
    for e in range(E):
        for f in range(e + 1, E):
            if c[e, f] > 0:
                expected = c[e, e] * c[f, f]
                pairs.append({"experts": [e, f], "share": round(float(c[e, f]), 6),
                              "lift": round(float(c[e, f] / expected), 4) if expected > 0 else None})
    pairs.sort(key=lambda p: (-p["share"], p["experts"]))
    return pairs[:n]


# ----------------------------------------------------------------------------- accumulation


class LayerAccumulator:
    """Running sums for one MoE layer, fed routing records batch by batch."""

    def __init__(self, num_experts: int, top_k: int, num_domains: int = 0):
        E = num_experts
        self.E, self.K, self.D = E, top_k, num_domains
        self.counts = np.zeros(E, dtype=np.int64)  # kept slots per expert  # (E,)
        self.both = np.zeros((E, E), dtype=np.int64)  # tokens using e and f  # (E, E)
        self.domain_counts = np.zeros((max(num_domains, 1), E), dtype=np.int64)  # (D, E)
        self.domain_tokens = np.zeros(max(num_domains, 1), dtype=np.int64)  # (D,)
        self.entropy_sum, self.tokens, self.slots, self.kept = 0.0, 0, 0, 0

    def add(self, indices_TK, probs_TE, kept_TK=None, domains_T=None) -> None:
        idx = np.asarray(indices_TK, dtype=np.int64)
        T, K = idx.shape
        kept = np.ones((T, K), dtype=bool) if kept_TK is None else np.asarray(kept_TK, dtype=bool)
        onehot = (idx[..., None] == np.arange(self.E)) & kept[..., None]  # (T, K, E)
        per_token = onehot.any(axis=1)  # (T, E)
        self.counts += onehot.sum(axis=(0, 1))
        m = per_token.astype(np.int64)
        self.both += m.T @ m
        self.entropy_sum += float(token_entropy(probs_TE).sum())
        self.tokens += T
        self.slots += T * K
        self.kept += int(kept.sum())
        if domains_T is not None and self.D:
            dom = np.asarray(domains_T, dtype=np.int64).reshape(-1)  # (T,)
            self.domain_tokens += np.bincount(dom, minlength=self.D)[: self.D]
            slot_experts = onehot.sum(axis=1)  # kept slots per (token, expert)  # (T, E)
            np.add.at(self.domain_counts, dom, slot_experts)

    def stats(self, domain_ids_used: list[int] | None = None) -> dict:
        """The per-layer dictionary of `inspect --json` (domain rows in `domain_ids_used` order)."""
        load = load_shares(self.counts)
        coact = self.both / self.tokens if self.tokens else np.zeros((self.E, self.E))
        out = {"experts": self.E, "top_k": self.K, "load": [round(float(v), 6) for v in load],
               "entropy": self.entropy_sum / self.tokens if self.tokens else 0.0,
               "max_entropy": math.log(self.E), "load_cv": load_cv(load), "dead_experts": count_dead(load),
               "tokens": self.tokens, "drop_rate": 1.0 - self.kept / self.slots if self.slots else 0.0,
               "coactivation": [[round(float(v), 6) for v in row] for row in coact],
               "top_pairs": top_pairs(coact) if self.K > 1 else [],
               "domain_expert": None, "expert_domain": None, "specialization": None}
        if domain_ids_used:
            rows = self.domain_counts[domain_ids_used]  # (D_used, E)
            out["domain_expert"] = [[round(float(v), 6) for v in load_shares(r)] for r in rows]
            out["specialization"] = specialization_score(rows)
            by_expert = rows.T.astype(np.float64)  # (E, D_used)
            sums = by_expert.sum(axis=1, keepdims=True)
            shares = np.divide(by_expert, sums, out=np.zeros_like(by_expert), where=sums > 0)
            out["expert_domain"] = [[round(float(v), 6) for v in row] for row in shares]
        return out


# ----------------------------------------------------------------------------- running a model


def routing_stats(model, tokens: np.ndarray, batch_size: int, context: int, max_batches: int | None = None,
                  domain_ids: np.ndarray | None = None, domain_names: list | None = None) -> dict:
    """{"domains", "domain_tokens", "tokens", "layers": [per-layer stats]} of the routing over up to
    batch_size * max_batches windows of `tokens`. `domain_ids` (N,) index into `domain_names`."""
    import mlx.core as mx

    layers = model.moe_layers()
    use_domains = domain_ids is not None and domain_names is not None and len(domain_names) > 0
    D = len(domain_names) if use_domains else 0
    routers = {i: model.blocks[i].moe.router for i in layers}
    accs = {i: LayerAccumulator(getattr(r, "num_experts", model.cfg.moe_experts),
                                getattr(r, "top_k", model.cfg.moe_topk), D) for i, r in routers.items()}
    max_windows = None if max_batches is None else batch_size * max_batches
    starts = spread_windows(int(tokens.shape[0]), context, max_windows)  # (W,)
    offsets = np.arange(context, dtype=np.int64)  # (L,)
    seen = np.zeros(max(D, 1), dtype=np.int64)  # tokens per domain
    model.train(False)
    for b in range(0, starts.size, batch_size):
        index = starts[b:b + batch_size, None] + offsets  # (B, L)
        inputs = np.asarray(tokens[index], dtype=np.int32)
        doms = np.asarray(domain_ids[index], dtype=np.int64).reshape(-1) if use_domains else None  # (B*L,)
        if use_domains:
            seen += np.bincount(doms, minlength=D)[:D]
        routing: list = []
        model(mx.array(inputs), routing=routing)
        for i, r in zip(layers, routing):
            kept = r.get("kept")
            accs[i].add(np.array(r["indices"]), np.array(r["probs"]),  # float32: the router computes in it
                        None if kept is None else np.array(kept), doms)
    used = [d for d in range(D) if seen[d] > 0]
    return {"domains": [domain_names[d] for d in used], "domain_tokens": [int(seen[d]) for d in used],
            "tokens": int(starts.size * context),
            "layers": [{"layer": i, **accs[i].stats(used)} for i in layers]}


def bar(value: float, scale: float, width: int = 30) -> str:
    n = int(round(width * min(1.0, value / scale))) if scale > 0 else 0
    return "█" * n + "·" * (width - n)
