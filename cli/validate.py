"""`tinymoe validate`: check a checkpoint against its manifest and model config.

Exit codes: 0 valid, 1 invalid (including a path that is no checkpoint at all), 2 bad usage.
"""

from __future__ import annotations

import click

from tinymoe.cli.common import print_json, user_errors


@click.command("validate")
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True,
              help="Print {checkpoint, step, valid, problems, files, tensors} as JSON.")
@click.pass_context
@user_errors
def validate_cmd(ctx, checkpoint, as_json):
    """Check CHECKPOINT (a checkpoint or run directory): files, sizes, sha256 hashes, safetensors
    headers, tensor shapes and dtypes against the manifest and the model config.

    Prints one line per problem and exits 1 if there is any, 0 if the checkpoint is valid.
    """
    from tinymoe.io.validate import validate_checkpoint

    report = validate_checkpoint(checkpoint)
    if as_json:
        print_json(report)
    elif report["valid"]:
        click.echo(f"ok: {report['checkpoint']} (step {report['step']}; {report['files']} files, "
                   f"{report['tensors']} tensors checked)")
    else:
        for problem in report["problems"]:
            click.echo(problem)
        click.echo(f"invalid: {len(report['problems'])} problem(s)", err=True)
    ctx.exit(0 if report["valid"] else 1)
