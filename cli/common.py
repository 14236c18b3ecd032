"""Helpers shared by the commands: user errors as one line + exit 2, JSON output."""

from __future__ import annotations

import functools
import json
import sys

import click

from tinymoe.errors import TinyMoeError


class UserError(click.ClickException):
    """Shown as `error: <message>` with exit code 2, never a traceback."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


def user_errors(fn):
    """Turn the library's TinyMoeError (and a vanished stdout) into clean exits."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TinyMoeError as exc:
            raise UserError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        except BrokenPipeError:  # `tinymoe sample ... | head`
            sys.stderr.close()
            sys.exit(0)

    return wrapper


def print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))
