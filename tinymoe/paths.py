"""Where tinymoe keeps what it can rebuild: the cache folder (token caches, kernel verdicts).

`$TINYMOE_CACHE`, else `~/.cache/tinymoe`. One rule for every layer that caches something, so a
user (or a test) moves all of it with one variable.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("TINYMOE_CACHE", Path.home() / ".cache" / "tinymoe"))
