"""User-facing errors.

Anything a user can cause by bad input (a missing file, an unknown preset, a broken checkpoint)
raises `TinyMoeError` with a one-line message that names the thing and the problem. The CLI turns
it into `error: <message>` on stderr and exit code 2; library callers can catch it.
"""


class TinyMoeError(Exception):
    """A problem with the user's input, reported in one line (exit code 2 from the CLI)."""


class CheckpointError(TinyMoeError):
    """A checkpoint directory that is missing, corrupt, or from an unsupported format version."""
