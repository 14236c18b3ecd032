"""`tinymoe teacher-cache`: run a teacher once over a run's training stream and store its predictions.

The stream is the one a student trains on: the same data specs, read and tokenized by
tinymoe.data.prepare with the teacher's tokenizer, and the train part of the same split. The
format is tinymoe.data.teacher_cache; the positions and chunks tinymoe.train.teacher_predict.

Resumable: the output files are allocated at their final size when the build starts, each batch
of chunks is written in place and flushed, and only then does `build.json` count it as done. A
killed build continues from its last counted batch (the batch it was writing is written again, to
the same bytes: the forward pass and the draws of a batch depend only on the batch). The manifest
goes last, after every file was hashed: a folder without it is never taken for a complete cache.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from tinymoe.config import TrainConfig
from tinymoe.data.corpus import bundled_corpus_dir
from tinymoe.data.prepare import prepare_data
from tinymoe.data.record import absolute_spec, data_record
from tinymoe.data.teacher_cache import (BUILD, FORMAT, LOGP_DTYPES, MANIFEST, VERSION, bytes_per_token, file_sha256,
                                        file_shapes, read_json, stream_digest, tokenizer_digest,
                                        write_json_atomically)
from tinymoe.errors import TinyMoeError
from tinymoe.io.base_ref import base_digest
from tinymoe.io.folders import check_output, read_marker, remove_marked, write_marker
from tinymoe.names import TEACHER_CACHE_METHODS
from tinymoe.train.progress import ProgressBar
from tinymoe.train.teacher_predict import chunk_plan, predict_chunks, sample_rows, topk_rows

KIND = "teacher-cache"


@dataclasses.dataclass
class CacheRequest:
    teacher: str
    out: str
    data: list
    k: int = 32
    method: str = "topk"
    dtype: str = "float16"
    val_fraction: float = 0.1
    left_context: int | None = None  # default: a quarter of the teacher's context
    batch_chunks: int = 8  # chunks per teacher forward pass
    seed: int = 0  # method sample: the draws
    context: int | None = None  # the student's context (cuts instruction examples); default the teacher's
    tokenizer: str | None = None  # the student's tokenizer spec, when given: must be the teacher's
    overwrite: bool = False


def _check_request(req: CacheRequest, vocab: int, context: int) -> int:
    if req.method not in TEACHER_CACHE_METHODS:
        raise TinyMoeError(f"unknown method '{req.method}' (choose from {', '.join(TEACHER_CACHE_METHODS)})")
    if req.dtype not in LOGP_DTYPES:
        raise TinyMoeError(f"unknown cache dtype '{req.dtype}' (choose from {', '.join(LOGP_DTYPES)})")
    if not 1 <= req.k <= vocab:
        raise TinyMoeError(f"--top-k {req.k}: must be between 1 and the teacher's vocabulary ({vocab})")
    left = context // 4 if req.left_context is None else req.left_context
    if not 0 <= left < context:
        raise TinyMoeError(f"--left-context {left}: must be in [0, {context}) (the teacher's context is {context})")
    if req.batch_chunks < 1:
        raise TinyMoeError(f"--batch-chunks {req.batch_chunks}: must be at least 1")
    return left


def _check_tokenizer(spec: str | None, tokenizer) -> None:
    """A student tokenizer named by the user must be the teacher's (its ids are what is cached)."""
    if spec is None:
        return
    record = tokenizer.to_manifest()
    same = (spec == "bytes" and record["kind"] == "bytes") or (
        record["kind"] == "sp" and spec == f"sp:{record['vocab_size']}")
    if not same:
        raise TinyMoeError(
            f"--tokenizer {spec}: the teacher's tokenizer is {record['kind']}:{record['vocab_size']}; a teacher "
            f"predicts its own token ids, so its predictions can be cached only for a student that uses the very "
            f"same tokenizer (leave --tokenizer out to cache for the teacher's)")


def _settings(req, teacher_manifest, ckpt, tokenizer, train_tokens, files, left, vocab, context) -> dict:
    """Everything the cache's content depends on: a build resumes only when all of it is equal."""
    return {
        "format": FORMAT, "version": VERSION, "method": req.method, "k": req.k, "dtype": req.dtype,
        "vocab_size": vocab, "tokens": int(train_tokens.shape[0]),
        "teacher": {"path": str(Path(ckpt).resolve()), "step": teacher_manifest.get("step"),
                    "digest": base_digest(teacher_manifest), "context": context, "left_context": left,
                    "batch_chunks": req.batch_chunks},
        "tokenizer": {"sha256": tokenizer_digest(tokenizer), "record": tokenizer.to_manifest()},
        "data": {"sources": list(req.data), "files": files, "val_fraction": req.val_fraction,
                 "train_tokens": int(train_tokens.shape[0]), "sha256": stream_digest(train_tokens)},
        "seed": req.seed if req.method == "sample" else None,
    }


def _open_output(out: Path, settings: dict, overwrite: bool) -> int:
    """Prepare `out` and return the batches already built there (0 for a new build)."""
    marker = read_marker(out) if out.is_dir() else None
    if marker is not None and marker["kind"] == KIND:
        complete = (out / MANIFEST).exists()
        build = None if complete else read_json(out / BUILD)
        if build is not None and build.get("settings") == settings:
            return int(build.get("batches_done", 0))  # the same build, continued
        if complete and not overwrite:
            raise TinyMoeError(f"{out} already holds a complete teacher cache; use --overwrite to build it again")
        if build is not None and not overwrite:
            raise TinyMoeError(f"{out} holds an unfinished teacher cache built with other settings (teacher, data, "
                               f"method, k or dtype differ); use --overwrite to start it again")
        remove_marked(out, KIND)  # replaced on request, or killed before its first record: nothing built
    else:
        check_output(out, KIND, overwrite)  # refuses anything that is not ours, deletes nothing
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, KIND)
    for name, (dtype, shape) in file_shapes(settings["tokens"], settings["k"], settings["method"],
                                            settings["vocab_size"], settings["dtype"]).items():
        with open(out / name, "wb") as f:
            f.truncate(int(np.prod(shape)) * dtype.itemsize)
    return 0


def build_teacher_cache(req: CacheRequest, progress: bool = True, max_batches: int | None = None) -> dict:
    """Build (or continue building) the cache `req.out`; returns a summary. `max_batches` stops
    after that many batches of this call, leaving a resumable build (tests use it)."""
    from tinymoe.io.loader import load_model

    out = Path(req.out)
    if out.exists() and not out.is_dir():
        raise TinyMoeError(f"{out}: exists and is not a folder; --out needs a folder to create")
    req = dataclasses.replace(req, data=[absolute_spec(s) for s in req.data])
    model, manifest, tokenizer, ckpt = load_model(req.teacher)
    model.train(False)
    vocab, context = int(manifest["model"]["vocab_size"]), int(manifest["model"]["context"])
    left = _check_request(req, vocab, context)
    _check_tokenizer(req.tokenizer, tokenizer)
    train_cfg = TrainConfig(data=list(req.data), val_fraction=req.val_fraction)
    run_data = prepare_data(train_cfg, tokenizer, req.context or context)
    tokens = run_data.train_tokens
    if tokens.size == 0:
        raise TinyMoeError("the training split is empty; nothing to cache")
    files = data_record(req.data or [str(bundled_corpus_dir())])
    settings = _settings(req, manifest, ckpt, tokenizer, tokens, files, left, vocab, context)
    chunks = chunk_plan(int(tokens.shape[0]), context, left)
    batches = [chunks[i:i + req.batch_chunks] for i in range(0, len(chunks), req.batch_chunks)]
    done = _open_output(out, settings, req.overwrite)
    build = read_json(out / BUILD) or {}
    seconds = float(build.get("seconds", 0.0))
    shapes = file_shapes(settings["tokens"], req.k, req.method, vocab, req.dtype)
    maps = {name: np.memmap(out / name, dtype=dt, mode="r+", shape=shape) for name, (dt, shape) in shapes.items()}
    bar = ProgressBar(len(batches), done, progress, every=max(1, len(batches) // 20))
    if done:
        bar.message(f"continuing the build of {out} at batch {done + 1} of {len(batches)}")
    _record(out, settings, done, len(batches), seconds)
    stop = len(batches) if max_batches is None else min(len(batches), done + max_batches)
    t0, written = time.perf_counter(), 0
    try:
        for b in range(done, stop):
            logp_TV = predict_chunks(model, tokens, batches[b])
            first, last = batches[b][0][1], batches[b][-1][2]
            if req.method == "topk":
                ids, top, rest = topk_rows(logp_TV, req.k)
                maps["rest.bin"][first:last] = rest
            else:
                ids, top = sample_rows(logp_TV, req.k, np.random.Generator(np.random.PCG64([req.seed, b])))
            maps["ids.bin"][first:last] = ids
            maps["logp.bin"][first:last] = top
            for array in maps.values():
                array.flush()  # msync: the batch is on disk before build.json counts it
            written += last - first
            elapsed = time.perf_counter() - t0
            _record(out, settings, b + 1, len(batches), seconds + elapsed)
            bar.update(b + 1, **{"tok/s": round(written / elapsed) if elapsed > 0 else 0})
    finally:
        bar.close()
        del maps
    seconds += time.perf_counter() - t0
    if stop < len(batches):
        return {"complete": False, "batches_done": stop, "batches": len(batches), "out": str(out)}
    return _finish(out, settings, seconds)


def _record(out: Path, settings: dict, done: int, total: int, seconds: float) -> None:
    write_json_atomically(out / BUILD, {"settings": settings, "batches_done": done, "batches": total,
                                        "seconds": round(seconds, 3)})


def _finish(out: Path, settings: dict, seconds: float) -> dict:
    shapes = file_shapes(settings["tokens"], settings["k"], settings["method"], settings["vocab_size"],
                         settings["dtype"])
    files = {name: {"bytes": (out / name).stat().st_size, "sha256": file_sha256(out / name)} for name in shapes}
    per_token = bytes_per_token(settings["k"], settings["method"], settings["vocab_size"], settings["dtype"])
    manifest = {**settings, "files": files, "build": {"seconds": round(seconds, 3), "bytes_per_token": per_token},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json_atomically(out / MANIFEST, manifest)  # the completion marker: last
    (out / BUILD).unlink(missing_ok=True)
    total = sum(f["bytes"] for f in files.values())
    return {"complete": True, "out": str(out), "tokens": settings["tokens"], "method": settings["method"],
            "k": settings["k"], "dtype": settings["dtype"], "bytes_per_token": per_token, "bytes": total,
            "build_seconds": round(seconds, 3)}
