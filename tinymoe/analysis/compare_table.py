"""The text table of `tinymoe compare` (tinymoe.analysis.compare computes; this only lays out)."""

from __future__ import annotations

import math


def _num(value, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _ci(pair, digits: int = 4) -> str:
    if not pair:
        return ""
    return f"[{_num(pair[0], digits)}, {_num(pair[1], digits)}]"


def _signed(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def _count(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _seconds(s) -> str:
    if s is None:
        return "-"
    return f"{s:.0f}s" if s < 600 else f"{s / 60:.1f}m"


def format_table(result: dict, info: dict) -> list[str]:
    """Lines: the held-out text, one row per configuration, then the per-domain table."""
    lines = [f"held out: {info['what']}, {info['windows']} windows of {info['context']} tokens "
             f"({info['tokens']:,} tokens); 95% bootstrap intervals over windows"
             + (" and seeds" if any(g["ci_seeds"] for g in result["groups"]) else "")
             + f" ({result['replicates']} replicates, seed {result['bootstrap_seed']}); "
            f"differences paired against the baseline {result['baseline']}"]
    header = (f"{'run':<34} {'E':>3} {'K':>2} {'total':>7} {'active':>7} {'tokens':>7} {'FLOPs':>8} {'time':>6} "
              f"{'bits/byte':>9} {'95% CI':<18} {'vs baseline':<12} {'95% CI':<18}")
    lines += [header, "-" * len(header)]
    for g in result["groups"]:
        ci = g["ci_seeds"] or g["ci_windows"]
        diff = "baseline" if g["baseline"] else _signed(g["diff"])
        lines.append(f"{g['label'][:34]:<34} {g['experts']:>3} {g['top_k'] if g['experts'] > 1 else '-':>2} "
                     f"{_count(g['params_total']):>7} {_count(g['params_active']):>7} {_count(g['tokens']):>7} "
                     f"{g['flops']:>8.2e} {_seconds(g['train_s']):>6} {_num(g['bits_per_byte']):>9} {_ci(ci):<18} "
                     f"{diff:<12} {_ci(g['diff_ci']):<18}")
    seeds = [g for g in result["groups"] if len(g["runs"]) > 1]
    if seeds:
        lines.append("rows of several seeds: mean over seeds; interval over seeds and windows (windows only: "
                     + "; ".join(f"{g['label']} {_ci(g['ci_windows'])}" for g in seeds) + ")")
    domains = result.get("domains") or []
    if len(domains) > 1:
        lines += ["", f"{'per domain':<34} " + " ".join(f"{d[:12] + ' bits/byte':>22} {'95% CI':<18}" for d in domains)]
        for g in result["groups"]:
            cells = []
            for d in domains:
                entry = g["domains"].get(d)
                cells.append(f"{_num(entry['bits_per_byte']) if entry else '-':>22} "
                             f"{_ci(entry['ci_windows']) if entry else '':<18}")
            lines.append(f"{g['label'][:34]:<34} " + " ".join(cells))
    return lines
