"""tinymoe: train, sample, evaluate and inspect small Mixture-of-Experts language models with MLX.

Importing the package preloads a fast BLAS on Linux before MLX is imported (see `backend`), and
nothing else: MLX itself is imported by the modules that need it, so the CLI starts instantly.
"""

from tinymoe import backend as _backend

_backend.setup()

__version__ = "0.1.0"
