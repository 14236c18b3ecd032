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
# Mixed precision (tinymoe.nn.precision): the training dtype of weights and compute, and the loss
# scaling float16 needs (auto: dynamic for float16, none otherwise).
TRAIN_DTYPES = PARAM_DTYPES
LOSS_SCALES = ("auto", "dynamic", "none")

# MoE dispatch backends of tinymoe.nn.dispatch; `auto` resolves to one of them by device.
DISPATCH_BACKENDS = ("dense", "gather", "grouped", "metal")
DISPATCH_CHOICES = ("auto", *DISPATCH_BACKENDS)

# What the language-model loss is computed over: every token, or only the target part of
# instruction examples (tinymoe.data.instruct).
LOSS_ON = ("all", "target")
# Parameter groups a training stage may train (tinymoe.stages.group_of says which weight is in which).
PARAM_GROUPS = ("router", "experts", "shared", "attention", "ffn", "embeddings", "all")
# What a teacher cache stores per position (tinymoe.data.teacher_cache): the teacher's top-k ids
# and the rest mass, or ids drawn from the teacher (unbiased, importance-weighted); the dtype of
# the stored log-probabilities.
TEACHER_CACHE_METHODS = ("topk", "sample")
TEACHER_CACHE_DTYPES = ("float16", "float32")
# What low-rank adapters may be attached to when fine-tuning (tinymoe.nn.lora).
LORA_TARGETS = ("attention", "experts", "shared", "ffn", "router")
