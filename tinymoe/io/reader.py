"""The one checkpoint reader: resolve, manifest, config and files checked once, then served.

`open_checkpoint(path)` resolves a checkpoint or run directory (tinymoe.io.checkpoint.resolve),
reads the structure-checked manifest (tinymoe.io.manifest), builds the model config and a model
whose weights MLX has not materialised, and compares the model's parameter names and shapes with
the manifest's tensor index. The `CheckpointReader` it returns serves every way of reading:

    load_model()        every weight, the tokenizer          sample, eval, inspect, route, export
    load_non_experts()  non-expert weights; experts are      sample --resident-experts,
                        then mapped by tinymoe.io.mmap_experts  load_model_mapped
    training_state()    weights, optimizer state, tokenizer  train --resume
    problems()          every problem, not just the first    tinymoe validate

What each path verifies (docs/checkpoint-format.md has the table): every path checks that each
listed file exists with its recorded size and that each safetensors header agrees with the
manifest; that weights are floating point; and the tokenizer against the vocabulary. Hashes:
each path hashes the files it reads. `training_state` hashes every listed file; `load_model`
every file but `optimizer.safetensors`, which it never reads; the mapped paths neither that nor
`experts.safetensors`, whose tensors are instead verified as they are copied out (a whole stacked tensor against its sha256,
one expert against its `slice_sha256`; a checkpoint written before per-expert digests existed
leaves a mapped expert unverified beyond its header). `training_state` also checks the optimizer
state against the optimizer of the train config (tinymoe.optim.state_spec) and refuses NaN or inf
in weights and optimizer state; `problems` runs all of that without loading (NaN and inf found by
scanning the files) so that "valid" means "every path loads it". Each check runs at most once
per reader; a failed check raises one `CheckpointError` naming the first problem and the count.
"""

from __future__ import annotations

from pathlib import Path

from tinymoe.config import ModelConfig, TrainConfig, from_dict, validate
from tinymoe.errors import CheckpointError, TinyMoeError
from tinymoe.io import checkpoint
from tinymoe.io.finite import FLOAT_DTYPES, nonfinite_arrays, nonfinite_in_file

WEIGHT_FILES = ("model.safetensors", "experts.safetensors")
OPTIMIZER_FILE = "optimizer.safetensors"
EXPERTS_FILE = "experts.safetensors"


def open_checkpoint(path: str | Path, dispatch: str = "auto") -> "CheckpointReader":
    """A reader for the checkpoint at `path` (a checkpoint or run directory), its manifest,
    config and weight index checked; raises CheckpointError otherwise."""
    reader = CheckpointReader(path, dispatch)
    reader._require(reader.index_problems())
    return reader


class CheckpointReader:
    """One opened checkpoint. Constructing it raises only when there is no manifest to read;
    use `open_checkpoint` to also require a buildable model (what every loader needs)."""

    def __init__(self, path: str | Path, dispatch: str = "dense"):
        self.ckpt = checkpoint.resolve(path)
        self.manifest = checkpoint.read_manifest(self.ckpt)
        self.dispatch, self.base_path = dispatch, None  # base_path: where a fine-tune's base is, if moved
        self.where = f"{self.ckpt}/manifest.json"
        self.cfg, self.model, self._index = None, None, []
        try:
            self.cfg = model_config_of(self.manifest, self.ckpt)
        except CheckpointError as exc:
            self._index = [str(exc)]
        else:
            self.model, self._index = model_for_index(self.cfg, self.manifest, self.ckpt, dispatch)
        self._present: dict[str, bool] = {}  # file -> present with its recorded size
        self._structure: dict[str, list[str]] = {}  # file -> presence/size/header problems
        self._headers: dict[str, dict] = {}  # file -> its checked safetensors header index
        self._hashes: dict[str, list[str]] = {}  # file -> sha256 problems
        self._tokenizer = None

    # -- checks: each a list of one-line problems, computed at most once -----------------------
    def index_problems(self) -> list[str]:
        """The model config and the weights' names and shapes against it."""
        return list(self._index)

    def file_problems(self, hashed=()) -> list[str]:
        """Every listed file: present, its size, its header; sha256 of the files in `hashed`."""
        problems = []
        for fname, entry in self.manifest["files"].items():
            if fname not in self._structure:
                problem = checkpoint.file_problem(self.ckpt / fname, entry)
                self._present[fname] = problem is None
                if problem or not fname.endswith(".safetensors"):
                    self._structure[fname], self._headers[fname] = [problem] if problem else [], {}
                else:
                    self._structure[fname], self._headers[fname] = \
                        checkpoint.header_problems(self.ckpt / fname, self.manifest, fname)
            structure = self._structure[fname]
            problems.extend(structure)
            if fname in hashed and self._present[fname]:  # missing or resized: its bytes say no more
                if fname not in self._hashes:
                    self._hashes[fname] = checkpoint.hash_problems(self.ckpt, self.manifest, fname,
                                                                   tensors=not structure)
                problems.extend(self._hashes[fname])
        return problems

    def dtype_problems(self) -> list[str]:
        """Weights the model cannot compute with (an int8 weight would crash the first matmul);
        the packed weights of a quantized checkpoint must be uint32, everything else float."""
        packed = packed_names(self.model)
        problems = []
        for f in WEIGHT_FILES:
            for _, e in checkpoint.entries_in(self.manifest, f):
                if e["name"] in packed and e["dtype"] != "uint32":
                    problems.append(f"{self.ckpt / f}: quantized weight '{e['name']}' has dtype {e['dtype']}; "
                                    f"packed weights must be uint32")
                elif e["name"] not in packed and e["dtype"] not in FLOAT_DTYPES:
                    problems.append(f"{self.ckpt / f}: weight '{e['name']}' has dtype {e['dtype']}; "
                                    f"weights must be one of {', '.join(FLOAT_DTYPES)}")
        return problems

    def train_config(self) -> tuple[TrainConfig | None, list[str]]:
        """(the saved train config or None for a weights-only checkpoint, its problems)."""
        if "train" not in self.manifest:
            return None, []
        try:
            if not isinstance(self.manifest["train"], dict):
                raise TinyMoeError("'train' is not an object")
            return from_dict(TrainConfig, self.manifest["train"], "train config"), []
        except TinyMoeError as exc:
            return None, [f"{self.where}: {exc}"]

    def optimizer_problems(self) -> list[str]:
        """optimizer.safetensors against what the train config's optimizer keeps for this model."""
        from mlx.utils import tree_flatten

        from tinymoe.optim.state_spec import state_problems

        train, problems = self.train_config()
        if train is None or self.model is None or "quantization" in self.manifest:
            return problems  # weights only, or quantized (nothing to train): no optimizer state
        # The model's own shapes (MLX has not allocated them): a manifest that disagrees with the
        # config is reported by index_problems, and the state must fit the model either way.
        weights = {k: list(v.shape) for k, v in tree_flatten(self.model.parameters())}
        trainable = {k for k, _ in tree_flatten(self.model.trainable_parameters())}
        state = {e["name"]: (e["shape"], e["dtype"]) for _, e in checkpoint.entries_in(self.manifest, OPTIMIZER_FILE)}
        where = self.ckpt / OPTIMIZER_FILE
        return [f"{where}: {p}" for p in state_problems(train.optimizer, weights, trainable, state)]

    def tokenizer_problems(self) -> list[str]:
        try:
            self.tokenizer()
        except TinyMoeError as exc:
            return [str(exc)]
        return []

    def finite_problems(self) -> list[str]:
        """NaN or inf in any weight or optimizer tensor, found by scanning the files (validate)."""
        problems = []
        for fname in (*WEIGHT_FILES, OPTIMIZER_FILE):
            if self._structure.get(fname, ["unchecked"]):
                continue  # a file that is missing or disagrees with the manifest is reported already
            what = "optimizer state" if fname == OPTIMIZER_FILE else "weight"
            entries = [e for _, e in checkpoint.entries_in(self.manifest, fname)]
            problems.extend(f"{self.ckpt / fname}: {what} '{n}' holds NaN or inf values"
                            for n in nonfinite_in_file(self.ckpt / fname, entries))
        return problems

    def problems(self) -> list[str]:
        """Every problem any path would refuse the checkpoint for (tinymoe validate)."""
        found = self.file_problems(hashed=tuple(self.manifest["files"]))
        found += self.index_problems() + self.dtype_problems() + self.optimizer_problems()
        found += self.tokenizer_problems() + self.finite_problems()
        if "finetune" in self.manifest and not found:
            try:
                self.base_weights()
            except TinyMoeError as exc:
                found.append(str(exc))
        return found

    def _require(self, problems: list[str]) -> None:
        if problems:
            raise CheckpointError(checkpoint.first_problem(problems))

    # -- serving -------------------------------------------------------------------------------
    def tokenizer(self):
        """The checkpoint's tokenizer, checked against the model's vocabulary (loaded once)."""
        from tinymoe.tokenizers.load import load_tokenizer

        if self._tokenizer is None:
            tokenizer = load_tokenizer(self.manifest["tokenizer"], self.ckpt)
            if self.cfg is not None and tokenizer.vocab_size > self.cfg.vocab_size:  # fewer: padding rows
                raise CheckpointError(f"{self.ckpt}: tokenizer has {tokenizer.vocab_size} tokens, "
                                      f"the model config says vocab_size {self.cfg.vocab_size}")
            self._tokenizer = tokenizer
        return self._tokenizer

    def _read(self, files, hashed) -> dict:
        """The tensors of `files`, after the index, every file (hashes of `hashed`) and the
        weight dtypes have been checked."""
        self._require(self.index_problems() + self.file_problems(hashed) + self.dtype_problems())
        return checkpoint.read_tensors(self.ckpt, self.manifest, files)

    def load_model(self, verify_hashes: bool = True):
        """(model, manifest, tokenizer, checkpoint dir) with every weight loaded."""
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        # Hash what this path reads (weights, tokenizer file), not the optimizer state: sampling a
        # large model must not pay for reading twice its size of moments it never uses.
        hashed = tuple(f for f in self.manifest["files"] if f != OPTIMIZER_FILE) if verify_hashes else ()
        weights = self._read(WEIGHT_FILES, hashed)
        tokenizer = self.tokenizer()
        if "finetune" in self.manifest:
            weights = {**self.base_weights(verify_hashes), **weights}
        self.model.update(tree_unflatten(list(weights.items())))
        mx.eval(self.model.parameters())
        return self.model, self.manifest, tokenizer, self.ckpt

    def base_weights(self, verify_hashes: bool = True) -> dict:
        """A fine-tune's base weights (see `base_model`)."""
        from mlx.utils import tree_flatten

        return dict(tree_flatten(self.base_model(verify_hashes).parameters()))

    def base_model(self, verify_hashes: bool = True):
        """A fine-tune's base model, read from the base checkpoint its manifest names (or
        `self.base_path` when set) after checking that it is the model the adapters were trained on."""
        from tinymoe.io.base_ref import base_digest

        ref = self.manifest["finetune"].get("base")
        if not isinstance(ref, dict) or not isinstance(ref.get("path"), str) or not isinstance(ref.get("digest"), str):
            raise CheckpointError(f"{self.where}: 'finetune' names no base checkpoint (path and digest)")
        path = self.base_path or ref["path"]
        try:
            base = open_checkpoint(path, self.dispatch)
        except TinyMoeError as exc:
            raise CheckpointError(f"{self.ckpt}: cannot read the base model of these adapters: {exc}") from None
        if "finetune" in base.manifest or base_digest(base.manifest) != ref["digest"]:
            raise CheckpointError(f"{self.ckpt}: these adapters were trained on another base model than {base.ckpt} "
                                  f"(digest {ref['digest'][:12]}, found {base_digest(base.manifest)[:12]}); "
                                  f"give the checkpoint they were trained on")
        return base.load_model(verify_hashes)[0]

    def load_non_experts(self, verify_hashes: bool = True) -> dict:
        """Load the non-expert weights into the model, leaving its expert parameters MLX's lazy
        initialisers (they cost nothing until evaluated), for tinymoe.io.mmap_experts to serve
        from a map; returns the expert file's checked header index. With verify_hashes the files it
        reads are hashed, except the expert file (the map verifies each expert as it copies it)."""
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        if "finetune" in self.manifest:
            raise CheckpointError(f"{self.ckpt}: a fine-tuned checkpoint (adapters) cannot be memory-mapped; "
                                  f"export it with --fuse, import that, and map the result")
        hashed = tuple(f for f in self.manifest["files"] if f not in (EXPERTS_FILE, OPTIMIZER_FILE)) \
            if verify_hashes else ()
        weights = self._read(("model.safetensors",), hashed)
        self.tokenizer()
        self.model.update(tree_unflatten(list(weights.items())))
        mx.eval(list(weights.values()))
        return self._headers[EXPERTS_FILE]

    def training_state(self) -> dict:
        """{"manifest", "ckpt", "weights", "optimizer", "tokenizer"} to resume from: a resumable
        manifest, every file hashed, the optimizer state complete for the train config's
        optimizer, and no NaN or inf in weights or optimizer state."""
        m, where = self.manifest, self.where
        if "quantization" in m:
            raise CheckpointError(f"{where}: a quantized checkpoint cannot be trained; resume or --init "
                                  f"from the float checkpoint it was quantized from")
        for key in ("train", "data"):
            if not isinstance(m.get(key), dict):
                raise CheckpointError(f"{where}: missing '{key}' (not resumable)")
        if not isinstance(m["data"].get("sampler"), dict):
            raise CheckpointError(f"{where}: missing the batch sampler state (not resumable)")
        tokens_seen = m.get("tokens_seen", 0)
        if not isinstance(tokens_seen, int) or isinstance(tokens_seen, bool) or tokens_seen < 0:
            raise CheckpointError(f"{where}: 'tokens_seen' must be a non-negative integer, got {tokens_seen!r}")
        self._require(self.index_problems() + self.optimizer_problems())
        weights = self._read(WEIGHT_FILES, tuple(m["files"]))
        optimizer = checkpoint.read_tensors(self.ckpt, m, (OPTIMIZER_FILE,))  # checked just above
        bad = [f"{self.ckpt / m['tensors'][n]['file']}: weight '{n}'" for n in nonfinite_arrays(weights)] + \
              [f"{self.ckpt / OPTIMIZER_FILE}: optimizer state '{n}'" for n in nonfinite_arrays(optimizer)]
        if bad:
            raise CheckpointError(f"{checkpoint.first_problem(bad)} holds NaN or inf values; "
                                  f"resume from an earlier checkpoint")
        if "finetune" in m:  # the frozen base under the trained adapters
            weights = {**self.base_weights(), **weights}
        return {"manifest": m, "ckpt": self.ckpt, "weights": weights, "optimizer": optimizer,
                "tokenizer": self.tokenizer()}


def packed_names(model) -> set[str]:
    """Names of the model's packed (uint32) quantized weights; empty for a float model."""
    if model is None or model.__dict__.get("quantization") is None:
        return set()
    from mlx.utils import tree_flatten

    import mlx.core as mx

    return {k for k, v in tree_flatten(model.parameters()) if v.dtype == mx.uint32}


def model_config_of(manifest: dict, ckpt: Path) -> ModelConfig:
    """The manifest's model config, checked like a preset's; CheckpointError otherwise."""
    if not isinstance(manifest.get("model"), dict):
        raise CheckpointError(f"{ckpt}/manifest.json: 'model' is not an object")
    try:
        cfg = from_dict(ModelConfig, manifest["model"], "model config")
        validate(cfg)
    except CheckpointError:
        raise
    except Exception as exc:  # TinyMoeError from config checks: re-label as a checkpoint problem
        raise CheckpointError(f"{ckpt}/manifest.json: {exc}") from None
    return cfg


def model_for_index(cfg: ModelConfig, manifest: dict, ckpt: Path, dispatch: str = "dense"):
    """(model with lazy, unevaluated weights, problems) comparing the config's parameters with
    the manifest's model/expert tensors. The model is None when the config cannot be built.

    MLX builds parameters lazily, so a config with huge dimensions costs nothing here; the layer
    count is bounded by the index first because each layer is a Python object.
    """
    from mlx.utils import tree_flatten

    from tinymoe.nn.model import Model

    index = {e["name"]: e for f in WEIGHT_FILES for _, e in checkpoint.entries_in(manifest, f)}
    where = f"{ckpt}/manifest.json"
    if cfg.n_layers > len(index):
        return None, [f"{where}: model config has {cfg.n_layers} layers but the checkpoint holds "
                      f"only {len(index)} weight tensors"]
    try:
        model = Model(cfg, dispatch)
    except Exception as exc:  # a config that passed validate() but MLX still rejects
        return None, [f"{where}: cannot build the model this config describes ({exc})"]
    if manifest.get("domains") is not None:  # domain routing and the secretary's weights
        from tinymoe.domains import read_record
        from tinymoe.nn.domain import attach_domains

        try:
            attach_domains(model, read_record(manifest))
        except TinyMoeError as exc:
            return None, [f"{where}: {exc}"]
    if "quantization" in manifest:  # packed weights, scales and biases in place of the floats
        from tinymoe.nn.quantize import apply_record

        try:
            apply_record(model, manifest["quantization"])
        except TinyMoeError as exc:
            return None, [f"{where}: {exc}"]
    expected = {k: list(v.shape) for k, v in tree_flatten(model.parameters())}
    if "finetune" in manifest:  # adapters (and a trained router) only: the base is read from its own checkpoint
        from tinymoe.nn.lora import apply_finetune, saved_names

        try:
            apply_finetune(model, manifest["finetune"])
        except TinyMoeError as exc:
            return None, [f"{where}: {exc}"]
        saved = saved_names(model)
        expected = {k: list(v.shape) for k, v in tree_flatten(model.parameters()) if k in saved}
    problems = []
    for name in sorted(set(expected) - set(index)):
        problems.append(f"{where}: weight '{name}' required by the model config is missing")
    for name in sorted(set(index) - set(expected)):
        problems.append(f"{where}: weight '{name}' is not part of the model the config describes")
    for name in sorted(set(index) & set(expected)):
        if index[name]["shape"] != expected[name]:
            problems.append(f"{where}: weight '{name}' has shape {index[name]['shape']}, "
                            f"the model config implies {expected[name]}")
    return model, problems
