"""Loading a checkpoint by path: thin entry points over the one reader (tinymoe.io.reader).

Everything is checked before anything is handed out (see the reader for what each path
verifies); a failed check raises one `CheckpointError`, and nothing is half-loaded. These names
are the library's stable API: `load_model` (sample, eval, inspect, route, export),
`load_training_state` (train --resume) and `open_checkpoint` (the checked first half of a load).
"""

from __future__ import annotations

from pathlib import Path

from tinymoe.io.reader import model_config_of, model_for_index  # noqa: F401  (re-exported)


def load_model(path: str | Path, dispatch: str = "auto", verify_hashes: bool = True):
    """(model, manifest, tokenizer, checkpoint dir) from a checkpoint or run directory."""
    from tinymoe.io.reader import open_checkpoint as open_reader

    return open_reader(path, dispatch).load_model(verify_hashes)


def open_checkpoint(path: str | Path, dispatch: str = "auto"):
    """(checkpoint dir, manifest, model config, model with unloaded weights), all checked
    against each other."""
    from tinymoe.io.reader import open_checkpoint as open_reader

    reader = open_reader(path, dispatch)
    return reader.ckpt, reader.manifest, reader.cfg, reader.model


def load_training_state(path: str | Path) -> dict:
    """{"manifest", "ckpt", "weights", "optimizer", "tokenizer"} for resuming, all checked:
    resumable manifest, every file hashed, weights against the model config, the optimizer state
    complete for the saved optimizer, no NaN or inf anywhere."""
    from tinymoe.io.reader import CheckpointReader

    # Not open_checkpoint: a manifest that is not resumable should say so before anything else.
    reader = CheckpointReader(path)
    return reader.training_state()
