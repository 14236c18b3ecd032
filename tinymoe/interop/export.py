"""`tinymoe export --format hf`: a checkpoint as a Hugging Face-format model directory.

The directory holds config.json (an existing architecture whose routing is identical, chosen by
hf_config), model.safetensors (HF tensor names, one tensor per expert, the checkpoint's dtype;
a quantized checkpoint in mlx-lm's quantized layout, `quantization` in config.json)
and tokenizer.json + tokenizer_config.json (hf_tokenizer). It loads with
`mlx_lm.load` and with transformers' AutoModelForCausalLM.

When mlx-lm is installed the export checks itself: it loads the directory with mlx-lm and
reports the largest absolute difference between mlx-lm's logits and tinymoe's on the same tokens.
"""

from __future__ import annotations

from pathlib import Path

from tinymoe.errors import TinyMoeError
from tinymoe.jsonutil import dumps


# Architectures whose mlx-lm loader cannot read a quantized export (checked with mlx-lm 0.32).
QUANTIZED_UNREADABLE = {
    "ernie4_5_moe": "mlx-lm stacks only the float '.weight' of its per-expert tensors, not '.scales'/'.biases' "
                    "(export the float checkpoint, or choose --arch mixtral when the model allows it)",
}


def probe_tokens(vocab_size: int, context: int, seed: int = 0, batch: int = 2, length: int = 48):
    """A fixed batch of random token ids (B, L) for comparing two implementations' logits."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(0, vocab_size, size=(batch, min(length, context))).astype(np.int32))


def tinymoe_logits(model, tokens):
    import mlx.core as mx

    model.train(False)
    logits, _ = model(tokens)
    mx.eval(logits)
    return logits.astype(mx.float32)


def max_abs_diff(a, b) -> float:
    import mlx.core as mx

    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item())


def export_hf(checkpoint: str, out: Path, arch: str | None = None, overwrite: bool = False,
              check: bool | None = None, fuse: bool = False, requantize: bool = False,
              base: str | None = None) -> dict:
    """Write `checkpoint` to `out` as `arch` (None/"auto": the first that matches exactly).

    check: compare with mlx-lm (None = when mlx-lm is importable). fuse: a fine-tuned checkpoint's
    adapters merged into its base (read from `base` when given), re-quantized as the base was with
    `requantize`. Returns a report dict."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from tinymoe.interop.hf_config import choose_arch, hf_config_from_model
    from tinymoe.tokenizers.hf import write_tokenizer_files
    from tinymoe.interop.hf_weights import to_hf
    from tinymoe.io.folders import check_output, staged_output
    from tinymoe.io.reader import open_checkpoint

    check_output(Path(out), "export", overwrite, checkpoint)  # refuse before the slow part
    reader = open_checkpoint(checkpoint, "auto")
    if "finetune" not in reader.manifest and (fuse or requantize or base):
        raise TinyMoeError(f"--fuse, --requantize and --base apply to fine-tuned checkpoints; {reader.ckpt} holds "
                           f"no adapters")
    if "finetune" in reader.manifest and not fuse:
        raise TinyMoeError(f"{reader.ckpt} holds adapters on a base model; pass --fuse to merge them into it")
    reader.base_path = base
    model, manifest, tokenizer, ckpt = reader.load_model()
    fused_diff = None
    if fuse:
        model, fused_diff = _fuse(model, requantize)
    cfg = model.cfg
    arch = choose_arch(cfg, arch)
    if model.__dict__.get("quantization") and arch in QUANTIZED_UNREADABLE:
        raise TinyMoeError(f"{ckpt}: a quantized model cannot be exported as {arch}: {QUANTIZED_UNREADABLE[arch]}")
    hf = to_hf(cfg, dict(tree_flatten(model.parameters())), arch)
    out = Path(out)
    with staged_output(out, "export", overwrite, checkpoint) as tmp:
        config = hf_config_from_model(cfg, arch)
        from tinymoe.nn.precision import model_dtype

        config["torch_dtype"] = model_dtype(model)  # the checkpoint's training dtype (routers stay float32)
        record = model.__dict__.get("quantization")
        if record:  # mlx-lm's layout: quantized layers carry .scales/.biases, the rest stay float
            config["quantization"] = {"group_size": record["group_size"], "bits": record["bits"], "mode": "affine"}
        (tmp / "config.json").write_text(dumps(config, indent=1))
        mx.save_safetensors(str(tmp / "model.safetensors"), hf, metadata={"format": "pt"})
        tok_report = write_tokenizer_files(tokenizer, tmp, cfg.context)
    report = {"out": str(out), "checkpoint": str(ckpt), "architecture": arch, "tensors": len(hf),
              "tokenizer": tok_report["kind"], "tokenizer_matches": tok_report["matches"]}
    if fused_diff is not None:
        report["fused_max_abs_logit_diff"] = fused_diff
    if check is None:
        import importlib.util

        check = importlib.util.find_spec("mlx_lm") is not None
    if check:
        report["mlx_lm_max_abs_logit_diff"] = check_with_mlx_lm(model, out)
    return report


def _fuse(tuned, requantize: bool):
    """(the plain model with the adapters merged in, its largest |logit difference| from the
    adapted model on a probe batch: float rounding, or the re-quantization's error)."""
    from tinymoe.nn.lora import fused_model

    fused = fused_model(tuned, requantize)
    tokens = probe_tokens(tuned.cfg.vocab_size, tuned.cfg.context)
    return fused, max_abs_diff(tinymoe_logits(tuned, tokens), tinymoe_logits(fused, tokens))


def check_with_mlx_lm(model, out: Path) -> float:
    """Largest |logit difference| between mlx-lm on the exported directory and tinymoe."""
    try:
        import mlx_lm
    except ImportError:
        raise TinyMoeError("--check needs mlx-lm (pip install 'tinymoe[hf]')") from None
    cfg = model.cfg
    tokens = probe_tokens(cfg.vocab_size, cfg.context)
    try:
        theirs, _ = mlx_lm.load(str(out))
    except Exception as exc:  # mlx-lm raises ValueError/KeyError/... for a directory it rejects
        raise TinyMoeError(f"{out}: mlx-lm cannot load the export: {str(exc).splitlines()[0]}") from None
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if mx.default_device() == mx.cpu and any(a.dtype in (mx.bfloat16, mx.float16)
                                             for _, a in tree_flatten(model.parameters())):
        # MLX's CPU gather_mm (mlx-lm's experts) is float32 only: compare both upcast, which
        # still checks every tensor's name, layout and value.
        theirs.set_dtype(mx.float32)
        model.set_dtype(mx.float32)
    return max_abs_diff(tinymoe_logits(model, tokens), theirs(tokens))
