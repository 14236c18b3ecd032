"""Helpers shared by the commands: user errors as one line + exit 2, JSON output."""

from __future__ import annotations

import functools
import math
import os
import sys

import click

from tinymoe.config import MAX_SEED
from tinymoe.errors import TinyMoeError
from tinymoe.jsonutil import dumps


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
    """Strict JSON: a NaN or infinite number is printed as null (tinymoe.jsonutil)."""
    click.echo(dumps(obj, indent=2))


# ----------------------------------------------------------------------------- flag types
# Values are checked where they enter: click reports a bad one as one `error:` line (cli/main.py).


class FiniteFloat(click.FloatRange):
    """A float in a range that is also finite: click's FloatRange lets `nan` through (every
    comparison with NaN is false) and `inf` whenever there is no upper bound."""

    name = "float"

    def _describe_range(self) -> str:
        # click would print "[x<=None]" in --help for a range without bounds
        return "" if self.min is None and self.max is None else super()._describe_range()

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


FINITE = FiniteFloat()
# Seeds: what a TOML preset can hold (a signed 64-bit integer) and mx.random.seed / numpy accept.
SEED = click.IntRange(0, MAX_SEED)


class OutDir(click.ParamType):
    """A directory to create or fill: refuses, before any work, a path that exists and is not a
    directory (`--out /dev/null`, a file) or a directory this user cannot write."""

    name = "directory"

    def convert(self, value, param, ctx):
        text = os.fspath(value)
        flag = param.opts[0] if param is not None and param.opts else "--out"
        if not text:
            raise UserError(f"{flag}: the path is empty")
        # The wording of tinymoe.io.folders, which checks the same for library callers.
        if os.path.exists(text) and not os.path.isdir(text):
            raise UserError(f"{text}: exists and is not a folder; {flag} needs a folder to create")
        if os.path.isdir(text) and not os.access(text, os.W_OK | os.X_OK):
            raise UserError(f"{text}: the folder is not writable")
        return text
