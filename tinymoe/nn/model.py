"""Decoder-only transformer whose FFNs are dense SwiGLU or MoE layers.

Reads top to bottom: KV cache, attention (RoPE, grouped-query, causal, through
`mx.fast.scaled_dot_product_attention`), dense SwiGLU, block, model. Shapes: B batch, L sequence
length, D model width, V vocabulary, Hq/Hkv query/key-value heads, Dh head width.

`Model.__call__` returns (logits (B, L, V), aux) where aux holds the router losses summed over
MoE layers (balance_loss, z_loss, entropy_loss) and per MoE layer its load (share of kept slots
per expert), drop_rate and mean_k (tinymoe.nn.moe), so the trainer can log them. Parameter names are stable checkpoint names: `blocks.3.moe.experts.w_up` and so on.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from tinymoe.config import ModelConfig
from tinymoe.nn.dispatch import resolve_backend, resolve_decode_backend
from tinymoe.nn.moe import LAYER_LOSSES, LAYER_STATS, MoELayer, SwiGLU
from tinymoe.nn.rope import RoPE
from tinymoe.router_registry import active_params


class KVCache:
    """Keys and values of the tokens seen so far, in buffers grown `STEP` positions at a time.

    A new token's keys are written into the buffer in place (MLX reuses an array's memory for a
    slice update when nothing else holds it) rather than concatenated, which would copy the whole
    cache every decoded token. Attention reads the filled prefix, so results do not depend on
    the buffer's spare room."""

    STEP = 256

    def __init__(self):
        self.keys = None  # (B, Hkv, capacity, Dh)
        self.values = None
        self.offset = 0  # positions filled

    def update(self, k, v):
        start, L = self.offset, k.shape[2]
        if self.keys is None or start + L > self.keys.shape[2]:
            grow = -(-L // self.STEP) * self.STEP
            new_k = mx.zeros((*k.shape[:2], grow, k.shape[3]), k.dtype)
            new_v = mx.zeros((*v.shape[:2], grow, v.shape[3]), v.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :start, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :start, :], new_v], axis=2)
        self.offset = start + L
        self.keys[..., start:self.offset, :] = k
        self.values[..., start:self.offset, :] = v
        return self.keys[..., :self.offset, :], self.values[..., :self.offset, :]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, out_scale: float):
        super().__init__()
        d, dh = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, dh
        self.wq = nn.Linear(d, cfg.n_heads * dh, bias=cfg.attn_bias)
        self.wk = nn.Linear(d, cfg.n_kv_heads * dh, bias=cfg.attn_bias)
        self.wv = nn.Linear(d, cfg.n_kv_heads * dh, bias=cfg.attn_bias)
        self.wo = nn.Linear(cfg.n_heads * dh, d, bias=False)
        self.wo.weight = self.wo.weight * out_scale
        self.rope = RoPE(dh, base=cfg.rope_theta)  # nn.RoPE's, cheaper on the CPU (tinymoe.nn.rope)

    def __call__(self, x, cache: KVCache | None = None):
        B, L, D = x.shape
        # Projections on (B*L, D) rows: the same matmuls, without a flatten and an unflatten node
        # each (MLX adds them for a 3-D input), which a decoded token pays for (docs/performance.md).
        x = x.reshape(B * L, D)
        q = self.wq(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, Hq, L, Dh)
        k = self.wk(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.wv(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope.pair(q, k, offset)
        if cache is not None:
            k, v = cache.update(k, v)
        mask = causal_mask(L, offset)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        return self.wo(out.transpose(0, 2, 1, 3).reshape(B * L, -1)).reshape(B, L, D)


def causal_mask(L: int, offset: int):
    """Query i (at absolute position offset+i) sees keys 0..offset+i."""
    if L == 1:
        return None  # one new token sees the whole cache
    if offset == 0:
        return "causal"
    q_pos = mx.arange(offset, offset + L)[:, None]
    k_pos = mx.arange(offset + L)[None, :]
    return k_pos <= q_pos  # (L, offset + L) boolean


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        # GPT-2 style: shrink residual-branch outputs so the residual stream's variance stays ~1.
        out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, out_scale)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.is_moe = cfg.layer_is_moe(layer)
        if self.is_moe:
            self.moe = MoELayer.from_config(cfg, out_scale)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.d_ff, out_scale)

    def __call__(self, x, cache=None, routing=None, key=None, stats=True, domain=None):
        x = x + self.attn(self.attn_norm(x), cache)
        h = self.ffn_norm(x)
        if self.is_moe:
            y, losses = self.moe(h, routing, key, stats, domain)
            return x + y, losses
        return x + self.ffn(h), None


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig, dispatch: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = [Block(cfg, i) for i in range(cfg.n_layers)]
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.checkpoint_every = 0  # activation checkpointing: every Nth block recomputed (0 = off)
        self.set_dispatch(dispatch)

    def set_dispatch(self, name: str) -> str:
        """Backend `name` for every MoE layer; `auto` also picks one for decode-sized calls."""
        self.dispatch = resolve_backend(name)
        self.decode_dispatch = resolve_decode_backend(name, self.dispatch)
        for block in self.blocks:
            if block.is_moe:
                block.moe.dispatch, block.moe.decode_dispatch = self.dispatch, self.decode_dispatch
        return self.dispatch

    def moe_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.is_moe]

    def __call__(self, tokens_BL, caches: list | None = None, routing: list | None = None, key=None,
                 stats: bool = True, domains_BL=None):
        """`key`: the training step's random key; each block gets its own split of it (routers
        with training noise use it; None = MLX's global RNG, and no noise in eval mode anyway).
        `stats=False` (sampling, eval mode): aux is {} and the MoE layers route lean, building no
        losses or statistics (tinymoe.nn.moe); the logits are those of a call with stats.
        `domains_BL`: each token's data domain id (a run with domain experts, tinymoe.nn.domain):
        hard mode routes within the domain's experts, and aux gains "domain_loss"."""
        x = self.embed(tokens_BL)
        domain = None
        if domains_BL is not None and getattr(self, "domain_routing", None) is not None:
            domain = self.domain_routing.token_masks(domains_BL)
        if not (stats or self.training):
            for i, block in enumerate(self.blocks):
                x, _ = block(x, caches[i] if caches else None, routing, None, False)
            return self.logits(x), {}
        keys = mx.random.split(key, len(self.blocks)) if key is not None else [None] * len(self.blocks)
        aux = {name: mx.array(0.0) for name in LAYER_LOSSES}  # summed over MoE layers
        aux.update({name: [] for name in LAYER_STATS})  # one entry per MoE layer
        if domain is not None:
            aux["domain_loss"] = mx.array(0.0)
        for i, block in enumerate(self.blocks):
            x, losses = self.checkpointed(i)(x, caches[i] if caches else None, routing, keys[i], domain=domain)
            if losses is not None:
                for name in LAYER_LOSSES:
                    aux[name] = aux[name] + losses[name]
                if domain is not None:
                    aux["domain_loss"] = aux["domain_loss"] + losses["domain_loss"]
                for name in LAYER_STATS:
                    aux[name].append(losses[name])
        return self.logits(x), aux

    def set_checkpointing(self, every: int) -> None:
        """Recompute every `every`th block in the backward pass (1: all of them; 0: none)."""
        self.checkpoint_every = every

    def checkpointed(self, i: int):
        """Block i, or in training with checkpointing on, block i as tinymoe.nn.model.checkpoint_block."""
        every = self.checkpoint_every
        if every and self.training and (i + 1) % every == 0:
            return checkpoint_block(self.blocks[i])
        return self.blocks[i]

    def logits(self, x):
        x = self.norm(x)
        return self.embed.as_linear(x) if self.cfg.tie_embeddings else self.lm_head(x)

    def make_caches(self) -> list[KVCache]:
        return [KVCache() for _ in self.blocks]


def checkpoint_block(block: Block):
    """`block` as an `mx.checkpoint`ed function: the forward keeps only the block's inputs and
    outputs, the backward runs the block again and differentiates that. Its weights are explicit
    inputs so their gradients flow through the checkpoint; the random key (and any domain masks)
    are closed over, not inputs: nothing differentiates a random draw, and the recomputation then
    draws the same noise, so a noisy router picks the same experts twice. (Training calls only:
    no KV cache.)"""
    def run(x, cache=None, routing=None, key=None, **extra):
        assert cache is None and routing is None, "activation checkpointing is for training calls"

        def inner(params, x):
            block.update(params)
            y, losses = block(x, None, None, key, **extra)
            return y, (losses if losses is not None else {})

        y, losses = mx.checkpoint(inner)(block.trainable_parameters(), x)
        return y, (losses if block.is_moe else None)
    return run


def count_params(model: Model) -> dict:
    """Total parameters, counted on the model, and those a token uses, by the one rule of
    tinymoe.router_registry.active_params (also the planner's and import_hf's): shared experts
    always count; of the routed experts, K (k_max for dynamic, factor x K on average for expert
    choice)."""
    from tinymoe.nn.quantize import param_count

    total = param_count(model)  # a quantized weight counts as the float weight it stands for
    moe = [block.moe for block in model.blocks if block.is_moe]
    per_expert = moe[0].experts.params_per_expert() if moe else 0
    return {"total": total, "active": active_params(model.cfg, total, per_expert)}
