"""Shared test setup: a private token cache, small model builders, and the device markers.

The suite runs on whatever default device MLX picks (the GPU on a Mac or a CUDA machine, the CPU
elsewhere). A test that is about the CPU path is marked `cpu` and runs with the CPU as default
device wherever it is; a test that needs a GPU is marked `gpu`, runs with the GPU as default
device, and is skipped where there is none. Everything else must pass on both.
"""

import os
import tempfile

# Keep the token cache (and the kernels' first-use verdicts) of test runs out of ~/.cache.
os.environ.setdefault("TINYMOE_CACHE", tempfile.mkdtemp(prefix="tinymoe-test-cache-"))

import pytest  # noqa: E402


def gpu_available() -> bool:
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    return bool(mx.metal.is_available() or (cuda is not None and cuda.is_available()))


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu: runs with the CPU as MLX's default device (a test "
                            "about the CPU path: grouped dispatch, OpenBLAS, CPU-only dtypes)")
    config.addinivalue_line("markers", "gpu: needs a GPU default device (Metal or MLX's CUDA "
                            "build); skipped where there is none")


@pytest.fixture(autouse=True)
def _default_device(request):
    """Pin the default device for `cpu` and `gpu` tests, and restore it afterwards."""
    marks = {m.name for m in request.node.iter_markers()}
    if not marks & {"cpu", "gpu"}:
        yield
        return
    import mlx.core as mx

    if "gpu" in marks and not gpu_available():
        pytest.skip("needs a GPU (Metal, or MLX's CUDA build); this machine has none")
    before = mx.default_device()
    mx.set_default_device(mx.gpu if "gpu" in marks else mx.cpu)
    try:
        yield
    finally:
        mx.set_default_device(before)


@pytest.fixture
def debug_cfg():
    from tinymoe.config import load_preset

    model, _ = load_preset("debug")
    return model
