"""Global gradient-norm clipping across FSDP shards and pipeline stages."""

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(
    params: list[torch.Tensor],
    max_norm: float,
    pp_group: Optional[dist.ProcessGroup],
    skip: Iterable[torch.Tensor] = (),
) -> torch.Tensor:
    """Clip ``params`` to the norm of the whole model's gradient; returns that norm.

    Each rank's sharded (DTensor) norm is completed over its shard group, then
    the squares are summed over the pipeline ranks. ``skip`` holds duplicates
    (a tied head copy) so each logical parameter counts once, as in one process.
    """
    skipped = {id(t) for t in skip}
    grads = [p.grad for p in params if p.grad is not None and id(p) not in skipped]
    total = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True) if grads else torch.zeros(())
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if pp_group is not None:
        device = next((p.grad.device for p in params if p.grad is not None), total.device)
        total = total.to(device) ** 2
        dist.all_reduce(total, group=pp_group)
        total = total.sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total, foreach=True)
    return total
