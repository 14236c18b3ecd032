"""`tinymoe export --format hf`: a checkpoint as a Hugging Face-format model directory.

The directory holds config.json (an existing architecture whose routing is identical, chosen by
hf_config), model.safetensors (HF tensor names, one tensor per expert, the checkpoint's dtype)
and tokenizer.json + tokenizer_config.json (hf_tokenizer). It loads with
`mlx_lm.load` and with transformers' AutoModelForCausalLM.

When mlx-lm is installed the export checks itself: it loads the directory with mlx-lm and
reports the largest absolute difference between mlx-lm's logits and tinymoe's on the same tokens.
"""

from __future__ import annotations

from pathlib import Path

from tinymoe.errors import TinyMoeError
from tinymoe.jsonutil import dumps


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
              check: bool | None = None) -> dict:
    """Write `checkpoint` to `out` as `arch` (None/"auto": the first that matches exactly).

    check: compare with mlx-lm (None = when mlx-lm is importable). Returns a report dict."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from tinymoe.interop.hf_config import choose_arch, hf_config_from_model
    from tinymoe.tokenizers.hf import write_tokenizer_files
    from tinymoe.interop.hf_weights import to_hf
    from tinymoe.io.folders import check_output, staged_output
    from tinymoe.io.loader import load_model

    check_output(Path(out), "export", overwrite, checkpoint)  # refuse before the slow part
    model, manifest, tokenizer, ckpt = load_model(checkpoint)
    cfg = model.cfg
    arch = choose_arch(cfg, arch)
    hf = to_hf(cfg, dict(tree_flatten(model.parameters())), arch)
    out = Path(out)
    with staged_output(out, "export", overwrite, checkpoint) as tmp:
        config = hf_config_from_model(cfg, arch)
        (tmp / "config.json").write_text(dumps(config, indent=1))
        mx.save_safetensors(str(tmp / "model.safetensors"), hf, metadata={"format": "pt"})
        tok_report = write_tokenizer_files(tokenizer, tmp, cfg.context)
    report = {"out": str(out), "checkpoint": str(ckpt), "architecture": arch, "tensors": len(hf),
              "tokenizer": tok_report["kind"], "tokenizer_matches": tok_report["matches"]}
    if check is None:
        import importlib.util

        check = importlib.util.find_spec("mlx_lm") is not None
    if check:
        report["mlx_lm_max_abs_logit_diff"] = check_with_mlx_lm(model, out)
    return report


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
    return max_abs_diff(tinymoe_logits(model, tokens), theirs(tokens))
