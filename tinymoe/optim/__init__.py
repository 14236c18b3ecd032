"""Optimizers: AdamW and the lean per-expert sparse-adamw and adafactor."""
