"""Where a source model lives: a local directory, or a Hugging Face hub repository id.

A path that exists is used as it is. Anything else that looks like `owner/name` (optionally
`owner/name@revision`) is fetched with `huggingface_hub.snapshot_download`, limited to the files
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
    return bool(_REPO_ID.fullmatch(source)) and not source.startswith((".", "/", "~"))


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
        raise TinyMoeError(f"{source}: not a local directory, and downloading it from the Hugging Face "
                           f"hub failed (offline? private or misspelled repository?): {first}") from None
