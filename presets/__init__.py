"""Training presets as TOML data files (`[model]` and `[train]` tables); see tinymoe.config."""
