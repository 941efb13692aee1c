"""The last stage's loss when the classifier is sharded by vocabulary over a mesh dim.

Ranks of the group all-gather their hidden states and labels, run the
vocab-parallel loss on the gathered batch against their own classifier rows,
and the all-gather's backward reduce-scatters the hidden-state gradient back
(``reduce_e_grad=False`` plus the reduce-scatter, not an all-reduce then a slice).
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from losses.functional import linear_logits, shift_targets
from losses.vocab_parallel import VocabParallelOptions, vocab_parallel_linear_cross_entropy


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0; backward reduce-scatters (sums) the gradient back to its owner."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        out = x.new_empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


class VocabParallelHeadLoss(nn.Module):
    """``loss(hidden [B, S, D], labels [B, S])`` summed over every token of the group.

    All ranks of the group return the same value; each rank's backward adds its
    classifier rows' share of the hidden-state gradient, so the group's gradients
    together are those of that one sum.
    """

    def __init__(self, head: nn.Module, group: dist.ProcessGroup, *, impl: str, ignore_index: int,
                 z_loss_weight: float, label_smoothing: float, logit_softcap: float):
        super().__init__()
        weight = head.weight
        assert isinstance(weight, DTensor), "shard the head with parallelisms.vocab_parallel first"
        shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
        self.options = VocabParallelOptions(offset[0], offset[0] + shape[0], group, reduce_e_grad=False)
        self.group, self.impl = group, impl
        self.ignore_index, self.z_loss_weight = ignore_index, z_loss_weight
        self.label_smoothing, self.logit_softcap = label_smoothing, logit_softcap
        object.__setattr__(self, "head", head)  # the model owns it

    def forward(self, hidden: Tensor, labels: Tensor) -> Tensor:
        e = _GatherRows.apply(hidden.flatten(0, -2), self.group)
        with torch.no_grad():
            targets = _GatherRows.apply(shift_targets(labels, 1, self.ignore_index).flatten(), self.group)
        weight = self.head.weight.to_local().to(hidden.dtype)
        return vocab_parallel_linear_cross_entropy(
            e, weight, targets, self.options, ignore_index=self.ignore_index,
            softcap=self.logit_softcap or None, reduction="sum", z_loss_weight=self.z_loss_weight,
            label_smoothing=self.label_smoothing, impl=self.impl)

    def forward_logits(self, hidden: Tensor) -> Tensor:
        """Full logits for evaluation: gathers the classifier, so not for training."""
        weight = self.head.weight.full_tensor().to(hidden.dtype)
        return linear_logits(hidden, weight, None, self.logit_softcap)
