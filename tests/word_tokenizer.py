"""A tiny word-level tokenizer.json for data tests, made with the tokenizers library itself."""

import pytest


def write_word_tokenizer(folder, eos_token="<|endoftext|>"):
    """Ids: ``eos_token`` 0, [UNK] 1, hello 2, world 3; words split on whitespace and punctuation."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {eos_token: 0, "[UNK]": 1, "hello": 2, "world": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path
