"""`tinymoe teacher-cache`: a teacher's predictions over a run's training data, cached for distillation."""

from __future__ import annotations

import click

from tinymoe.cli.common import SEED, FiniteFloat, OutDir, UserError, print_json, user_errors
from tinymoe.config import MAX_INT
from tinymoe.names import TEACHER_CACHE_DTYPES, TEACHER_CACHE_METHODS


@click.command("teacher-cache")
@click.argument("teacher")
@click.option("--data", multiple=True, help="The student's training data, as train --data takes it (repeatable). "
              "Default: the bundled corpus.")
@click.option("--top-k", "k", type=click.IntRange(1, MAX_INT), default=32, show_default=True,
              help="Predictions kept per position: the K most likely ids (topk) or K draws (sample).")
@click.option("--method", type=click.Choice(TEACHER_CACHE_METHODS), default="topk", show_default=True,
              help="topk: the K most likely ids and the rest mass; sample: K ids drawn from the teacher "
                   "(unbiased; docs/distill.md).")
@click.option("--dtype", type=click.Choice(TEACHER_CACHE_DTYPES), default="float16", show_default=True,
              help="Dtype of the stored log-probabilities.")
@click.option("--val-fraction", type=FiniteFloat(0, 1, max_open=True), default=0.1, show_default=True,
              help="The student's validation split (only its training part is cached).")
@click.option("--left-context", type=click.IntRange(0, MAX_INT), default=None,
              help="Tokens of overlap between the teacher's chunks: the least left context a position gets "
                   "(default: a quarter of the teacher's context).")
@click.option("--context", type=click.IntRange(1, MAX_INT), default=None,
              help="The student's context, when the data holds instruction examples (they are cut to it); "
                   "default the teacher's.")
@click.option("--tokenizer", default=None, help="The student's tokenizer, to check: it must be the teacher's.")
@click.option("--batch-chunks", type=click.IntRange(1, 4096), default=8, show_default=True,
              help="Teacher chunks per forward pass (memory: tinymoe plan --mode teacher-cache).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="--method sample: seed of the draws.")
@click.option("--out", type=OutDir(), required=True, help="Cache folder to create (or to finish building).")
@click.option("--overwrite", is_flag=True, help="Replace a teacher cache in --out.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def teacher_cache(teacher, data, k, method, dtype, val_fraction, left_context, context, tokenizer, batch_chunks, seed,
                  out, overwrite, quiet, as_json):
    """Run the checkpoint TEACHER over the training data once and cache its predictions in --out.

    The cache holds, for every position of the training split the student will draw its windows
    from, the teacher's top-K ids and log-probabilities plus the rest mass (or K draws), read
    memory-mapped by `tinymoe train --teacher-cache OUT`. An interrupted build continues where it stopped
    when the same command is run again.

    \b
    Then:  tinymoe train ... --data SAME --teacher-cache OUT --distill-weight 0.5 --out RUN
    """
    from tinymoe.train.teacher_cache import CacheRequest, build_teacher_cache

    req = CacheRequest(teacher=teacher, out=out, data=list(data), k=k, method=method, dtype=dtype,
                       val_fraction=val_fraction, left_context=left_context, batch_chunks=batch_chunks, seed=seed,
                       context=context, tokenizer=tokenizer, overwrite=overwrite)
    try:
        summary = build_teacher_cache(req, progress=not quiet)
    except KeyboardInterrupt:
        raise UserError(f"interrupted; run the same command again to continue building {out}") from None
    if as_json:
        print_json(summary)
    elif not quiet:
        click.echo(f"cache        {summary['out']}: {summary['tokens']:,} positions, {summary['method']} "
                   f"k={summary['k']}, {summary['dtype']}")
        click.echo(f"storage      {summary['bytes_per_token']} bytes/token, {summary['bytes'] / 2**20:.1f} MiB")
        click.echo(f"build time   {summary['build_seconds']:.1f} s")
