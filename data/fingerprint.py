"""What a saved data position belongs to: the token stream itself, not the path or format it was read from.

A position (the step counter) means the same windows only on the same tokens cut the same way: the same
stream, ``seq_len``, global batch size and seed. The stream is known by its length and a digest of a few MB
of it, so the corpus tokenized at start-up, its pre-tokenized copy (scripts/pretokenize.py) and either one
moved or spelled another way all resume each other's positions, while a memory-mapped multi-GB token file
costs milliseconds. The dataset, its path and the tokenizer are recorded to describe the data, not compared.
"""

import hashlib
from typing import Any

import numpy as np

DIGEST = "tokens_sha256"
EDGE_TOKENS = 1 << 20  # hashed at each end of the stream
SAMPLES, SAMPLE_TOKENS = 64, 4096  # blocks hashed at even spacing between the two ends
ORDER = ("seq_len", "global_batch_size", "seed")  # with the stream, what the windows' order depends on


def token_digest(tokens: np.ndarray) -> str:
    """sha256 of the stream's first and last ``EDGE_TOKENS`` and ``SAMPLES`` blocks between, as little-endian
    uint32 (the whole stream when it is short): about 9 MB read, whatever the stream's size."""
    digest = hashlib.sha256()
    n = len(tokens)
    if n <= 2 * EDGE_TOKENS + SAMPLES * SAMPLE_TOKENS:
        spans = [(0, n)]
    else:
        starts = np.linspace(EDGE_TOKENS, n - EDGE_TOKENS - SAMPLE_TOKENS, SAMPLES).astype(np.int64)
        spans = [(0, EDGE_TOKENS), *((int(s), int(s) + SAMPLE_TOKENS) for s in starts), (n - EDGE_TOKENS, n)]
    for start, end in spans:
        digest.update(np.ascontiguousarray(tokens[start:end], dtype="<u4").tobytes())
    return digest.hexdigest()


def data_fingerprint(
    tokens: np.ndarray,
    *,
    dataset: str,
    dataset_path: str,
    tokenizer: str,
    seq_len: int,
    global_batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """What a loader's position is saved with; keys without dots (a checkpoint stores each as an entry)."""
    return {
        "num_tokens": len(tokens),
        DIGEST: token_digest(tokens),
        "seq_len": seq_len,
        "global_batch_size": global_batch_size,
        "seed": seed,
        # described, not compared (and what positions saved before the digest compared, by their spelling)
        "dataset": dataset,
        "dataset_path": dataset_path,
        "tokenizer": tokenizer,
    }


def names_by_path(saved: dict[str, Any]) -> bool:
    """A fingerprint saved before the digest existed: it named the data by its path."""
    return DIGEST not in saved


def fingerprint_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the data a position was saved with and ``now``'s, one phrase each (empty: none).

    A fingerprint that names the data by its path (``names_by_path``) is matched on the token count, which with
    seq_len, the global batch size and the seed is all the order depends on: comparing its path would refuse
    every moved or pre-tokenized copy, which is what made it unresumable, and its next save records the digest.
    """
    changes = []
    same_stream = saved.get("num_tokens") == now["num_tokens"] and saved.get(DIGEST, now[DIGEST]) == now[DIGEST]
    if not same_stream:
        other = " (as many, other tokens)" if saved.get("num_tokens") == now["num_tokens"] else ""
        changes.append(f"tokens: saved {_describe(saved)}, now {_describe(now)}{other}")
    changes += [f"{key}: saved {saved.get(key)!r}, now {now[key]!r}" for key in ORDER if saved.get(key) != now[key]]
    return changes


def _describe(fingerprint: dict[str, Any]) -> str:
    count, path = fingerprint.get("num_tokens"), fingerprint.get("dataset_path")
    count = f"{count:,}" if isinstance(count, int) else repr(count)
    return f"{count} tokens of {path!r} ({fingerprint.get('dataset')}, tokenizer {fingerprint.get('tokenizer')})"
