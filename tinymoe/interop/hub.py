"""Where a source model lives: a local directory, or a Hugging Face hub repository id.

A path that exists is used as it is. A path that does not exist but reads as a local one (it
starts with `.`, `/` or `~`, has more than one `/`, or its first part is a local folder, as
`runs/dense` is once `runs/` exists) is "no such directory", never a hub lookup. Anything else
that looks like `owner/name` (optionally `owner/name@revision`) is fetched with `huggingface_hub.snapshot_download`, limited to the files
an import reads (config, safetensors, tokenizer files), into the hub's usual cache. Without
huggingface-hub, or offline, the error says so in one line.
"""

from __future__ import annotations

import re
from pathlib import Path

from tinymoe.errors import TinyMoeError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?")
ALLOW_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.txt", "*.tiktoken"]


def looks_like_repo_id(source: str) -> bool:
    """`owner/name[@revision]` whose owner is not a local folder: `runs/dense` with a `runs/`
    folder here is a mistyped local path, and sending it to the hub would only confuse."""
    if not _REPO_ID.fullmatch(source) or source.startswith((".", "/", "~")):
        return False
    return not Path(source.partition("/")[0]).is_dir()


def resolve_source(source: str) -> Path:
    """A local directory holding `source`: the path itself, or a downloaded hub snapshot."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TinyMoeError(f"{source}: not a directory")
        return path
    if not looks_like_repo_id(source):
        raise TinyMoeError(f"{source}: no such directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise TinyMoeError(f"{source}: no such directory (downloading hub repositories needs "
                           f"huggingface-hub: pip install 'tinymoe[hf]')") from None
    repo, _, revision = source.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=ALLOW_PATTERNS))
    except Exception as exc:  # hub errors, connection errors, offline mode: all one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TinyMoeError(f"{source}: no such local directory, and no Hugging Face hub repository of that "
                           f"name could be downloaded (offline? private or misspelled?): {first}") from None
