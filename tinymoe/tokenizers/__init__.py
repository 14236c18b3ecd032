"""Tokenizers: bytes, a trained sentencepiece BPE, imported Hugging Face tokenizer.json."""
