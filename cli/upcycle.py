"""`tinymoe upcycle`: a dense model (tinymoe or Hugging Face Llama/Qwen2) -> an MoE checkpoint."""

from __future__ import annotations

import click

from tinymoe.cli.common import SEED, FiniteFloat, OutDir, print_json, user_errors


@click.command()
@click.argument("source")
@click.option("--moe-experts", "experts", type=int, required=True, help="Experts per MoE layer (E >= 2).")
@click.option("--moe-topk", "topk", type=int, required=True, help="Experts each token is routed to (K).")
@click.option("--shared-experts", type=click.IntRange(min=0), default=0, show_default=True,
              help="Always-active shared experts, also initialised from the dense FFN (the shared and the "
              "routed part each start with half of its output).")
@click.option("--drop-fraction", type=FiniteFloat(0.0, 1.0), default=0.0, show_default=True,
              help="Drop-Upcycling: fraction of each expert's hidden units re-initialised (0 = exact copies).")
@click.option("--every-n", "every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Make every Nth layer MoE (layers N-1, 2N-1, ...); the others stay dense.")
@click.option("--first-dense", type=click.IntRange(min=0), default=0, show_default=True,
              help="Keep the first N layers dense.")
@click.option("--router-norm/--no-router-norm", default=True, show_default=True,
              help="Renormalise the top-k gates; needed for the upcycled model to start equal to the dense one.")
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="Context length to record (default: the source's; for HF sources max_position_embeddings).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for routers and re-initialised units.")
@click.option("--out", type=OutDir(), required=True, help="Run directory to create.")
@click.option("--overwrite", is_flag=True, help="Replace an existing tinymoe run in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def upcycle(source, experts, topk, shared_experts, drop_fraction, every, first_dense, router_norm, context,
            seed, out, overwrite, as_json):
    """Turn the dense model SOURCE into a Mixture-of-Experts checkpoint in --out.

    SOURCE is a dense tinymoe checkpoint or run directory, a local Hugging Face directory of a
    Llama or Qwen2 model (config.json, *.safetensors, tokenizer files), or a hub repository id.
    Each chosen FFN becomes E experts copied from it, with a fresh router; the tokenizer comes
    along. The command compares the logits of both models on a fixed batch and prints the
    largest difference (float32 noise when --drop-fraction is 0 and gates are renormalised).

    \b
    Continue training with:  tinymoe train --init OUT --out RUN   (or: tinymoe train --resume OUT)
    """
    from pathlib import Path

    from tinymoe.interop.upcycle import upcycle as run_upcycle

    report = run_upcycle(source, Path(out), experts, topk, every, first_dense, drop_fraction, shared_experts,
                         router_norm, seed, context, overwrite)
    if as_json:
        print_json(report)
        return
    check = report["identity_check"]
    click.echo(f"source       {report['source']} ({report['source_architecture']}, tokenizer {report['tokenizer']})")
    shared = f" + {shared_experts} shared" if shared_experts else ""
    click.echo(f"MoE layers   {report['moe_layers']}: {experts} experts{shared}, top-{topk}, "
               f"drop fraction {drop_fraction}, router norm {'on' if router_norm else 'off'}")
    click.echo(f"params       {report['params']['total']:,} total / {report['params']['active']:,} active per token")
    verdict = ("float32 noise: identical" if check["within_float32_noise"] else
               "differs, as expected" if not report["identity_expected"] else "NOT identical")
    click.echo(f"check        max |logit diff| vs the dense model = {check['max_abs_logit_diff']:.3g} "
               f"over {check['tokens']} tokens (max |logit| {check['max_abs_logit']:.3g}): {verdict}")
    click.echo(f"wrote        {report['checkpoint']}")
    click.echo(f"next         tinymoe train --init {out} --out RUN --steps N")
