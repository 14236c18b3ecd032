"""Shared test setup: a private token cache, and small model builders."""

import os
import tempfile

# Keep the token cache of test runs out of the user's ~/.cache.
os.environ.setdefault("TINYMOE_CACHE", tempfile.mkdtemp(prefix="tinymoe-test-cache-"))

import pytest  # noqa: E402


@pytest.fixture
def debug_cfg():
    from tinymoe.config import load_preset

    model, _ = load_preset("debug")
    return model
