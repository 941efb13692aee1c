"""Whether the data holds the EOS that ``block_causal`` masks at: its first windows, looked at once at start-up.

Text, JSONL and Parquet data are tokenized with the run's tokenizer, which puts its EOS after every
document. A tokens file holds whatever wrote it: written with another tokenizer (another EOS id), or
with no EOS between documents, its windows hold no EOS of this one, and block_causal trains exactly
as causal would, without a word.
"""

from typing import Optional

import numpy as np

# Tokens looked at: at most 64 MB of a memory-mapped file, read once; no document is that long.
EOS_SCAN_TOKENS = 1 << 24


def missing_eos_warning(windows: np.ndarray, eos_id: int, path: str) -> Optional[str]:
    """None if the first windows (``[W, seq_len]``, in file order) hold ``eos_id``. If none does: a
    ValueError when that was all of the data, else a warning, since a document could be that long."""
    first = windows[: max(1, EOS_SCAN_TOKENS // windows.shape[1])]
    if (first == eos_id).any():
        return None
    fix = (
        "if the data was tokenized with another tokenizer, re-tokenize it with the run's (scripts/pretokenize) "
        'or set model.eos_token to the EOS it was written with; else set model.attn_mask_type = "causal"'
    )
    if len(first) == len(windows):
        raise ValueError(
            f"{path} holds no EOS (id {eos_id}, the end of sequence of the run's tokenizer) in any of its "
            f"{len(windows):,} windows, so block_causal, which masks at EOS, would train exactly as causal; {fix}"
        )
    return (
        f"block_causal: no EOS (id {eos_id}, the run's tokenizer's) in the first {first.size:,} tokens of {path}, "
        f"so each of their windows is one document, as under causal; {fix}"
    )
