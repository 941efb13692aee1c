"""Which window each global sequence index reads: a function of the seed alone.

Global sequence k reads window ``permutation(W, seed, k // W)[k % W]``, so the order
never depends on how many ranks split it, and it runs on forever, epoch after epoch.
"""

import functools
import hashlib

import numpy as np
import torch


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed that differs for every (seed, epoch) pair."""
    digest = hashlib.sha256(f"{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@functools.lru_cache(maxsize=4)
def permutation(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the windows within one epoch (cached: a step touches one or two epochs)."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_windows, generator=generator).numpy()


def windows_for(sequence_indices: np.ndarray, num_windows: int, seed: int) -> np.ndarray:
    """The window index read by each global sequence index."""
    epochs, positions = np.divmod(sequence_indices, num_windows)
    windows = np.empty_like(sequence_indices)
    for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        windows[in_epoch] = permutation(num_windows, seed, int(epoch))[positions[in_epoch]]
    return windows
