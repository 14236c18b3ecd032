"""The names a user may choose among, each written down once (no imports, no MLX).

The config validator, the planner, the library modules that implement each choice and the CLI's
`click.Choice` lists all read these tuples, so adding an optimizer or a dispatch backend cannot
leave one of them behind, and `tinymoe --help` can show the choices without importing MLX.
Router names live with the rest of the router knowledge in tinymoe.router_registry; Hugging Face
export architectures in tinymoe.interop.hf_config (also MLX-free).
"""

from __future__ import annotations

# The optimizers of tinymoe.optim.factory (docs/memory.md compares their state).
OPTIMIZERS = ("adamw", "sparse-adamw", "adafactor")
# Dtypes of the optimizer state; bfloat16 only for the lazy optimizers (sparse-adamw, adafactor).
OPTIMIZER_STATE_DTYPES = ("float32", "bfloat16")
# Parameter dtypes the planner knows the size of, with their bytes per element.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PARAM_DTYPES = tuple(DTYPE_BYTES)

# MoE dispatch backends of tinymoe.nn.dispatch; `auto` resolves to one of them by device.
DISPATCH_BACKENDS = ("dense", "gather", "grouped", "metal")
DISPATCH_CHOICES = ("auto", *DISPATCH_BACKENDS)
