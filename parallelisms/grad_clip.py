"""Global gradient-norm clipping across FSDP shards and pipeline stages."""

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@torch.no_grad()
def total_grad_norm(
    params: list[torch.Tensor], pp_group: Optional[dist.ProcessGroup], skip: Iterable[torch.Tensor] = ()
) -> torch.Tensor:
    """The whole model's gradient norm.

    Each rank's sharded (DTensor) norm is completed over its shard group, then
    the squares are summed over the pipeline ranks. ``skip`` holds duplicates
    (a tied head copy) so each logical parameter counts once, as in one process.
    A gradient in a lower precision than its parameter (parallelisms/compute_weights.py)
    is summed in fp32: its norm is that of its fp32 cast.
    """
    skipped = {id(t) for t in skip}
    counted = [p for p in params if p.grad is not None and id(p) not in skipped]
    lower = [p.grad for p in counted if p.grad.dtype != p.dtype]
    grads = [p.grad for p in counted if p.grad.dtype == p.dtype]
    total = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True) if grads else None
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if lower:  # as get_total_norm sums, each tensor's norm in fp32
        norms = torch._foreach_norm(lower, 2.0, dtype=torch.float32)
        lower_total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        total = lower_total if total is None else torch.linalg.vector_norm(torch.stack([total, lower_total]), 2.0)
    if total is None:
        total = torch.zeros(())
    if pp_group is not None:
        device = next((p.grad.device for p in params if p.grad is not None), total.device)
        total = total.to(device) ** 2
        dist.all_reduce(total, group=pp_group)
        total = total.sqrt()
    return total


def clip_divisor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What the gradients are divided by to clip them to ``max_norm`` (``torch.nn.utils.clip_grad_norm_``'s
    coefficient, inverted): handed to the fused AdamW kernel as its ``grad_scale``, so clipping costs no
    separate pass over the gradients."""
    return ((norm + 1e-6) / max_norm).clamp(min=1.0)
