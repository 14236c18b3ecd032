"""Instruction data: rendering, the target mask through the cache, split and samplers, the masked
loss, and the refusals of malformed examples.

References are independent of the code under test: target texts written out by hand, masks
built from token parity, cross-entropy computed in numpy from the model's logits.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from tinymoe.cli.main import cli
from tinymoe.config import load_preset
from tinymoe.data.batches import BatchSampler, MixSampler, eval_batches, split_train_val
from tinymoe.data.corpus import read_documents
from tinymoe.data.tokens import TokenData, tokenize_documents
from tinymoe.errors import TinyMoeError
from tinymoe.nn.model import Model
from tinymoe.tokenizers.builtin import ByteTokenizer, train_sentencepiece
from tinymoe.train.evaluate import evaluate

RECORDS = [
    {"prompt": "What is 2 plus 2?", "completion": "4"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "And of Italy?"},
                  {"role": "assistant", "content": "Rome"}]},
    {"text": "plain prose, every token a target"},
]
# Written out by hand from the template in tinymoe/data/instruct.py.
RENDERED = [
    "User: What is 2 plus 2?\nAssistant: 4\n",
    "System: Be brief.\nUser: Capital of France?\nAssistant: Paris\nUser: And of Italy?\nAssistant: Rome\n",
    "plain prose, every token a target",
]
TARGETS = ["4\n", "Paris\n", "Rome\n", "plain prose, every token a target\n\n"]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_rendering_follows_the_documented_template(tmp_path):
    docs = read_documents([str(_write(tmp_path / "qa.jsonl", RECORDS))])
    assert [d.text for d in docs] == RENDERED
    assert docs[2].segments is None and docs[0].segments[-1] == ("4\n", True)


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece"])
def test_masked_tokens_decode_to_exactly_the_targets(tmp_path, kind):
    docs = read_documents([str(_write(tmp_path / "qa.jsonl", RECORDS))])
    if kind == "bytes":
        tok = ByteTokenizer()
    else:
        tok = train_sentencepiece([("Paris Rome Capital of France Italy What is plus brief " * 40)] * 20, 320)
    data = tokenize_documents(docs, tok, tmp_path / "cache")
    tokens, mask = np.asarray(data.tokens), np.asarray(data.mask)
    # Every maximal run of target tokens decodes to one target text, in order.
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append(tok.decode(tokens[start:i].tolist()))
            start = None
    assert runs == TARGETS
    # and the whole stream still decodes to the rendered documents joined by the separator
    assert tok.decode(tokens.tolist()) == "".join(t + "\n\n" for t in RENDERED)
    again = tokenize_documents(docs, tok, tmp_path / "cache")  # from the cache: the same mask
    assert np.array_equal(np.asarray(again.mask), mask)


def test_long_prompts_are_cut_from_the_left_and_targets_never(tmp_path):
    records = [{"prompt": "abcdefghij" * 3, "completion": "XYZ"}, {"prompt": "p", "completion": "T" * 40}]
    docs = read_documents([str(_write(tmp_path / "qa.jsonl", records))])
    data = tokenize_documents(docs, ByteTokenizer(), None, max_example_tokens=20)
    text = ByteTokenizer().decode(np.asarray(data.tokens).tolist())
    full = "User: " + "abcdefghij" * 3 + "\nAssistant: XYZ\n"
    # 20 tokens, the prompt's start dropped; a target longer than the limit stays whole, without its prompt
    assert text == full[-20:] + "\n\n" + "T" * 40 + "\n" + "\n\n"
    assert data.long_targets == 1


def test_split_and_samplers_carry_the_mask_with_the_tokens():
    tokens = np.arange(20000, dtype=np.uint16) * 7 % 251
    parity = (tokens % 2).astype(np.uint8)  # a mask we can recompute from any token
    data = TokenData(tokens, np.zeros_like(parity), ["d"], parity)
    train, val = split_train_val(data, 0.1, block_tokens=1000)
    for part in (train, val):
        assert np.array_equal(part.mask, part.tokens % 2)
    x, y, m = BatchSampler(train.tokens, 4, 16, seed=3, mask=train.mask).next_batch()
    assert np.array_equal(m, y % 2) and m.dtype == np.float32
    for x, y, m in eval_batches(val.tokens, 4, 16, mask=val.mask):
        assert np.array_equal(m, y % 2)
    other = (np.arange(5000, dtype=np.uint16) * 3 % 200 + 1).astype(np.uint16)
    mix = MixSampler([(train.tokens, train.mask), (other, np.zeros(5000, np.uint8))], [1.0, 0.0], 8, 16, seed=1)
    x, y, m = mix.next_batch()
    assert np.array_equal(m, y % 2)  # weight 0: never drawn from the second stream
    state = mix.state()
    expected = mix.next_batch()
    resumed = MixSampler([(train.tokens, train.mask), (other, np.zeros(5000, np.uint8))], [1.0, 0.0], 8, 16, seed=9)
    resumed.load_state(state)
    assert all(np.array_equal(a, b) for a, b in zip(resumed.next_batch(), expected))


def test_target_only_evaluation_matches_a_numpy_reference():
    model_cfg, _ = load_preset("debug")
    mx.random.seed(0)
    model = Model(model_cfg, "dense")
    model.train(False)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=4 * 32 + 1).astype(np.uint16)
    mask = (rng.random(tokens.size) < 0.3).astype(np.uint8)
    got = evaluate(model, tokens, np.ones(256, dtype=np.int64), 4, 32, None, mask)
    x = tokens[:-1].reshape(1, -1)[:, :128].reshape(4, 32)
    y = tokens[1:129].reshape(4, 32)
    logits = np.array(model(mx.array(x.astype(np.int32)))[0], dtype=np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, y[..., None].astype(np.int64), -1)[..., 0]
    keep = mask[1:129].reshape(4, 32).astype(bool)
    assert got["tokens"] == keep.sum() and got["loss_on"] == "target"
    assert got["loss"] == pytest.approx(nll[keep].mean(), rel=1e-5)


@pytest.mark.parametrize("record, words", [
    ({"question": "q", "answer": "a"}, "nor 'prompt'/'completion' or 'messages'"),
    ({"prompt": "q", "completion": ""}, "'completion' is empty"),
    ({"prompt": "q", "completion": "  \n"}, "'completion' is empty"),
    ({"prompt": "q"}, "has 'prompt' but no 'completion'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, "is empty"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role 'robot'"),
    ({"messages": "hello"}, "'messages' must be a non-empty list"),
])
def test_malformed_examples_are_one_line_errors(tmp_path, record, words):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "fine", "completion": "ok"}, record])
    with pytest.raises(TinyMoeError, match="bad.jsonl:2: "):
        read_documents([str(path)])
    result = CliRunner().invoke(cli, ["train", "--preset", "debug", "--data", str(path), "--out",
                                      str(tmp_path / "run")])
    assert result.exit_code == 2 and words in result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error: ")
    assert not (tmp_path / "run").exists()


def test_loss_on_target_trains_and_eval_counts_target_tokens(tmp_path):
    qa = _write(tmp_path / "qa.jsonl", [{"prompt": f"What is {i % 9} plus {i % 7}?", "completion": str(i % 9 + i % 7)}
                                        for i in range(400)])
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--preset", "debug", "--data", str(qa), "--loss-on", "target",
                                      "--steps", "4", "--out", str(run), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    val = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
    assert val[-1]["val_loss_on"] == "target"
    out = CliRunner().invoke(cli, ["eval", str(run), "--data", str(qa), "--json", "--max-batches", "2"])
    scored = json.loads(out.output)
    assert scored["loss_on"] == "target"
    # the reference count: target tokens among the targets of the 2 x 8 windows scored, which
    # --max-batches spreads evenly over the whole text (tinymoe.data.batches.spread_windows)
    data = tokenize_documents(read_documents([str(qa)]), ByteTokenizer(), None, 33)
    n_windows = (len(data.tokens) - 1) // 32
    starts = np.unique(np.linspace(0, n_windows - 1, 16).round().astype(np.int64)) * 32
    mask = np.asarray(data.mask)[(starts[:, None] + np.arange(1, 33)).reshape(-1)]
    assert scored["tokens"] == int(mask.sum())
    text = CliRunner().invoke(cli, ["eval", str(run), "--data", str(qa), "--max-batches", "2"]).output
    assert f"{scored['tokens']:,} target tokens scored" in text
