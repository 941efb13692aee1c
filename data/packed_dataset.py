"""The endless, resumable stream of one rank's local batches of packed windows."""

from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from data.fingerprint import fingerprint_changes
from data.window_order import windows_for


class PackedWindowDataset(IterableDataset):
    """Yields, for step t = 0, 1, 2, ..., rank ``dp_rank``'s slice of the global batch.

    The token stream is cut into W = len(tokens) // seq_len windows (the remainder is
    dropped). Step t's global batch is global sequences [t*G, (t+1)*G); rank r takes the
    contiguous slice [t*G + r*G/dp, t*G + (r+1)*G/dp), so the ranks together always see the
    same global batch whatever dp_degree is. The state is the step counter plus the
    data's fingerprint (data/fingerprint.py: the tokens by content, seq_len, global batch
    size, seed), which leaves dp_rank and dp_degree out on purpose: a run may resume on a
    different number of ranks.

    ``shuffle=False`` (validation) reads global sequence k from window k mod W: the windows
    in file order, so the same sequences come first whatever the seed.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seq_len: int,
        global_batch_size: int,
        dp_rank: int,
        dp_degree: int,
        seed: int,
        fingerprint: dict[str, Any],
        shuffle: bool = True,
    ):
        num_windows = len(tokens) // seq_len
        self.windows = tokens[: num_windows * seq_len].reshape(num_windows, seq_len)
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // dp_degree
        self.dp_rank = dp_rank
        self.seed = seed
        self.shuffle = shuffle
        self.fingerprint = fingerprint
        self.step = 0

    def local_batch(self, step: int) -> dict[str, torch.Tensor]:
        first = step * self.global_batch_size + self.dp_rank * self.local_batch_size
        sequence_indices = np.arange(first, first + self.local_batch_size, dtype=np.int64)
        rows = (
            windows_for(sequence_indices, len(self.windows), self.seed)
            if self.shuffle
            else sequence_indices % len(self.windows)
        )
        return {"input_ids": torch.from_numpy(np.asarray(self.windows[rows], dtype=np.int64))}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # A generator, not self: StatefulDataLoader then saves this dataset's state.
        while True:
            batch = self.local_batch(self.step)
            self.step += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "fingerprint": dict(self.fingerprint)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        changed = fingerprint_changes(state["fingerprint"], self.fingerprint)
        if changed:
            raise ValueError(f"data loader state was saved for other data ({'; '.join(changed)})")
        self.step = state["step"]
