"""Tokenizers across the Hugging Face boundary: byte-level and sentencepiece checkpoints export a
tokenizer.json that encodes identically (and comes back as the same kind), an imported
tokenizer.json runs as kind "hf", and an exported directory generates with mlx-lm."""

import pytest

mx = pytest.importorskip("mlx.core")

from test_interop import TOL, random_checkpoint  # noqa: E402

TEXT = "def route(tokens):\n    return sorted(tokens)  # experts\n" * 30 + "To be, or not to be.\n" * 30


def test_exported_directory_generates_with_mlx_lm(tmp_path):
    mlx_lm = pytest.importorskip("mlx_lm")
    from tinymoe.interop.export import export_hf

    random_checkpoint(tmp_path / "ckpt")
    report = export_hf(str(tmp_path / "ckpt"), tmp_path / "hf")
    assert report["mlx_lm_max_abs_logit_diff"] < TOL
    model, tokenizer = mlx_lm.load(str(tmp_path / "hf"))
    assert tokenizer.encode("Hé") == list("Hé".encode())  # byte-level: token id = byte
    text = mlx_lm.generate(model, tokenizer, prompt="The ", max_tokens=8, verbose=False)
    assert isinstance(text, str)


def test_sentencepiece_tokenizer_exports_and_returns(tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer

    from tinymoe.interop.export import export_hf
    from tinymoe.interop.import_hf import load_hf
    from tinymoe.tokenizers.builtin import train_sentencepiece

    sp = train_sentencepiece([TEXT], 300)
    random_checkpoint(tmp_path / "ckpt", tokenizer=sp)
    report = export_hf(str(tmp_path / "ckpt"), tmp_path / "hf", check=False)
    assert report["tokenizer"] == "sp" and report["tokenizer_matches"] is True
    sample = "    return experts  ünïcode ✓\n\n"
    assert Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json")).encode(sample).ids == sp.encode(sample)
    back = load_hf(tmp_path / "hf")["tokenizer"]
    assert back.kind == "sp" and back.model_proto == sp.model_proto


def test_foreign_sentencepiece_style_tokenizer_counts_bytes(tmp_path):
    """A tokenizer.json with U+2581 spaces and <0xNN> byte pieces, run as kind "hf": encoding
    matches the tokenizers library and token byte lengths add up to the text's UTF-8 length."""
    pytest.importorskip("tokenizers")
    import json

    from tokenizers import Tokenizer

    from tinymoe.tokenizers.hf import HFTokenizer, sentencepiece_tokenizer_json
    from tinymoe.tokenizers.builtin import train_sentencepiece

    text = json.dumps(sentencepiece_tokenizer_json(train_sentencepiece([TEXT], 300).model_proto))
    tok = HFTokenizer(text, 320, {"eos_token": "</s>"})
    sample = "    return experts ünïcode ✓"
    ids = tok.encode(sample)
    assert ids == Tokenizer.from_str(text).encode(sample).ids and tok.decode(ids) == sample
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (320,) and int(lengths[ids].sum()) == len(sample.encode())
    assert tok.to_manifest()["kind"] == "hf" and len(tok.to_manifest()["sha256"]) == 64
