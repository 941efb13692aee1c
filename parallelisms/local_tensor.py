"""What this rank holds of a tensor that may be a DTensor: code that works shard by shard needs no dispatch."""

import torch
from torch.distributed.tensor import DTensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t``'s local shard, or ``t`` itself when plain; under no_grad, the DTensor's own local tensor (writes
    to it are writes to ``t``)."""
    return t.to_local() if isinstance(t, DTensor) else t
