"""Entry point of the `tinymoe` command. Command modules import MLX inside their functions, so
`tinymoe --help` and argument errors never pay for loading MLX."""

from __future__ import annotations

import sys

import click

from tinymoe import __version__
from tinymoe.cli.doctor import doctor
from tinymoe.cli.eval import eval_cmd
from tinymoe.cli.export import export
from tinymoe.cli.finetune import finetune
from tinymoe.cli.import_cmd import import_cmd
from tinymoe.cli.inspect import inspect_cmd
from tinymoe.cli.plan import plan
from tinymoe.cli.plot import plot
from tinymoe.cli.probe import probe
from tinymoe.cli.quantize import quantize
from tinymoe.cli.route import route
from tinymoe.cli.sample import sample
from tinymoe.cli.selftest import selftest
from tinymoe.cli.sweep import sweep
from tinymoe.cli.compare import compare
from tinymoe.cli.teacher_cache import teacher_cache
from tinymoe.cli.train import train
from tinymoe.cli.upcycle import upcycle
from tinymoe.cli.validate import validate_cmd


# Click >= 8.2 reports a bare `tinymoe` as this UsageError; its help text is the right answer.
_HELP_ERRORS = getattr(click.exceptions, "NoArgsIsHelpError", ())


def one_line(message: str) -> str:
    """A possibly multi-line message as one line."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


class OneLineErrors(click.Group):
    """Click prints a usage error (unknown option, bad choice, missing argument, a value that is
    not an int) as four lines: usage, hint, blank, `Error: ...`. The promise of docs/errors.md is
    one `error: ...` line and exit 2 for every bad input, so the group runs click in
    non-standalone mode and reports every ClickException itself, in the format of UserError.
    `--help` and `--version` are click's `Exit(0)` and pass through unchanged."""

    def invoke(self, ctx):
        super().invoke(ctx)
        return None  # commands print their results; only ctx.exit(code) sets the exit status

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:  # a library caller wants click's exceptions
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except _HELP_ERRORS as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            message = one_line(exc.format_message()) or type(exc).__name__
            ctx = getattr(exc, "ctx", None)
            if isinstance(exc, click.UsageError) and ctx is not None:
                message += f" (see '{ctx.command_path} --help')"
            click.echo(f"error: {message}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C outside a command's own handling
            click.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(code or 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tinymoe")
def cli():
    """Train, sample, evaluate and inspect small Mixture-of-Experts language models.

    \b
    Quick start:
      tinymoe train --preset tiny --moe-experts 8 --moe-topk 2 --steps 300 --out runs/tiny-moe
      tinymoe sample runs/tiny-moe --prompt "In the beginning"
      tinymoe eval runs/tiny-moe --json
      tinymoe inspect runs/tiny-moe
    """


for command in (train, sample, eval_cmd, inspect_cmd, doctor, route, plot, validate_cmd, selftest,
                upcycle, export, import_cmd, plan, quantize, finetune, teacher_cache, sweep, compare,
                probe):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="tinymoe")


if __name__ == "__main__":
    main()
