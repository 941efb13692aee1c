"""``build_dataloader``: the one entry point the trainer calls for its data."""

from pathlib import Path

from torchdata.stateful_dataloader import StatefulDataLoader

from data.fingerprint import data_fingerprint
from data.packed_dataset import PackedWindowDataset
from data.token_stream import FORMATS, load_token_stream
from data.tokenizer import Tokenizer


def build_dataloader(
    *,
    dataset: str,
    dataset_path: str,
    tokenizer: Tokenizer,
    seq_len: int,
    global_batch_size: int,
    dp_rank: int,
    dp_degree: int,
    seed: int,
    vocab_size: int,
    text_column: str = "text",
    shuffle: bool = True,
) -> StatefulDataLoader:
    """A resumable loader whose every item is this rank's local batch for one step.

    Each item is ``{"input_ids": LongTensor[global_batch_size // dp_degree, seq_len]}``;
    labels are the inputs (the loss shifts). It never ends: after the last window it
    starts the next epoch in a new seeded order. See PackedWindowDataset for the order.
    ``text_column`` names the JSONL field or Parquet column holding the text; ``shuffle=False``
    reads the windows in file order (validation).
    """
    check_batch_split(global_batch_size, dp_rank, dp_degree, seq_len)
    check_tokenizer_fits(tokenizer, vocab_size)
    if dataset not in FORMATS:
        raise ValueError(f"dataset {dataset!r}: expected one of {', '.join(map(repr, FORMATS))}")
    tokens = load_token_stream(dataset, Path(dataset_path), tokenizer, vocab_size, text_column)
    if len(tokens) < seq_len:
        raise ValueError(
            f"{dataset_path}: only {len(tokens)} tokens, but seq_len = {seq_len} needs at least {seq_len} "
            "for one window; add data or lower seq_len"
        )
    fingerprint = data_fingerprint(
        tokens,
        dataset=dataset,
        dataset_path=dataset_path,
        tokenizer=tokenizer.name,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        seed=seed,
    )
    windows = PackedWindowDataset(
        tokens,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        dp_rank=dp_rank,
        dp_degree=dp_degree,
        seed=seed,
        fingerprint=fingerprint,
        shuffle=shuffle,
    )
    return StatefulDataLoader(windows, batch_size=None, num_workers=0)


def check_batch_split(global_batch_size: int, dp_rank: int, dp_degree: int, seq_len: int) -> None:
    if seq_len < 1 or global_batch_size < 1 or dp_degree < 1:
        raise ValueError(
            f"seq_len ({seq_len}), global_batch_size ({global_batch_size}) and dp_degree ({dp_degree}) must all be >= 1"
        )
    if global_batch_size % dp_degree:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by dp_degree {dp_degree}; "
            f"make global_batch_size a multiple of {dp_degree}"
        )
    if not 0 <= dp_rank < dp_degree:
        raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_degree - 1} for dp_degree {dp_degree}")


def check_tokenizer_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Every id the tokenizer can emit, EOS included, must be a row of the model's embedding."""
    if tokenizer.vocab_size > vocab_size or tokenizer.eos_id >= vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name} has vocab_size {tokenizer.vocab_size} and EOS id {tokenizer.eos_id}, "
            f"which do not fit the model's vocab_size {vocab_size}; raise the model's vocab_size to at least "
            f"{max(tokenizer.vocab_size, tokenizer.eos_id + 1)} or use a smaller tokenizer"
        )
