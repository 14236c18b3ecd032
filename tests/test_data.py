"""Tokenizers, corpus reading, the token cache, the train/validation split and batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tinymoe.data.batches import BatchSampler, eval_batches, split_train_val
from tinymoe.data.corpus import Document, bundled_corpus_dir, read_documents
from tinymoe.data.tokens import TokenData, tokenize_documents
from tinymoe.errors import TinyMoeError
from tinymoe.tokenizers.builtin import ByteTokenizer, SentencePieceTokenizer, parse_tokenizer_spec, train_sentencepiece
from tinymoe.tokenizers.load import load_tokenizer

TRICKY_TEXT = (
    "First line.\n\n\n  two leading spaces, two trailing  \n"
    "\ttab\r\nCRLF line\n"
    "Ünïcödé: café, naïve, 日本語, emoji 🙂, math ∑ and digits 12345.\n"
)
CODE_TEXT = (
    "class Box:\n"
    '    """A box."""\n'
    "\n"
    "    def __init__(self, width: int = 3) -> None:\n"
    "        self.width = width  # métres\n"
    "        if width > 10:\n"
    "            raise ValueError(f'too wide: {width!r}')\n"
    "\n"
    "\n"
    "def area(box):\n"
    "\treturn box.width ** 2\n"
)


@pytest.fixture(scope="module")
def train_texts() -> list[str]:
    corpus = bundled_corpus_dir()
    prose = (corpus / "prose" / "shakespeare.txt").read_text(encoding="utf-8")[:20000]
    code = (corpus / "code" / "textwrap.py.txt").read_text(encoding="utf-8")[:12000]
    return [prose, code]


@pytest.fixture(scope="module")
def sp_tokenizer(train_texts) -> SentencePieceTokenizer:
    return train_sentencepiece(train_texts, 400)


class CountingByteTokenizer(ByteTokenizer):
    def __init__(self):
        self.encode_calls = 0

    def encode(self, text):
        self.encode_calls += 1
        return super().encode(text)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_contract():
    tok = ByteTokenizer()
    ids = tok.encode(TRICKY_TEXT)
    assert ids == list(TRICKY_TEXT.encode("utf-8"))
    assert tok.decode(ids) == TRICKY_TEXT
    assert tok.decode(np.asarray(ids, dtype=np.uint16)) == TRICKY_TEXT
    # A window cut inside a multi-byte character decodes with a replacement char instead of raising.
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (256,) and lengths.dtype == np.int64 and np.all(lengths == 1)
    assert tok.to_manifest() == {"kind": "bytes", "vocab_size": 256}


def test_sentencepiece_round_trips_prose_and_code(sp_tokenizer, train_texts):
    assert sp_tokenizer.kind == "sp" and sp_tokenizer.vocab_size == 400
    for text in [*train_texts, TRICKY_TEXT, CODE_TEXT, "   \n\n\t\n", "x"]:
        ids = sp_tokenizer.encode(text)
        assert all(0 <= i < sp_tokenizer.vocab_size for i in ids)
        assert sp_tokenizer.decode(ids) == text
    # Even a few dozen merges put training text below one token per byte.
    assert len(sp_tokenizer.encode(train_texts[0])) < 0.8 * len(train_texts[0].encode())


def test_sentencepiece_token_byte_lengths_sum_to_utf8_length(sp_tokenizer, train_texts):
    lengths = sp_tokenizer.token_byte_lengths()
    assert lengths.shape == (400,)
    assert lengths[0] == 0  # <unk> stands for no text
    for text in [train_texts[1][:3000], TRICKY_TEXT, CODE_TEXT]:
        ids = np.asarray(sp_tokenizer.encode(text))
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


def test_sentencepiece_is_deterministic_and_saves_and_loads(sp_tokenizer, train_texts, tmp_path):
    again = train_sentencepiece(train_texts, 400)
    assert again.model_proto == sp_tokenizer.model_proto
    entry = sp_tokenizer.to_manifest()
    assert entry == {"kind": "sp", "vocab_size": 400, "file": "tokenizer.model"}
    sp_tokenizer.save(tmp_path / "tokenizer.model")
    loaded = load_tokenizer(entry, tmp_path)
    assert loaded.model_proto == sp_tokenizer.model_proto
    assert loaded.encode(CODE_TEXT) == sp_tokenizer.encode(CODE_TEXT)
    assert isinstance(load_tokenizer({"kind": "bytes", "vocab_size": 256}, tmp_path), ByteTokenizer)


def test_load_tokenizer_errors_name_the_file(sp_tokenizer, tmp_path):
    with pytest.raises(TinyMoeError, match="tokenizer.model"):
        load_tokenizer(sp_tokenizer.to_manifest(), tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TinyMoeError, match="tokenizer.model"):
        load_tokenizer(sp_tokenizer.to_manifest(), tmp_path)
    sp_tokenizer.save(tmp_path / "tokenizer.model")
    with pytest.raises(TinyMoeError, match="manifest says 999"):
        load_tokenizer({"kind": "sp", "vocab_size": 999, "file": "tokenizer.model"}, tmp_path)
    with pytest.raises(TinyMoeError, match="unknown tokenizer kind"):
        load_tokenizer({"kind": "wordpiece"}, tmp_path)


def test_sentencepiece_vocab_too_large_for_text_is_a_user_error():
    with pytest.raises(TinyMoeError, match="sp:5000"):
        train_sentencepiece(["tiny text, tiny text.\n"] * 3, 5000)


def test_parse_tokenizer_spec():
    assert parse_tokenizer_spec("bytes") == ("bytes", None)
    assert parse_tokenizer_spec("sp:2000") == ("sp", 2000)
    assert parse_tokenizer_spec("sp:100") == ("sp", 100)
    for bad in ["sp:99", "sp:", "sp:abc", "bpe:2000", "", "bytes:1"]:
        with pytest.raises(TinyMoeError):
            parse_tokenizer_spec(bad)


# ----------------------------------------------------------------------------- reading


@pytest.fixture()
def corpus_tree(tmp_path) -> Path:
    root = tmp_path / "corpus"
    write(root / "prose" / "b.txt", "prose b")
    write(root / "prose" / "a.txt", "prose a")
    write(root / "prose" / "deep" / "c.txt", "prose c")
    write(root / "code" / "x.py", "print('x')\n")
    write(root / "top.txt", "top level")
    write(root / ".hidden.txt", "hidden")
    write(root / ".git" / "config", "hidden dir")
    write(root / "code" / "LICENSE-PSF.txt", "license text")
    return root


def test_read_directory_domains_order_and_skips(corpus_tree):
    docs = read_documents([str(corpus_tree)])
    got = [(Path(d.source).relative_to(corpus_tree).as_posix(), d.domain, d.text) for d in docs]
    assert got == [
        ("code/x.py", "code", "print('x')\n"),
        ("prose/a.txt", "prose", "prose a"),
        ("prose/b.txt", "prose", "prose b"),
        ("prose/deep/c.txt", "prose", "prose c"),
        ("top.txt", "default", "top level"),
    ]


def test_read_file_glob_and_domain_tag(corpus_tree):
    single = read_documents([str(corpus_tree / "prose" / "a.txt")])
    assert [(d.text, d.domain) for d in single] == [("prose a", "default")]
    globbed = read_documents([str(corpus_tree / "prose" / "*.txt")])
    assert [(d.text, d.domain) for d in globbed] == [("prose a", "default"), ("prose b", "default")]
    specs = [f"poetry={corpus_tree / 'prose'}", f"src={corpus_tree / 'code' / 'x.py'}"]
    tagged = read_documents(specs)
    assert [(d.text, d.domain) for d in tagged] == [
        ("prose a", "poetry"),
        ("prose b", "poetry"),
        ("prose c", "poetry"),
        ("print('x')\n", "src"),
    ]


def test_read_jsonl_records(tmp_path):
    path = tmp_path / "data" / "mixed" / "recs.jsonl"
    lines = [
        json.dumps({"text": "one", "domain": "math"}),
        "",
        json.dumps({"text": "two"}),
        json.dumps({"body": "three", "src": "web"}),
    ]
    write(path, "\n".join(lines[:3]) + "\n")
    docs = read_documents([str(tmp_path / "data")])
    assert [(d.text, d.domain, d.source) for d in docs] == [
        ("one", "math", f"{path}:1"),
        ("two", "mixed", f"{path}:3"),
    ]
    tagged = read_documents([f"forced={path}"])
    assert [d.domain for d in tagged] == ["forced", "forced"]
    # A raw U+2028 inside a JSON string is not a line break; a byte-order mark is not text.
    odd = tmp_path / "odd.jsonl"
    odd.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "a\u2028b"}, ensure_ascii=False).encode())
    assert [d.text for d in read_documents([str(odd)])] == ["a\u2028b"]
    other = write(tmp_path / "other.jsonl", lines[3] + "\n")
    custom = read_documents([str(other)], text_field="body", domain_field="src")
    assert [(d.text, d.domain) for d in custom] == [("three", "web")]


def test_binary_files_are_skipped_with_a_warning(tmp_path, capsys):
    write(tmp_path / "good.txt", "good")
    (tmp_path / "blob.bin").write_bytes(b"\x89PNG\x00\x01\x02" * 10)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    docs = read_documents([str(tmp_path)])
    assert sorted(d.text for d in docs) == ["caf\ufffd", "good"]
    assert "blob.bin" in capsys.readouterr().err


def test_read_errors_name_the_problem(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(TinyMoeError, match="nowhere.txt"):
        read_documents([str(missing)])
    with pytest.raises(TinyMoeError, match=r"nomatch\*\.txt"):
        read_documents([str(tmp_path / "nomatch*.txt")])
    bad_json = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": \n')
    with pytest.raises(TinyMoeError, match=r"bad\.jsonl:2"):
        read_documents([str(bad_json)])
    no_text = write(tmp_path / "notext.jsonl", '{"text": "ok"}\n\n{"title": "x"}\n')
    with pytest.raises(TinyMoeError, match=r"notext\.jsonl:3.*'text'"):
        read_documents([str(no_text)])
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(TinyMoeError, match="no documents"):
        read_documents([str(empty_dir)])
    blank = tmp_path / "blank"
    write(blank / "a.txt", "")
    write(blank / "b.txt", "")
    with pytest.raises(TinyMoeError, match="all 2 documents are empty"):
        read_documents([str(blank)])


# ----------------------------------------------------------------------------- tokenizing


def test_tokenize_documents_layout():
    docs = [Document("ab", "zeta", "s1"), Document("", "zeta", "s2"), Document("é", "alpha", "s3")]
    data = tokenize_documents(docs, ByteTokenizer(), None)
    assert data.domain_names == ["alpha", "zeta"]
    assert data.tokens.dtype == np.uint16
    expected = list(b"ab\n\n") + list("é\n\n".encode())
    assert data.tokens.tolist() == expected
    assert data.domain_ids.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert len(data) == 8


def test_token_cache_hit_skips_encoding(tmp_path):
    docs = [Document("hello world " * 50, "a", "x"), Document("second doc", "b", "y")]
    first_tok = CountingByteTokenizer()
    first = tokenize_documents(docs, first_tok, tmp_path / "cache")
    assert first_tok.encode_calls > 0
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 4 and not any(".tmp" in name for name in files)  # tokens, domains, target mask, meta
    assert {Path(n).suffix for n in files} == {".bin", ".json"}

    second_tok = CountingByteTokenizer()
    second = tokenize_documents(docs, second_tok, tmp_path / "cache")
    assert second_tok.encode_calls == 0
    assert isinstance(second.tokens, np.memmap)
    np.testing.assert_array_equal(np.asarray(first.tokens), np.asarray(second.tokens))
    np.testing.assert_array_equal(np.asarray(first.domain_ids), np.asarray(second.domain_ids))
    assert second.domain_names == first.domain_names == ["a", "b"]

    changed = [Document("hello world " * 50, "a", "x"), Document("second doc!", "b", "y")]
    third_tok = CountingByteTokenizer()
    tokenize_documents(changed, third_tok, tmp_path / "cache")
    assert third_tok.encode_calls > 0
    assert len(list((tmp_path / "cache").iterdir())) == 8


# ----------------------------------------------------------------------------- splitting


def make_stream(n_tokens: int) -> TokenData:
    tokens = np.arange(n_tokens, dtype=np.uint16)
    return TokenData(tokens, (tokens % 2).astype(np.uint8), ["even", "odd"])


def test_split_is_deterministic_disjoint_and_complete():
    data = make_stream(50_000)
    train, val = split_train_val(data, val_fraction=0.1, block_tokens=1000)
    again_train, again_val = split_train_val(data, val_fraction=0.1, block_tokens=1000)
    np.testing.assert_array_equal(train.tokens, again_train.tokens)
    np.testing.assert_array_equal(val.tokens, again_val.tokens)
    assert len(val) == 5000 and len(train) == 45_000
    # Blocks 9, 19, 29, ... are validation.
    assert val.tokens[:1000].tolist() == list(range(9000, 10_000))
    both = np.sort(np.concatenate([train.tokens, val.tokens]))
    np.testing.assert_array_equal(both, data.tokens)
    np.testing.assert_array_equal(val.domain_ids, val.tokens % 2)
    assert val.domain_names == ["even", "odd"]


def test_split_small_stream_and_edge_fractions():
    data = make_stream(100)
    train, val = split_train_val(data, val_fraction=0.1, block_tokens=4096)
    assert train.tokens.tolist() == list(range(90)) and val.tokens.tolist() == list(range(90, 100))
    train, val = split_train_val(data, val_fraction=0.0)
    assert len(train) == 100 and len(val) == 0
    with pytest.raises(TinyMoeError):
        split_train_val(data, val_fraction=1.0)


# ----------------------------------------------------------------------------- batching


def test_batch_sampler_windows_and_resume():
    tokens = np.arange(5000, dtype=np.uint16)
    sampler = BatchSampler(tokens, batch_size=4, context=16, seed=7)
    for _ in range(3):
        inputs, targets = sampler.next_batch()
    assert inputs.shape == targets.shape == (4, 16)
    assert inputs.dtype == targets.dtype == np.int32
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
    np.testing.assert_array_equal(np.diff(inputs, axis=1), 1)  # contiguous slices of the stream
    np.testing.assert_array_equal(targets[:, -1], inputs[:, -1] + 1)

    state = json.loads(json.dumps(sampler.state()))
    assert state["batches_drawn"] == 3 and state["seed"] == 7
    resumed = BatchSampler(tokens, batch_size=4, context=16, seed=123)
    resumed.load_state(state)
    for _ in range(3):
        expected_inputs, expected_targets = sampler.next_batch()
        got_inputs, got_targets = resumed.next_batch()
        np.testing.assert_array_equal(got_inputs, expected_inputs)
        np.testing.assert_array_equal(got_targets, expected_targets)
    assert resumed.batches_drawn == 6

    other = BatchSampler(tokens, batch_size=4, context=16, seed=8).next_batch()[0]
    fresh = BatchSampler(tokens, batch_size=4, context=16, seed=7).next_batch()[0]
    assert not np.array_equal(other, fresh)


def test_batch_sampler_reaches_both_ends_of_a_tight_stream():
    tokens = np.arange(12, dtype=np.uint16)
    sampler = BatchSampler(tokens, batch_size=64, context=10, seed=0)
    inputs, targets = sampler.next_batch()
    assert set(inputs[:, 0].tolist()) == {0, 1}
    assert targets.max() == 11


def test_too_short_stream_message():
    with pytest.raises(TinyMoeError, match=r"corpus has 8 tokens; .*context\+1 = 9"):
        BatchSampler(np.arange(8, dtype=np.uint16), batch_size=2, context=8, seed=0)
    # Evaluation on a stream too short for one window (or empty) has nothing to yield.
    assert list(eval_batches(np.arange(8, dtype=np.uint16), batch_size=2, context=8)) == []
    assert list(eval_batches(np.zeros(0, dtype=np.uint16), batch_size=2, context=8)) == []


def test_eval_batches_cover_each_position_once():
    tokens = np.arange(103, dtype=np.uint16)
    batches = list(eval_batches(tokens, batch_size=4, context=10))
    assert [b[0].shape for b in batches] == [(4, 10), (4, 10), (2, 10)]
    inputs = np.concatenate([b[0] for b in batches]).ravel()
    targets = np.concatenate([b[1] for b in batches]).ravel()
    assert targets.tolist() == list(range(1, 101))
    assert inputs.tolist() == list(range(0, 100))
    assert batches[0][0].dtype == np.int32
    assert len(list(eval_batches(tokens, batch_size=4, context=10, max_batches=2))) == 2
    again = list(eval_batches(tokens, batch_size=4, context=10))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(batches, again))


# ----------------------------------------------------------------------------- bundled corpus


def test_bundled_corpus_has_two_domains_and_is_small():
    root = bundled_corpus_dir()
    assert root.is_dir()
    total_bytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total_bytes < 2 * 1024 * 1024
    assert not list(root.rglob("__init__.py"))
    docs = read_documents([str(root)])
    domains = {d.domain for d in docs}
    assert {"prose", "code"} <= domains
    assert not any("LICENSE" in Path(d.source).name for d in docs)
    for domain in domains:
        assert sum(len(d.text) for d in docs if d.domain == domain) > 100_000
