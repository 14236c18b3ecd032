"""Inference: token sampling and expert offloading."""
