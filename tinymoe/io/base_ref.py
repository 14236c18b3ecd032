"""Which base model a set of adapters belongs to: a digest of the base checkpoint's weights.

A fine-tune's checkpoint (tinymoe.run.finetune) holds only its adapters; its manifest's
`finetune.base` names the base checkpoint by path and by `digest`, the sha256 of the base's model
config, quantization record and the sha256 of every weight tensor (from the base's manifest, whose
tensor hashes the reader verifies against the files when it loads them). Loading the adapters
onto a checkpoint of another digest is refused: adapters mean nothing on other weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tinymoe.io.manifest import entries_in
from tinymoe.jsonutil import dumps

WEIGHT_FILES = ("model.safetensors", "experts.safetensors")


def base_digest(manifest: dict) -> str:
    tensors = sorted((e["name"], e["sha256"]) for f in WEIGHT_FILES for _, e in entries_in(manifest, f))
    identity = {"model": manifest.get("model"), "quantization": manifest.get("quantization"), "tensors": tensors}
    return hashlib.sha256(dumps(identity, sort_keys=True).encode()).hexdigest()


def base_reference(ckpt: Path, manifest: dict) -> dict:
    """The `finetune.base` record of adapters trained on the checkpoint `ckpt`."""
    return {"path": str(Path(ckpt).resolve()), "digest": base_digest(manifest), "step": manifest.get("step"),
            "quantization": manifest.get("quantization")}
