"""The vocab-parallel head: the classifier sharded by vocabulary rows over ``dp_shard``.

FSDP already shards the classifier's dim 0, which is the vocabulary. Instead of
all-gathering it for the loss, each rank keeps its rows as a ``Shard(0)``
DTensor (the same rows FSDP would give it), the ranks all-gather their hidden
states and labels instead (``n x tokens x dim``, far less than ``vocab x dim``
for Qwen3 at training batch sizes), and the loss runs vocab-parallel on the
gathered batch (losses/vocab_parallel_head.py). The head's gradient then needs
no reduce-scatter; under HSDP it is all-reduced over ``dp_replicate`` only.
"""

import torch
import torch.distributed as dist
from torch import nn
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
