"""Normalize the loss by the tokens of the whole global batch.

Each microbatch's summed loss is divided by the number of targets in the
global batch (all gradient-accumulation steps, pipeline microbatches and
data-parallel ranks). Summing those terms, and summing gradients across ranks,
then gives exactly the single-process token mean, whatever the layout.
"""

import torch
import torch.distributed as dist
from torch import Tensor


def count_targets(labels: Tensor, ignore_index: int) -> Tensor:
    """Targets the loss will score: every next token that is not ``ignore_index``."""
    return (labels[:, 1:] != ignore_index).sum()


class GlobalTokenMeanLoss:
    """``loss(hidden, labels)`` with reduction "sum", divided by ``global_targets``."""

    def __init__(self, loss_sum: torch.nn.Module):
        self.loss_sum = loss_sum
        self.global_targets = 1

    def set_global_batch(self, labels: Tensor, ignore_index: int, dp_group: dist.ProcessGroup) -> None:
        count = count_targets(labels, ignore_index).to(torch.float64)
        dist.all_reduce(count, group=dp_group)
        self.global_targets = max(1, int(count.item()))

    def __call__(self, hidden: Tensor, labels: Tensor) -> Tensor:
        return self.loss_sum(hidden, labels) / self.global_targets
