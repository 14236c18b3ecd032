"""`tinymoe import`: a Hugging Face-format model directory -> a tinymoe checkpoint."""

from __future__ import annotations

import click

from tinymoe.cli.common import OutDir, print_json, user_errors


@click.command("import")
@click.argument("source")
@click.option("--out", type=OutDir(), required=True, help="Run directory to create.")
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="Context length to record (default: max_position_embeddings).")
@click.option("--overwrite", is_flag=True, help="Replace an existing tinymoe run in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def import_cmd(source, out, context, overwrite, as_json):
    """Bring the Hugging Face model SOURCE into tinymoe as a checkpoint in --out.

    SOURCE is a local directory (config.json, model*.safetensors, tokenizer files) or a hub
    repository id. Supported: mixtral, qwen2_moe, ernie4_5_moe (softmax top-k MoE), glm4_moe
    (sigmoid scores with a selection bias: router sigmoid-bias) and the dense llama and qwen2. The result samples, evaluates, inspects and trains like any checkpoint
    (tinymoe train --init OUT --out RUN).
    """
    from pathlib import Path

    from tinymoe.interop.import_hf import import_hf

    report = import_hf(source, Path(out), context, overwrite)
    if as_json:
        print_json(report)
        return
    kind = (f"MoE {report['moe_experts']} experts top-{report['moe_topk']} in layers {report['moe_layers']}, "
            f"router norm {'on' if report['router_norm'] else 'off'}" if report["moe_experts"] > 1 else "dense")
    click.echo(f"architecture {report['architecture']}: {kind}")
    click.echo(f"params       {report['params']['total']:,} total / {report['params']['active']:,} active per token")
    click.echo(f"tokenizer    {report['tokenizer']}")
    click.echo(f"wrote        {report['checkpoint']}")
