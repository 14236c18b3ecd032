"""`tinymoe export`: a checkpoint as a Hugging Face-format directory (mlx-lm, transformers)."""

from __future__ import annotations

import click

from tinymoe.cli.common import OutDir, print_json, user_errors
from tinymoe.interop.hf_config import DENSE_ARCHS, MOE_ARCHS

ARCH_CHOICES = ["auto", *MOE_ARCHS, *DENSE_ARCHS]  # the table of tinymoe.interop.hf_config (no MLX)


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["hf"]), default="hf", show_default=True,
              help="Output format: a Hugging Face model directory.")
@click.option("--arch", type=click.Choice(ARCH_CHOICES), default="auto", show_default=True,
              help="Target architecture; auto picks the first whose routing is identical to the model's.")
@click.option("--out", type=OutDir(), required=True, help="Directory to write.")
@click.option("--check/--no-check", default=None,
              help="Load the export with mlx-lm and compare logits (default: when mlx-lm is installed).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier tinymoe export in --out (only a folder tinymoe created as an export).")
@click.option("--fuse", is_flag=True, help="A fine-tuned checkpoint (tinymoe finetune): merge its adapters into "
              "the base (a quantized base is dequantized) and export the result.")
@click.option("--requantize", is_flag=True, help="With --fuse on a quantized base: quantize the merged model "
              "again as the base was.")
@click.option("--base", type=click.Path(), default=None, help="With --fuse: the base checkpoint, when it is no "
              "longer where the fine-tune found it (its digest must match).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def export(checkpoint, fmt, arch, out, check, fuse, requantize, base, overwrite, as_json):
    """Write CHECKPOINT as a Hugging Face-format model directory in --out.

    \b
    Architectures (chosen so inference routing is identical, else refused with the reason):
      mixtral       softmax top-k, renormalised; every layer MoE; no shared experts
      ernie4_5_moe  softmax top-k, renormalised; dense layers allowed; shared experts
      qwen2_moe     softmax top-k, not renormalised (--no-router-norm, switch); every layer MoE
      glm4_moe      sigmoid-bias router (DeepSeek-V3 style); first N layers dense; shared experts
      llama, qwen2  dense models (qwen2 when the model has q/k/v biases)
    Routers topk, jitter, noisy, smart and switch export by their inference function;
    expert-choice and dynamic are refused. The directory loads with mlx_lm.load /
    mlx_lm.generate and transformers.
    """
    from pathlib import Path

    from tinymoe.interop.export import export_hf
    from tinymoe.run.readers import read_latest

    report = read_latest(checkpoint, lambda c: export_hf(c, Path(out), arch, overwrite, check, fuse, requantize, base))
    if as_json:
        print_json(report)
        return
    click.echo(f"checkpoint   {report['checkpoint']}")
    click.echo(f"architecture {report['architecture']} ({report['tensors']} tensors)")
    match = {True: "encodes identically", False: "WARNING: encodes differently", None: "not checked"}
    click.echo(f"tokenizer    {report['tokenizer']} -> tokenizer.json ({match[report['tokenizer_matches']]})")
    if "fused_max_abs_logit_diff" in report:
        click.echo(f"fused        adapters merged; max |logit diff| vs the adapted model = "
                   f"{report['fused_max_abs_logit_diff']:.3g}")
    if "mlx_lm_max_abs_logit_diff" in report:
        click.echo(f"mlx-lm check max |logit diff| = {report['mlx_lm_max_abs_logit_diff']:.3g}")
    click.echo(f"wrote        {report['out']}")
