"""The loss of the vocab-parallel head: what ``build_loss`` returns when given a ``vocab_group``.

The group's ranks gather their hidden states and targets (``parallelisms/vocab_parallel.py``),
compute the loss of all of them against their own classifier rows with the vocab-parallel
math (``losses/vocab_parallel.py``, the vocab-parallel function of the entry ``losses/resolve.py``
picked), and the gather's backward reduce-scatters the hidden-state gradient back, so
each rank ends with its own tokens' hidden-state gradient and its rows' classifier gradient.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from losses.base import OutputLoss
from losses.functional import linear_logits
from losses.vocab_parallel import VocabParallelOptions, vocab_parallel_linear_cross_entropy
from parallelisms.vocab_parallel import gather_rows, vocab_rows


class VocabParallelLoss(OutputLoss):
    """Reduction "sum" only (training and evaluation both sum). Every rank computes the sum over
    the group's tokens; each returns 1/n of it, so summing the ranks' values (as data parallelism
    does) counts every token once, while its backward is that of the whole sum for its rows."""

    name = "vocab_parallel"  # not a registry entry: the mode build_loss builds for a vocab_group

    def __init__(self, head: nn.Module, *, group: dist.ProcessGroup, backend: str, **common):
        super().__init__(head, **common)
        if self.reduction != "sum":
            raise ValueError(f"the vocab-parallel head's loss sums over tokens; got reduction {self.reduction!r}")
        if not isinstance(head.weight, DTensor):
            raise ValueError(
                "the head's classifier is not vocab-sharded: shard it with "
                "parallelisms.vocab_parallel.shard_head_over_vocab first"
            )
        if getattr(head, "bias", None) is not None:
            raise ValueError("the vocab-parallel head takes no bias")
        self.shard = VocabParallelOptions(*vocab_rows(head.weight), group, reduce_e_grad=False)
        self.backend = backend

    def linear_loss(self, e: Tensor, c: Tensor, bias: Optional[Tensor], targets: Tensor) -> Tensor:
        group = self.shard.group
        e = gather_rows(e, group)
        with torch.no_grad():
            targets = gather_rows(targets, group)
        total = vocab_parallel_linear_cross_entropy(
            e,
            c.to_local().to(e.dtype),
            targets,
            self.shard,
            ignore_index=self.ignore_index,
            softcap=self.logit_softcap or None,
            reduction="sum",
            z_loss_weight=self.z_loss_weight,
            label_smoothing=self.label_smoothing,
            impl=self.backend,
            vocab_size=self.head.weight.shape[0],  # the DTensor's global rows: no all-reduce to learn it
        )
        # The value is this rank's share of the group's sum; the gradient is the whole sum's.
        return total.detach() / dist.get_world_size(group) + (total - total.detach())

    def forward_logits(self, hidden: Tensor) -> Tensor:
        """Full logits for evaluation: gathers the classifier, so not for training."""
        return linear_logits(hidden, self.head.weight.full_tensor().to(hidden.dtype), None, self.logit_softcap)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows=[{self.shard.start}, {self.shard.stop}), backend={self.backend!r}"
