"""Check a checkpoint completely, without loading a model: `tinymoe validate`.

`validate_checkpoint` asks the checkpoint reader (tinymoe.io.reader) for every problem any
loading path would refuse the checkpoint for, rather than stopping at the first: the manifest
(JSON, format version, structure), each listed file (present, size, sha256), each safetensors
header (parses, entries sane, agrees with the manifest's dtype, shape and offsets), each
tensor's and each expert's own sha256, the weights against the model config (names and shapes,
computed from MLX's lazily built model without allocating it) and their dtypes, the optimizer
state against what the train config's optimizer keeps for every trainable weight, NaN or inf in
any weight or optimizer tensor, the train config, and the tokenizer against the vocabulary. So
a checkpoint that validates is one that `sample`, `eval` and `train --resume` load.

Every problem is one line that starts with the file it is about. A path that is not a checkpoint
at all is a problem like any other (the command then exits 1, not 2): the question asked was "is
this a valid checkpoint?" and the answer is no.
"""

from __future__ import annotations

from pathlib import Path

from tinymoe.errors import CheckpointError
from tinymoe.io.reader import CheckpointReader


def validate_checkpoint(path: str | Path) -> dict:
    """{"checkpoint", "step", "valid", "problems": [one line each], "files", "tensors"}."""
    report = {"checkpoint": None, "step": None, "valid": False, "problems": [], "files": 0, "tensors": 0}
    try:
        reader = CheckpointReader(path)
    except CheckpointError as exc:
        report["problems"].append(str(exc))
        return report
    manifest = reader.manifest
    report.update(checkpoint=str(reader.ckpt), step=manifest["step"],
                  files=len(manifest["files"]), tensors=len(manifest["tensors"]))
    report["problems"] = reader.problems()
    report["valid"] = not report["problems"]
    return report
