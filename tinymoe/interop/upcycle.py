"""Upcycling: turn a dense model into an MoE whose experts start as copies of its FFNs.

Each chosen layer's SwiGLU (w_gate, w_up (H, D), w_down (D, H)) is copied into E stacked experts
and gets a freshly initialised router. With renormalised top-k gates (router_norm) the K chosen
experts' gates sum to 1, so while the experts are identical the layer computes the dense FFN
exactly, whatever the router picks: the upcycled model starts with the dense model's logits
(float32 rounding aside). `upcycle` measures that on a fixed batch and refuses to write a
checkpoint that misses it.

Drop-Upcycling (Nakamura et al., 2025) breaks the symmetry so clones can specialise: for each
expert, a random fraction p of the H intermediate units is re-initialised, i.e. those rows of
w_gate and w_up and the matching columns of w_down are drawn again from a normal distribution
with the mean and standard deviation of the dense matrix they came from. Each expert draws its
own units. Everything random comes from one seeded numpy generator, so a seed gives one result.

Shared experts (--shared-experts N) start from the dense FFN too: the shared SwiGLU of width
N x H is the dense FFN's units repeated N times with w_down divided by N, and the shared and the
routed halves each carry half the dense output (their w_down are halved), so the layer still
starts as the dense FFN exactly. Drop-Upcycling re-draws routed experts only.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from tinymoe.config import ModelConfig, validate
from tinymoe.errors import TinyMoeError

IDENTITY_TOLERANCE = 1e-4  # max |logit diff| / max(1, max |logit|) accepted as float32 noise


def moe_config(dense: ModelConfig, experts: int, topk: int, every: int = 1, first_dense: int = 0,
               router_norm: bool = True, shared_experts: int = 0) -> ModelConfig:
    if dense.is_moe:
        raise TinyMoeError(f"the source is already an MoE ({dense.moe_experts} experts); upcycling needs a dense model")
    if experts < 2:
        raise TinyMoeError(f"--moe-experts must be at least 2, got {experts}")
    cfg = dataclasses.replace(dense, moe_experts=experts, moe_topk=topk, moe_every=every,
                              moe_first_dense=first_dense, expert_hidden=0, router_norm=router_norm,
                              shared_experts=shared_experts)
    validate(cfg)
    if not any(cfg.layer_is_moe(i) for i in range(cfg.n_layers)):
        raise TinyMoeError(f"no layer becomes MoE with --every-n {every} and --first-dense {first_dense} "
                           f"in a {cfg.n_layers}-layer model")
    return cfg


def _redraw(w: np.ndarray, units: np.ndarray, axis: int, rng: np.random.Generator, mean: float, std: float):
    """Replace the given units (rows when axis=0, columns when axis=1) by N(mean, std) draws."""
    if axis == 0:
        w[units, :] = rng.normal(mean, std, size=(len(units), w.shape[1]))
    else:
        w[:, units] = rng.normal(mean, std, size=(w.shape[0], len(units)))


def upcycle_weights(dense_weights: dict, cfg: ModelConfig, drop_fraction: float = 0.0, seed: int = 0) -> dict:
    """MoE weights (tinymoe names) for `cfg` from a dense model's weights."""
    import mlx.core as mx

    if not 0.0 <= drop_fraction <= 1.0:
        raise TinyMoeError(f"--drop-fraction must be in [0, 1], got {drop_fraction}")
    rng = np.random.default_rng(seed)
    out = {k: v for k, v in dense_weights.items() if ".ffn." not in k}
    E, D = cfg.moe_experts, cfg.d_model
    for i in range(cfg.n_layers):
        ffn = {p: dense_weights[f"blocks.{i}.ffn.{p}.weight"] for p in ("w_gate", "w_up", "w_down")}
        if not cfg.layer_is_moe(i):
            for p, w in ffn.items():
                out[f"blocks.{i}.ffn.{p}.weight"] = w
            continue
        dtype = ffn["w_gate"].dtype
        dense = {p: np.array(w.astype(mx.float32)) for p, w in ffn.items()}  # (H, D), (H, D), (D, H)
        H = dense["w_gate"].shape[0]
        stacked = {p: np.repeat(w[None], E, axis=0) for p, w in dense.items()}  # (E, ...)
        n_drop = int(round(drop_fraction * H))
        if n_drop:
            stats = {p: (float(w.mean()), float(w.std())) for p, w in dense.items()}
            for e in range(E):
                units = rng.choice(H, size=n_drop, replace=False)  # (n_drop,) hidden units of expert e
                _redraw(stacked["w_gate"][e], units, 0, rng, *stats["w_gate"])
                _redraw(stacked["w_up"][e], units, 0, rng, *stats["w_up"])
                _redraw(stacked["w_down"][e], units, 1, rng, *stats["w_down"])
        n_shared = getattr(cfg, "shared_experts", 0)
        if n_shared:  # half the output from the shared expert, half from the routed ones
            stacked["w_down"] = stacked["w_down"] * 0.5
            shared = {"w_gate": np.tile(dense["w_gate"], (n_shared, 1)), "w_up": np.tile(dense["w_up"], (n_shared, 1)),
                      "w_down": np.tile(dense["w_down"], (1, n_shared)) * (0.5 / n_shared)}  # (N*H, D), (D, N*H)
            for p, w in shared.items():
                out[f"blocks.{i}.moe.shared.{p}.weight"] = mx.array(w.astype(np.float32)).astype(dtype)
        for p, w in stacked.items():
            out[f"blocks.{i}.moe.experts.{p}"] = mx.array(w.astype(np.float32)).astype(dtype)
        # Same scale as TopKRouter's own initialisation; the router stays float32.
        router = rng.normal(0.0, 1.0 / math.sqrt(D), size=(E, D)).astype(np.float32)  # (E, D)
        out[f"blocks.{i}.moe.router.weight"] = mx.array(router)
    return out


def build_model(cfg: ModelConfig, weights: dict, dispatch: str = "auto"):
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from tinymoe.nn.model import Model

    model = Model(cfg, dispatch)
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())
    return model


def identity_check(dense_cfg, dense_weights, moe_cfg, moe_weights) -> dict:
    """Largest |logit difference| between the dense and the upcycled model on a fixed batch."""
    import mlx.core as mx

    from tinymoe.interop.export import max_abs_diff, probe_tokens, tinymoe_logits

    tokens = probe_tokens(dense_cfg.vocab_size, dense_cfg.context)
    dense_logits = tinymoe_logits(build_model(dense_cfg, dense_weights), tokens)
    moe_logits = tinymoe_logits(build_model(moe_cfg, moe_weights), tokens)
    scale = max(1.0, float(mx.max(mx.abs(dense_logits)).item()))
    diff = max_abs_diff(dense_logits, moe_logits)
    return {"max_abs_logit_diff": diff, "max_abs_logit": scale, "tokens": int(tokens.size),
            "within_float32_noise": diff <= IDENTITY_TOLERANCE * scale}


def upcycle(source: str, out: Path, experts: int, topk: int, every: int = 1, first_dense: int = 0,
            drop_fraction: float = 0.0, shared_experts: int = 0, router_norm: bool = True, seed: int = 0,
            context: int | None = None, overwrite: bool = False) -> dict:
    """`tinymoe upcycle`: dense tinymoe checkpoint or HF Llama/Qwen2 directory -> MoE run dir."""
    from tinymoe.interop.import_hf import load_source, param_counts, write_checkpoint
    from tinymoe.io.folders import check_output
    from tinymoe.memory_check import require_fits

    check_output(Path(out), "run", overwrite, source)  # refuse before the slow part; deletes nothing
    src = load_source(source, context)
    dense_cfg = src["cfg"]
    cfg = moe_config(dense_cfg, experts, topk, every, first_dense, router_norm, shared_experts)
    require_fits(cfg, mode="sample", context=1, what="the upcycled model")  # E copies of each FFN
    weights = upcycle_weights(src["weights"], cfg, drop_fraction, seed)
    check = identity_check(dense_cfg, src["weights"], cfg, weights)
    exact_expected = drop_fraction == 0 and router_norm
    if exact_expected and not check["within_float32_noise"]:
        raise TinyMoeError(f"identity check failed: max |logit diff| {check['max_abs_logit_diff']:.3g} "
                           f"is above float32 noise; nothing written")
    provenance = {"kind": "upcycle", "from": source, "source_architecture": src["arch"], "experts": experts,
                  "topk": topk, "every": every, "first_dense": first_dense, "shared_experts": shared_experts,
                  "drop_fraction": drop_fraction,
                  "seed": seed, "identity_check": check}
    ckpt = write_checkpoint(Path(out), cfg, weights, src["tokenizer"], provenance, overwrite, source)
    moe_layers = [i for i in range(cfg.n_layers) if cfg.layer_is_moe(i)]
    return {"checkpoint": str(ckpt), "source": src["source"], "source_architecture": src["arch"],
            "moe_layers": moe_layers, "experts": experts, "topk": topk, "shared_experts": shared_experts,
            "drop_fraction": drop_fraction,
            "router_norm": router_norm, "tokenizer": src["tokenizer"].kind,
            "params": param_counts(cfg, weights), "identity_check": check,
            "identity_expected": exact_expected}
