"""Analysis: routing statistics, per-token routing views, plots."""
