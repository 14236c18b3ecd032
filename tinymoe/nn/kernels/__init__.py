"""Fused kernels for the MoE hot path, each next to its pure-MLX reference.

`dispatch` holds the gather (token rows into expert-sorted order) and combine (gate-weighted sum
back to token order) ops; `sources` their kernel bodies (Metal, and CUDA twins), `references`
the plain-MLX meaning of each kernel, `launch` where and how kernels may run (a GPU default
device, on the GPU stream, every dtype in the template), and `trust` the first-use check that
must pass on the user's machine before they are used. Bodies are per-thread code (the gate
gradient adds one `simd_sum`), with no threadgroup memory, barriers or atomics, so the test suite
can compile the very same source text as C++ on a machine without a GPU and check it against the
references.
"""
