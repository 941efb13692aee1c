"""``build_loss``: the one way to build a loss, with or without the vocab-parallel head."""

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from losses.base import OutputLoss
from losses.entries.vocab_parallel import VocabParallelLoss
from losses.options import COMMON_OPTIONS
from losses.registry import ENTRIES, validate_loss_options
from losses.resolve import choose_loss


def build_loss(
    name: str,
    head: nn.Module,
    options: dict,
    *,
    reduction: str = "mean",
    device: torch.device,
    dtype: Optional[torch.dtype] = None,
    vocab_group: Optional[dist.ProcessGroup] = None,
) -> OutputLoss:
    """Check ``options``, choose how to compute ``name`` (``choose_loss``) and build the loss around
    ``head``. ``dtype``: of the hidden states it will see (default: the head's weight's).
    ``vocab_group``: ``head``'s classifier is sharded by vocabulary over this group (the
    vocab-parallel head). The result's ``choice`` says what was chosen and why."""
    validate_loss_options(name, options)
    device = torch.device(device)
    choice = choose_loss(
        name,
        options,
        device_type=device.type,
        dtype=dtype or head.weight.dtype,
        vocab_parallel=vocab_group is not None,
        bias=getattr(head, "bias", None) is not None,
    )
    if vocab_group is not None:
        common = {k: v for k, v in options.items() if k in COMMON_OPTIONS}
        loss = VocabParallelLoss(head, group=vocab_group, backend=choice.entry, reduction=reduction, **common)
    else:
        cls = ENTRIES[choice.entry]
        own = {k: v for k, v in options.items() if k in cls.options}
        loss = cls(head, reduction=reduction, kernels=choice.kernels, **own)
    loss.choice = choice
    return loss
