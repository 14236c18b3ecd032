"""Training: the loop, one step, schedule, evaluation, health monitor, progress bar."""
