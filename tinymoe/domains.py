"""Domain experts: which experts each data domain owns, read from `--domain-experts` and checked.

A mapping `code=0-3,prose=4-7` gives each named data domain (tinymoe.data.corpus: a `NAME=PATH`
tag or a corpus subfolder) a set of routed experts. `soft` mode adds a router supervision loss
that pushes a token's routing mass onto its domain's experts; `hard` mode masks the other
experts out of the routing. Tokens of a domain without a mapping route freely. The secretary
(tinymoe.nn.domain) is a small classifier that predicts a text's domain for `sample --domain auto`.

This module is MLX-free: it parses, checks and describes the mapping; the run's manifest stores
`describe(...)` under "domains" so sample, inspect and probe know it.
"""

from __future__ import annotations

import re

from tinymoe.errors import TinyMoeError

DOMAIN_MODES = ("soft", "hard")
# Routers whose scores are one softmax over experts that a mask can restrict (tinymoe.nn.routers'
# shared Router.__call__); the others select by thresholds, noise, biases or per-expert choice.
DOMAIN_ROUTERS = ("topk", "jitter")
SECRETARY_PREFIX_TOKENS = 32  # tokens of a text's start the secretary reads (docs/domains.md)
_ENTRY = re.compile(r"([A-Za-z0-9_.\-]+)=(\d+)(?:-(\d+))?")


def parse_domain_experts(text: str, num_experts: int) -> dict[str, list[int]]:
    """{domain: sorted expert ids} from `NAME=RANGE,...` (RANGE: `A-B` inclusive or `A`; several
    ranges of one domain are written as repeated entries `code=0-1,code=4`). One-line errors for
    malformed entries, out-of-range or overlapping sets."""
    mapping: dict[str, list[int]] = {}
    owner: dict[int, str] = {}
    if not text.strip():
        raise TinyMoeError("--domain-experts is empty (expected NAME=RANGE,..., e.g. code=0-3,prose=4-7)")
    for raw in text.split(","):
        entry = raw.strip()
        match = _ENTRY.fullmatch(entry)
        if match is None:
            raise TinyMoeError(f"--domain-experts: '{entry}' is not NAME=A-B or NAME=A (e.g. code=0-3)")
        name, first = match.group(1), int(match.group(2))
        last = int(match.group(3)) if match.group(3) is not None else first
        if last < first:
            raise TinyMoeError(f"--domain-experts: '{entry}': the range ends before it starts")
        if last >= num_experts:
            raise TinyMoeError(f"--domain-experts: '{entry}': expert {last} is out of range (the model has "
                               f"{num_experts} routed experts, 0-{num_experts - 1})")
        for e in range(first, last + 1):
            if e in owner:
                raise TinyMoeError(f"--domain-experts: expert {e} is given to both '{owner[e]}' and '{name}' "
                                   f"(the sets must not overlap)")
            owner[e] = name
        mapping.setdefault(name, []).extend(range(first, last + 1))
    return {name: sorted(ids) for name, ids in mapping.items()}


def check_domain_settings(model, train) -> None:
    """The settings a config can check without data (called by tinymoe.config.validate)."""
    if train.domain_mode not in DOMAIN_MODES:
        raise TinyMoeError(f"unknown domain mode '{train.domain_mode}' (choose from {', '.join(DOMAIN_MODES)})")
    if train.domain_weight < 0:
        raise TinyMoeError(f"domain_weight must be >= 0, got {train.domain_weight}")
    if not train.domain_experts:
        if train.domain_weight > 0 or train.domain_mode != "soft" or train.secretary:
            raise TinyMoeError("--domain-weight, --domain-mode hard and --secretary need --domain-experts "
                               "NAME=RANGE,... (which experts each data domain owns)")
        return
    if not model.is_moe:
        raise TinyMoeError("--domain-experts needs an MoE model (--moe-experts > 1)")
    if model.router not in DOMAIN_ROUTERS:
        raise TinyMoeError(f"--domain-experts works with the {' and '.join(DOMAIN_ROUTERS)} routers, "
                           f"not '{model.router}'")
    if model.router_groups > 1:
        raise TinyMoeError("--domain-experts does not combine with node-limited routing (router_groups > 1)")
    mapping = parse_domain_experts(train.domain_experts, model.moe_experts)
    if train.domain_mode == "hard":
        for name, ids in mapping.items():
            if len(ids) < model.moe_topk:
                raise TinyMoeError(f"--domain-mode hard: domain '{name}' has {len(ids)} expert(s), fewer than "
                                   f"top-k {model.moe_topk} (every token must find k experts in its set)")
    if train.teacher_cache:
        raise TinyMoeError("--domain-experts does not combine with --teacher-cache")


def check_domain_names(mapping: dict, data_domains: list[str]) -> None:
    """Every mapped domain must be a domain of the training data."""
    for name in mapping:
        if name not in data_domains:
            raise TinyMoeError(f"--domain-experts: unknown domain '{name}' (the data's domains: "
                               f"{', '.join(data_domains)}; name them with --data NAME=PATH)")


def describe(train, num_experts: int, data_domains: list[str]) -> dict:
    """The manifest's "domains" record: the mapping, mode, weight, the data's domain names (the
    order of per-token domain ids) and whether a secretary was trained."""
    return {"experts": parse_domain_experts(train.domain_experts, num_experts), "mode": train.domain_mode,
            "weight": train.domain_weight, "data_domains": list(data_domains), "secretary": bool(train.secretary),
            "secretary_prefix_tokens": SECRETARY_PREFIX_TOKENS}


def read_record(manifest: dict) -> dict | None:
    """The manifest's domain record, checked enough to build routing from; None without one."""
    record = manifest.get("domains")
    if record is None:
        return None
    ok = (isinstance(record, dict) and isinstance(record.get("experts"), dict)
          and record.get("mode") in DOMAIN_MODES and isinstance(record.get("data_domains"), list)
          and all(isinstance(v, list) and all(isinstance(e, int) for e in v) for v in record["experts"].values()))
    if not ok:
        raise TinyMoeError("the checkpoint's 'domains' record is malformed")
    return record


def experts_of(record: dict, domain: str) -> list[int]:
    """Domain `domain`'s experts; a one-line error naming the choices otherwise."""
    if domain not in record["experts"]:
        raise TinyMoeError(f"--domain {domain}: not a mapped domain of this run (choose from "
                           f"{', '.join(record['experts'])}, or auto)")
    return record["experts"][domain]
