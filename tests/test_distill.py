"""Distillation from a teacher cache: the KD terms against float64 numpy, the cache's positions and
round trip, an interrupted build, the refusals, and exact resume of a distilled run."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from debug_run import one_error_line

from tinymoe.cli.main import cli
from tinymoe.config import TrainConfig, load_preset
from tinymoe.data.prepare import prepare_data
from tinymoe.data.teacher_cache import open_cache
from tinymoe.errors import TinyMoeError
from tinymoe.io.loader import load_model, load_training_state
from tinymoe.train.distill import kd_sample, kd_topk
from tinymoe.train.teacher_cache import CacheRequest, build_teacher_cache
from tinymoe.train.teacher_predict import chunk_plan, sample_rows, topk_rows
from tinymoe.train.trainer import Trainer


def _softmax64(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- the KD terms


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kd_topk_matches_float64_buckets(temperature):
    rng = np.random.default_rng(0)
    B, L, V, K = 2, 3, 11, 4
    student = rng.normal(size=(B, L, V)) * 2
    p = _softmax64(rng.normal(size=(B, L, V)) * 2)  # the teacher, at temperature 1
    ids = np.argsort(-p, axis=-1)[..., :K]
    top = np.take_along_axis(p, ids, axis=-1)
    rest = 1.0 - top.sum(-1)
    # Reference: K + 1 buckets, the teacher's tempered as p^(1/T) renormalised, the student's
    # rest bucket summed over the ids outside the K.
    q = np.concatenate([top, rest[..., None]], -1) ** (1 / temperature)
    q /= q.sum(-1, keepdims=True)
    s = _softmax64(student / temperature)
    inside = np.take_along_axis(s, ids, axis=-1)
    s_b = np.concatenate([inside, (s.sum(-1) - inside.sum(-1))[..., None]], -1)
    want = temperature ** 2 * (q * (np.log(q) - np.log(s_b))).sum(-1)
    got = kd_topk(mx.array(student, mx.float32), mx.array(ids, mx.int32), mx.array(np.log(top), mx.float32),
                  mx.array(np.log(rest), mx.float32), temperature)
    np.testing.assert_allclose(np.array(got), want, rtol=2e-4, atol=2e-6)


def test_kd_topk_with_the_whole_vocabulary_is_the_full_kl():
    rng = np.random.default_rng(1)
    V = 9
    student, p = rng.normal(size=(1, 2, V)), _softmax64(rng.normal(size=(1, 2, V)))
    ids = np.argsort(-p, axis=-1)
    s = _softmax64(student)
    want = (p * (np.log(p) - np.log(s))).sum(-1)
    got = kd_topk(mx.array(student, mx.float32), mx.array(ids, mx.int32),
                  mx.array(np.log(np.take_along_axis(p, ids, -1)), mx.float32), mx.full((1, 2), -np.inf), 1.0)
    np.testing.assert_allclose(np.array(got), want, rtol=2e-4, atol=2e-6)
    grad = mx.grad(lambda z: kd_topk(z, mx.array(ids, mx.int32), mx.array(np.log(np.take_along_axis(p, ids, -1)),
                                                                            mx.float32),
                                     mx.full((1, 2), -np.inf), 1.0).sum())(mx.array(student, mx.float32))
    np.testing.assert_allclose(np.array(grad), s - p, atol=1e-5)  # d KL / d logits = s - p


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_sample_matches_float64_importance_weights(temperature):
    rng = np.random.default_rng(2)
    B, L, V, K = 2, 2, 13, 6
    student = rng.normal(size=(B, L, V))
    p = _softmax64(rng.normal(size=(B, L, V)) * 1.5)
    ids = np.stack([[rng.choice(V, size=K, p=p[b, t]) for t in range(L)] for b in range(B)])
    lp = np.log(np.take_along_axis(p, ids, -1))
    ls = np.log(np.take_along_axis(_softmax64(student / temperature), ids, -1))
    w = np.exp((1 / temperature - 1) * lp)
    log_z = np.log(w.mean(-1, keepdims=True))  # the draws' estimate of log sum_v p_v^(1/T)
    w /= w.sum(-1, keepdims=True)
    want = temperature ** 2 * (w * (lp / temperature - log_z - ls)).sum(-1)
    got = kd_sample(mx.array(student, mx.float32), mx.array(ids, mx.int32), mx.array(lp, mx.float32), temperature)
    np.testing.assert_allclose(np.array(got), want, rtol=2e-4, atol=2e-6)


def test_kd_sample_is_unbiased_at_temperature_one():
    """Many draws: the estimate approaches the full KL(p || s) within a few standard errors."""
    rng = np.random.default_rng(3)
    V, K = 7, 20000
    student, p = rng.normal(size=V), _softmax64(rng.normal(size=V))
    full = float((p * (np.log(p) - np.log(_softmax64(student)))).sum())
    ids = rng.choice(V, size=K, p=p)
    terms = np.log(p[ids]) - np.log(_softmax64(student)[ids])
    got = float(np.array(kd_sample(mx.array(student[None, None], mx.float32), mx.array(ids[None, None], mx.int32),
                                   mx.array(np.log(p[ids])[None, None], mx.float32)))[0, 0])
    assert abs(got - full) < 4 * terms.std() / np.sqrt(K)


# ----------------------------------------------------------------------------- the cache


def test_chunk_plan_tiles_the_stream_with_left_context():
    for n, c, left in [(1000, 64, 16), (64, 64, 16), (65, 64, 0), (10, 64, 8), (777, 32, 31)]:
        plan = chunk_plan(n, c, left)
        kept = [p for _, keep, end in plan for p in range(keep, end)]
        assert kept == list(range(n))
        for start, keep, end in plan:
            assert end - start == min(c, n) and 0 <= start <= keep < end <= n
            assert keep - start >= left or start == 0  # every position past the first chunk sees `left` tokens


def test_sample_rows_draw_from_the_teacher_and_topk_rows_keep_the_rest():
    rng = np.random.default_rng(4)
    p = _softmax64(rng.normal(size=(3, 10)) * 1.5)
    logp = np.log(p).astype(np.float32)
    ids, lp = sample_rows(logp, 40000, np.random.Generator(np.random.PCG64(0)))
    for row in range(3):
        freq = np.bincount(ids[row], minlength=10) / 40000
        assert np.abs(freq - p[row]).max() < 4 * np.sqrt(p[row].max() / 40000)
        np.testing.assert_allclose(lp[row], logp[row][ids[row]])
    ids, top, rest = topk_rows(logp, 4)
    np.testing.assert_array_equal(ids, np.argsort(-p, axis=1)[:, :4])
    np.testing.assert_allclose(np.exp(rest.astype(np.float64)), 1 - np.exp(top.astype(np.float64)).sum(1), rtol=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A debug teacher trained a few steps on a small file, and the file."""
    root = tmp_path_factory.mktemp("distill")
    data = root / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog; pack my box with five dozen jugs. " * 60)
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--preset", "debug", "--steps", "4", "--data", str(data), "--quiet",
                                 "--out", str(root / "teacher")])
    assert result.exit_code == 0, result.output
    return root, data


def _build(setup, out, **kw):
    root, data = setup
    max_batches = kw.pop("max_batches", None)
    req = CacheRequest(teacher=str(root / "teacher"), out=str(out), data=[str(data)], **{"k": 5, **kw})
    return build_teacher_cache(req, progress=False, max_batches=max_batches)


def test_cache_round_trip_holds_the_teachers_predictions(setup, tmp_path):
    root, data = setup
    summary = _build(setup, tmp_path / "c", batch_chunks=3)
    cache = open_cache(tmp_path / "c")
    model, manifest, tokenizer, _ = load_model(root / "teacher")
    model.train(False)
    tokens = prepare_data(TrainConfig(data=[str(data)]), tokenizer, manifest["model"]["context"]).train_tokens
    assert cache.ids.shape == (tokens.shape[0], 5) and summary["bytes_per_token"] == 5 * 4 + 4
    context = manifest["model"]["context"]
    for start, keep, end in chunk_plan(tokens.shape[0], context, context // 4)[:: 7]:
        logits, _ = model(mx.array(np.asarray(tokens[start:end], np.int32)[None]))
        p = _softmax64(np.array(logits[0]))[keep - start:]  # (positions, V) in float64
        ids = np.asarray(cache.ids[keep:end])
        np.testing.assert_allclose(np.take_along_axis(p, ids, 1).max(1), p.max(1), rtol=1e-4)  # the top one first
        np.testing.assert_allclose(np.exp(np.asarray(cache.logp[keep:end], np.float64)), np.take_along_axis(p, ids, 1),
                                   rtol=2e-3)
        np.testing.assert_allclose(np.exp(np.asarray(cache.rest[keep:end], np.float64)),
                                   1 - np.take_along_axis(p, ids, 1).sum(1), rtol=1e-3, atol=1e-6)
    ids, logp, rest = cache.gather(np.array([[0, 1], [2, 3]]))
    assert ids.shape == (2, 2, 5) and logp.dtype == np.float32 and rest.shape == (2, 2)


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_a_build_in_two_interrupted_pieces_equals_one_straight(setup, tmp_path, method):
    straight = _build(setup, tmp_path / "straight", method=method, batch_chunks=2)
    part = _build(setup, tmp_path / "pieces", method=method, batch_chunks=2, max_batches=3)
    assert not part["complete"] and not (tmp_path / "pieces" / "manifest.json").exists()
    with pytest.raises(TinyMoeError, match="unfinished"):
        open_cache(tmp_path / "pieces")
    rest = _build(setup, tmp_path / "pieces", method=method, batch_chunks=2)
    assert rest["complete"] and straight["complete"]
    a, b = open_cache(tmp_path / "straight"), open_cache(tmp_path / "pieces")
    assert a.manifest["files"] == b.manifest["files"]  # every byte: the sha256 of every file
    assert np.array_equal(np.asarray(a.ids), np.asarray(b.ids))


# ----------------------------------------------------------------------------- refusals


def _student(setup, tmp_path, cache, *extra):
    root, data = setup
    return CliRunner().invoke(cli, ["train", "--preset", "debug", "--steps", "2", "--data", str(data), "--quiet",
                                    "--teacher-cache", str(cache), "--out", str(tmp_path / "student"), *extra])


@pytest.fixture
def cache(setup, tmp_path):
    _build(setup, tmp_path / "cache")
    return tmp_path / "cache"


def test_refuses_a_cache_for_other_data_or_split(setup, tmp_path, cache):
    other = tmp_path / "other.txt"
    other.write_text("sphinx of black quartz, judge my vow. " * 90)
    one_error_line(_student(setup, tmp_path, cache, "--data", str(other)), "built for other training data")
    one_error_line(_student(setup, tmp_path, cache, "--set", "val_fraction=0.2"), "val-fraction")
    assert not (tmp_path / "student").exists()


def test_refuses_a_truncated_or_damaged_cache(setup, tmp_path, cache):
    logp = cache / "logp.bin"
    data = bytearray(logp.read_bytes())
    data[10] ^= 0xFF
    logp.write_bytes(bytes(data))
    one_error_line(_student(setup, tmp_path, cache), "does not match its sha256")
    logp.write_bytes(bytes(data[:-4]))
    one_error_line(_student(setup, tmp_path, cache), "truncated")
    (cache / "manifest.json").unlink()
    one_error_line(_student(setup, tmp_path, cache), "no manifest.json")


def test_refuses_an_unfinished_cache(setup, tmp_path):
    _build(setup, tmp_path / "half", max_batches=1)
    one_error_line(_student(setup, tmp_path, tmp_path / "half"), "unfinished", "run the same")


def test_refuses_another_tokenizer_or_vocabulary(setup, cache):
    root, data = setup
    c = open_cache(cache)
    tokens = prepare_data(TrainConfig(data=[str(data)]), None).train_tokens

    class OtherTokenizer:
        def to_manifest(self):
            return {"kind": "sp", "vocab_size": 256, "file": "tokenizer.model"}

        model_proto = b"a sentencepiece model"

    with pytest.raises(TinyMoeError, match="the teacher predicts its own token ids"):
        c.check_run(OtherTokenizer(), tokens, 0.1, 256)
    with pytest.raises(TinyMoeError, match="vocabulary has 256 entries and the student's 300"):
        c.check_run(prepare_data(TrainConfig(data=[str(data)]), None).tokenizer, tokens, 0.1, 300)
    result = CliRunner().invoke(cli, ["teacher-cache", str(root / "teacher"), "--data", str(data), "--tokenizer",
                                      "sp:300", "--out", str(cache.parent / "sp")])
    one_error_line(result, "very same tokenizer")


def test_refuses_to_replace_what_is_not_a_cache(setup, tmp_path, cache):
    root, data = setup
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(cli, ["teacher-cache", str(root / "teacher"), "--data", str(data), "--out", str(mine),
                                      "--overwrite"])
    one_error_line(result, "refusing to replace it")
    assert (mine / "notes.txt").read_text() == "keep me"
    result = CliRunner().invoke(cli, ["teacher-cache", str(root / "teacher"), "--data", str(data), "--top-k", "5",
                                      "--out", str(cache)])
    one_error_line(result, "already holds a complete teacher cache")


# ----------------------------------------------------------------------------- training


def _configs(data, cache, steps, **train):
    model, tr = load_preset("debug")
    return model, TrainConfig(**{**tr.__dict__, "steps": steps, "data": [str(data)], "eval_every": 0,
                                 "log_every": 1, "save_every": steps // 2, "teacher_cache": str(cache),
                                 "distill_weight": 0.6, "distill_temperature": 1.5, **train})


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,train", [("topk", {"grad_accum": 2}), ("sample", {})])
def test_distilled_run_resumes_bit_for_bit(setup, tmp_path, method, train):
    root, data = setup
    _build(setup, tmp_path / "cache", method=method)
    straight = tmp_path / "straight"
    Trainer(*_configs(data, tmp_path / "cache", 6, **train), straight, progress=False, keep=1).run()
    rows = [r for r in _metrics(straight) if "loss" in r]
    assert all(r["kd_loss"] > 0 and r["loss"] > 0 for r in rows)  # CE and KD logged apart
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000006")
    state = load_training_state(resumed / "checkpoints" / "step-0000003")
    Trainer(*_configs(data, tmp_path / "cache", 6, **train), resumed, resume=state, progress=False).run()
    assert [(r["loss"], r["kd_loss"]) for r in _metrics(straight) if "loss" in r] == \
        [(r["loss"], r["kd_loss"]) for r in _metrics(resumed) if "loss" in r]
    a, b = load_training_state(straight), load_training_state(resumed)
    for name in a["weights"]:
        assert np.array_equal(np.array(a["weights"][name]), np.array(b["weights"][name])), name
    assert a["manifest"]["distill"]["digest"] == open_cache(tmp_path / "cache").digest


def test_distill_weight_zero_trains_as_without_a_teacher(setup, tmp_path, cache):
    """w = 0: the KD term is logged but the weights follow the plain cross entropy exactly."""
    root, data = setup
    plain, kd0 = tmp_path / "plain", tmp_path / "kd0"
    model, tr = _configs(data, cache, 2, distill_weight=0.0)
    Trainer(model, tr, kd0, progress=False).run()
    model, tr = _configs(data, "", 2, distill_weight=0.0)
    Trainer(model, tr, plain, progress=False).run()
    a, b = load_training_state(plain), load_training_state(kd0)
    for name in a["weights"]:
        np.testing.assert_allclose(np.array(a["weights"][name]), np.array(b["weights"][name]), atol=1e-6)
    assert [r["loss"] for r in _metrics(plain) if "loss" in r] == pytest.approx(
        [r["loss"] for r in _metrics(kd0) if "loss" in r], rel=1e-5)


def test_distillation_from_an_upcycled_init_with_every_router(setup, tmp_path, cache):
    root, data = setup
    from tinymoe.router_registry import ROUTERS

    dense = tmp_path / "dense"
    assert CliRunner().invoke(cli, ["train", "--preset", "debug", "--moe-experts", "1", "--moe-topk", "1", "--steps",
                                    "2", "--data", str(data), "--quiet", "--out", str(dense)]).exit_code == 0
    up = tmp_path / "up"
    assert CliRunner().invoke(cli, ["upcycle", str(dense), "--moe-experts", "4", "--moe-topk", "2", "--out",
                                    str(up)]).exit_code == 0
    result = _student(setup, tmp_path, cache, "--init", str(up))
    assert result.exit_code == 0, result.output
    for router in ROUTERS:
        topk = ["--moe-topk", "1"] if router == "switch" else []
        result = CliRunner().invoke(cli, ["train", "--preset", "debug", "--steps", "1", "--data", str(data), "--quiet",
                                          "--router", router, *topk, "--teacher-cache", str(cache),
                                          "--out", str(tmp_path / f"r-{router}")])
        assert result.exit_code == 0, (router, result.output)


def test_resume_refuses_a_rebuilt_cache_and_a_weight_without_cache(setup, tmp_path, cache):
    root, data = setup
    assert _student(setup, tmp_path, cache).exit_code == 0
    _build(setup, cache, k=4, overwrite=True)  # same path, other content
    one_error_line(CliRunner().invoke(cli, ["train", "--resume", str(tmp_path / "student"), "--extend-steps", "1",
                                            "--quiet"]), "changed since this run used it")
    one_error_line(CliRunner().invoke(cli, ["train", "--preset", "debug", "--data", str(data), "--distill-weight",
                                            "0.5", "--out", str(tmp_path / "x")]), "needs a teacher cache")
    stages = tmp_path / "stages.toml"
    stages.write_text(f'[[stage]]\nsteps = 2\ndata = ["{data}"]\n')
    one_error_line(CliRunner().invoke(cli, ["train", "--preset", "debug", "--stages", str(stages), "--teacher-cache",
                                            str(cache), "--out", str(tmp_path / "y")]), "does not combine with --stages")


def test_plan_knows_the_cache_size_and_its_reads(setup, cache):
    root, _ = setup
    m = open_cache(cache).manifest
    result = CliRunner().invoke(cli, ["plan", "--mode", "teacher-cache", "--from", str(root / "teacher"), "--top-k",
                                      "5", "--tokens", str(m["tokens"]), "--json"])
    assert result.exit_code == 0, result.output
    planned = json.loads(result.output)
    assert planned["cache"]["bytes"] == sum(f["bytes"] for f in m["files"].values())
    assert planned["bytes"]["weights"] > 0 and planned["bytes"]["logits"] > 0
    result = CliRunner().invoke(cli, ["plan", "--preset", "debug", "--teacher-cache", str(cache)])
    assert result.exit_code == 0 and "memory-mapped, not loaded" in result.output, result.output
