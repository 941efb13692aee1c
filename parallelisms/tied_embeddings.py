"""Tied input/output embeddings when the pipeline separates them.

Without pipeline parallel the embedding and head are one parameter. With it,
the first stage owns the embedding and the last stage a copy used as the head
(both initialized from the same seed, see models/initialize.py). As Megatron
does, after backward the two gradients are summed across the ranks holding the
first and last stage of each pipeline, so both copies take identical steps.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from parallelisms.local_tensor import local_tensor
from parallelisms.pipeline import PipelinePlan


class TiedEmbeddingSync:
    """For a tied model whose head is a separate copy: under PP, or as a vocab-parallel head.

    The embedding's FSDP shard and a vocab-parallel head's shard hold the same
    rows (both ``Shard(0)`` over ``dp_shard``), so the sum is per shard either way.
    """

    def __init__(self, parts: list[nn.Module], plan: Optional[PipelinePlan], mesh: DeviceMesh):
        self.embedding = next((p.tok_embeddings.weight for p in parts if p.tok_embeddings is not None), None)
        self.head = next((p.output.weight for p in parts if p.output is not None), None)
        last_rank = (
            0 if plan is None else next(r for r in range(plan.pp_degree) if plan.num_stages - 1 in plan.stages_of(r))
        )
        self.group = None
        if last_rank != 0:  # stage 0 always sits on pipeline rank 0
            me = dist.get_rank()
            # One group per data-parallel coordinate; every rank creates all of them, in order.
            for pair in mesh.mesh[[0, last_rank]].reshape(2, -1).t().tolist():
                group = dist.new_group(pair)
                if me in pair:
                    self.group = group

    @property
    def head_copy(self) -> Optional[torch.Tensor]:
        """The duplicate to leave out of the gradient norm: the embedding already counts it."""
        return self.head

    def sync_grads(self) -> None:
        if self.embedding is not None and self.head is not None:  # both ends on this rank (V schedule)
            total = local_tensor(self.embedding.grad) + local_tensor(self.head.grad)
            local_tensor(self.embedding.grad).copy_(total)
            local_tensor(self.head.grad).copy_(total)
        elif self.group is not None:
            mine = self.embedding if self.embedding is not None else self.head
            dist.all_reduce(local_tensor(mine.grad), group=self.group)


def tied_embedding_sync(
    parts: list[nn.Module], plan: Optional[PipelinePlan], mesh: DeviceMesh, vocab_parallel: bool
) -> Optional[TiedEmbeddingSync]:
    """The sync a tied model needs where its head is a separate copy (pipeline stages, or the
    vocab-parallel head), else None: one module holds the one shared parameter."""
    tied = any(p.args.tie_word_embeddings for p in parts)
    return TiedEmbeddingSync(parts, plan, mesh) if tied and (plan is not None or vocab_parallel) else None
