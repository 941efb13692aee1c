"""A dataset as one flat token stream: tokenized documents, or a memory-mapped token file."""

import os
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np

from data.documents import (
    DocumentBatch,
    across_files,
    in_batches,
    input_files,
    jsonl_file_documents,
    text_file_documents,
)
from data.parquet_documents import check_parquet_files, parquet_file_documents
from data.tokenizer import Tokenizer

DOCUMENT_SUFFIXES = {"text": ".txt", "jsonl": ".jsonl", "parquet": ".parquet"}
FORMATS = (*DOCUMENT_SUFFIXES, "tokens")
# The format a file name says: a file so named, or a folder of them, read as another format is refused.
_FORMAT_OF_SUFFIX = {**{suffix: fmt for fmt, suffix in DOCUMENT_SUFFIXES.items()}, ".tokens": "tokens"}

# Tokens scanned at a time when checking a token file, so checking never loads it whole.
TOKEN_CHECK_CHUNK = 1 << 24

_streams: dict[tuple, np.ndarray] = {}


def load_token_stream(
    dataset: str, path: Path, tokenizer: Tokenizer, vocab_size: int, text_column: str = "text"
) -> np.ndarray:
    """The uint32 token stream for ``dataset`` (one of FORMATS) at ``path``.

    ``text_column`` names the JSONL field or Parquet column holding the text. Cached per process,
    keyed by the files' size and mtime, so each rank's loader and every test re-building a loader
    tokenize the corpus once.
    """
    files = dataset_files(dataset, path)
    key = (
        dataset,
        tokenizer.name,
        vocab_size,
        text_column,
        *((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files),
    )
    if key not in _streams:
        if dataset == "tokens":
            _streams[key] = map_token_file(path, vocab_size)
        else:
            _streams[key] = tokenize_batches(document_batches(dataset, files, text_column), tokenizer)
    return _streams[key]


def dataset_files(dataset: str, path: Path) -> list[Path]:
    """The readable files ``dataset`` (one of FORMATS) reads at ``path``: checked without reading them.

    A file, or a folder of files, whose names say another format (``.txt``, ``.jsonl``, ``.parquet``,
    ``.tokens``) is refused naming it: read as text, a JSONL file trains on its JSON syntax without a word.
    """
    named = [path] if path.is_file() else sorted(path.iterdir()) if path.is_dir() and dataset != "tokens" else []
    others = sorted({f.suffix for f in named if f.is_file() and _FORMAT_OF_SUFFIX.get(f.suffix, dataset) != dataset})
    if others and (path.is_file() or not any(f.suffix == DOCUMENT_SUFFIXES.get(dataset) for f in named)):
        fmt = _FORMAT_OF_SUFFIX[others[0]]
        what = f"a {others[0]} file" if path.is_file() else f"a folder of *{others[0]} files"
        pretokenize = "" if fmt == "tokens" else f"; --format {fmt} for scripts.pretokenize"
        raise ValueError(
            f'{path}: {what}, read as dataset = "{dataset}"; set the format to "{fmt}" '
            f"(--training.dataset {fmt}, or --validation.dataset {fmt}{pretokenize})"
        )
    files = [token_file(path)] if dataset == "tokens" else input_files(path, DOCUMENT_SUFFIXES[dataset])
    for file in files:
        if not os.access(file, os.R_OK):
            raise ValueError(f"{file}: not readable (permission denied); make it readable to this user")
    return files


def document_batches(dataset: str, files: list[Path], text_column: str) -> Iterator[DocumentBatch]:
    """The documents of ``files`` in order, in batches: the one reading path, for the trainer and pretokenizing.

    Every Parquet footer is checked here, before the first batch is read.
    """
    if dataset == "text":
        read_file = text_file_documents
    elif dataset == "jsonl":
        read_file = partial(jsonl_file_documents, text_column=text_column)
    else:
        check_parquet_files(files, text_column)
        read_file = partial(parquet_file_documents, text_column=text_column)
    return in_batches(across_files(files, read_file))


def tokenize_batch(documents: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """Documents as uint32 ids with EOS after every document."""
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer.encode(document))
        ids.append(tokenizer.eos_id)
    return np.array(ids, dtype=np.uint32)


def tokenize_batches(batches: Iterator[DocumentBatch], tokenizer: Tokenizer) -> np.ndarray:
    """All batches as one stream; only one batch's ids are ever Python ints."""
    return np.concatenate([tokenize_batch(batch.documents, tokenizer) for batch in batches])


def token_file(path: Path) -> Path:
    """``path``, which must be one file: a token dataset is never a folder."""
    if not path.is_file():
        raise ValueError(
            f'{path}: no such file; dataset = "tokens" needs dataset_path to be one flat uint32 token file '
            f"(relative to {Path.cwd()})"
        )
    return path


def map_token_file(path: Path, vocab_size: int) -> np.ndarray:
    """A little-endian uint32 token file, memory-mapped and checked chunk by chunk."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: empty file (no tokens); write the token ids as little-endian uint32")
    if size % 4:
        raise ValueError(
            f"{path}: size {size} bytes is not a multiple of 4; a tokens file holds little-endian uint32 token ids"
        )
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
