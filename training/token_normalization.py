"""Normalize the loss by the tokens of the whole global batch.

Each microbatch's summed loss is divided by the number of targets in the
global batch (all gradient-accumulation steps, pipeline microbatches and
data-parallel ranks), times the data-parallel degree because FSDP averages
gradients over those ranks. The result is exactly the single-process token
mean, whatever the layout and however unevenly ``ignore_index`` falls.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from losses.functional import shift_targets


class GlobalTokenMeanLoss:
    """``loss(hidden, labels)`` with reduction "sum", scaled to this rank's share of the global mean.

    Pipeline ranks without the last stage hold one with ``loss_sum=None``: the
    schedule needs a loss function on every rank to run backward, but calls it
    only on the last stage.
    """

    def __init__(self, loss_sum: Optional[torch.nn.Module], dp_group: dist.ProcessGroup):
        self.loss_sum = loss_sum
        self.dp_group = dp_group
        self.denominator = torch.ones((), dtype=torch.float64)

    def set_global_batch(self, labels: Tensor, ignore_index: int) -> None:
        """``labels``: this rank's whole local batch for the coming step. The count stays on the device:
        reading it would make the host wait for the GPU to finish the step before."""
        count = (shift_targets(labels, 1, ignore_index) != ignore_index).sum().to(torch.float64)
        dist.all_reduce(count, group=self.dp_group)
        self.denominator = count.clamp(min=1.0) / dist.get_world_size(self.dp_group)

    def __call__(self, hidden: Tensor, labels: Tensor) -> Tensor:
        loss = self.loss_sum(hidden, labels)
        return loss / self.denominator.to(loss.dtype)
