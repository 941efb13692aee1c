"""The vocab-parallel head: the classifier sharded by vocabulary rows over ``dp_shard``.

FSDP already shards the classifier's dim 0, which is the vocabulary. Instead of
all-gathering it for the loss, each rank keeps its rows as a ``Shard(0)``
DTensor (the same rows FSDP would give it), the ranks all-gather their hidden
states and labels instead (``gather_rows``: ``n x tokens x dim``, far less than
``vocab x dim`` for Qwen3 at training batch sizes), and the loss runs vocab-parallel
on the gathered batch (losses/entries/vocab_parallel.py). The head's gradient then
needs no reduce-scatter; under HSDP it is all-reduced over ``dp_replicate`` only.
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from models.transformer import Transformer


def shard_head_over_vocab(model: Transformer, fsdp_mesh: DeviceMesh) -> nn.Parameter:
    """Replace the (meta) head weight by a vocab-sharded DTensor parameter, untied from the embedding.

    Call before ``apply_fsdp``, which must then leave this parameter alone. A tied
    embedding stays FSDP-sharded with the same rows, so the tie is kept by summing
    the two shards' gradients (parallelisms/tied_embeddings.py).
    """
    full = model.output.weight
    placements = [Replicate()] * (fsdp_mesh.ndim - 1) + [Shard(0)]
    local_shape, _ = compute_local_shape_and_global_offset(full.shape, fsdp_mesh, placements)
    local = torch.empty(local_shape, device="meta", dtype=full.dtype)
    sharded = DTensor.from_local(local, fsdp_mesh, placements, run_check=False, shape=full.shape, stride=full.stride())
    model.share_embedding = False
    model.output.weight = nn.Parameter(sharded)
    return model.output.weight


@torch.no_grad()
def finalize_head_grads(weight: nn.Parameter, fsdp_mesh: DeviceMesh, dp_degree: int) -> None:
    """Turn each rank's head gradient into its rows of the global-batch gradient.

    Every rank of a ``dp_shard`` group computed the gradient of the same loss (the
    group's gathered tokens), scaled like its own-token share (x dp / global
    tokens, see training/token_normalization.py): sum over ``dp_replicate``, divide by dp.
    """
    if weight.grad is None:
        return
    local = weight.grad.to_local()
    if fsdp_mesh.ndim > 1:
        dist.all_reduce(local, group=fsdp_mesh.get_group(0))
    local.div_(dp_degree)


def vocab_rows(weight: Tensor) -> tuple[int, int]:
    """Rows ``[start, stop)`` of the vocabulary this rank's shard of a vocab-sharded head holds."""
    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    return offset[0], offset[0] + shape[0]


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


def gather_rows(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The group's ``x`` stacked along dim 0 in rank order; the gradient of each rank's rows
    is summed over the group and returned to that rank (one reduce-scatter, not an all-reduce)."""
    return _GatherRows.apply(x, group)
