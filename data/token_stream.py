"""A dataset as one flat token stream: tokenized documents, or a memory-mapped token file."""

from pathlib import Path

import numpy as np

from data.documents import input_files, jsonl_documents, text_documents
from data.tokenizer import Tokenizer

DOCUMENT_READERS = {"text": (text_documents, ".txt"), "jsonl": (jsonl_documents, ".jsonl")}
FORMATS = (*DOCUMENT_READERS, "tokens")

# Tokens scanned at a time when checking a token file, so checking never loads it whole.
TOKEN_CHECK_CHUNK = 1 << 24

_streams: dict[tuple, np.ndarray] = {}


def load_token_stream(dataset: str, path: Path, tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """The uint32 token stream for ``dataset`` (one of FORMATS) at ``path``.

    Cached per process, keyed by the files' size and mtime, so each rank's loader and
    every test re-building a loader tokenize the corpus once.
    """
    if dataset == "tokens":
        files = [token_file(path)]
    else:
        read_documents, suffix = DOCUMENT_READERS[dataset]
        files = input_files(path, suffix)
    key = (dataset, tokenizer.name, vocab_size, *((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _streams:
        if dataset == "tokens":
            _streams[key] = map_token_file(path, vocab_size)
        else:
            _streams[key] = tokenize_documents(read_documents(files), tokenizer)
    return _streams[key]


def tokenize_documents(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """Documents joined into one stream with EOS after every document."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc))
        ids.append(tokenizer.eos_id)
    return np.array(ids, dtype=np.uint32)


def token_file(path: Path) -> Path:
    """``path``, which must be one file: a token dataset is never a folder."""
    if not path.is_file():
        raise ValueError(
            f"{path}: no such file; dataset = \"tokens\" needs dataset_path to be one flat uint32 token file "
            f"(relative to {Path.cwd()})"
        )
    return path


def map_token_file(path: Path, vocab_size: int) -> np.ndarray:
    """A little-endian uint32 token file, memory-mapped and checked chunk by chunk."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: empty file (no tokens); write the token ids as little-endian uint32")
    if size % 4:
        raise ValueError(f"{path}: size {size} bytes is not a multiple of 4; a tokens file holds little-endian uint32 token ids")
    tokens = np.memmap(path, dtype="<u4", mode="r")
    for start in range(0, len(tokens), TOKEN_CHECK_CHUNK):
        chunk = tokens[start : start + TOKEN_CHECK_CHUNK]
        if chunk.max() >= vocab_size:
            offset = start + int(np.argmax(chunk >= vocab_size))
            raise ValueError(
                f"{path}: token id {int(tokens[offset])} at offset {offset} (in tokens) is >= the model's "
                f"vocab_size {vocab_size}; re-tokenize with a tokenizer that fits the model or raise vocab_size"
            )
    return tokens
