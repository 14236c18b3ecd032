"""Fused kernels for the MoE hot path, each next to its pure-MLX reference.

`dispatch` holds the gather (token rows into expert-sorted order) and combine (gate-weighted sum
back to token order) ops. Every kernel body is plain per-thread code with no threadgroup memory,
barriers or atomics, so the test suite can compile the very same source text as C++ on a machine
without Metal and check it against the references.
"""
