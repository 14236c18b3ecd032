"""The model: attention, MoE layer, routers, dispatch backends and their kernels."""
