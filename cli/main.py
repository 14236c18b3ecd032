"""Entry point of the `tinymoe` command. Command modules import MLX inside their functions, so
`tinymoe --help` and argument errors never pay for loading MLX."""

from __future__ import annotations

import click

from tinymoe import __version__
from tinymoe.cli.doctor import doctor
from tinymoe.cli.eval import eval_cmd
from tinymoe.cli.export import export
from tinymoe.cli.import_cmd import import_cmd
from tinymoe.cli.inspect import inspect_cmd
from tinymoe.cli.plan import plan
from tinymoe.cli.plot import plot
from tinymoe.cli.route import route
from tinymoe.cli.sample import sample
from tinymoe.cli.selftest import selftest
from tinymoe.cli.train import train
from tinymoe.cli.upcycle import upcycle
from tinymoe.cli.validate import validate_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
                upcycle, export, import_cmd, plan):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="tinymoe")


if __name__ == "__main__":
    main()
