"""A forward-only pass over the pipeline stages, for evaluation: no backward, no schedule.

Why not the schedule's ``eval()``: in torch 2.13 it fails under ZBVZeroBubble (the V's
stage-to-stage handoff on one rank asserts on the backward that eval skips), it re-runs the
stages' shape inference (a real forward and backward) at every switch between evaluation and
training, and it is tied to the training microbatch count. This pass takes any stage placement
(``PipelinePlan.stages_of``: one stage per rank, interleaved, V) and any number of microbatches.

Order: every rank walks the same list of (stage, microbatch) forwards, sorted by stage +
microbatch (GPipe's forward diagonal: stage s runs microbatch m + 1 while stage s + 1 runs m),
and does its part of each entry: the rank holding the stage runs it and sends the output on,
the rank holding the next stage receives it there. Each pair of ranks thus sends and receives
in the same order on both sides, and the first unfinished entry can always finish, so
blocking send/recv cannot deadlock (NCCL's in-order streams included); the FSDP collectives
inside a stage run at the same entry on all its data-parallel peers. Stages on one rank hand
over locally.
"""

import itertools
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallelisms.pipeline import PipelinePlan


def pipeline_forward(
    parts: list[nn.Module],
    plan: PipelinePlan,
    pp_group: dist.ProcessGroup,
    microbatches: list[Tensor],
    hidden_dim: int,
    dtype: torch.dtype,
    last_stage: Callable[[Tensor, Tensor], None],
) -> None:
    """Run the token ``microbatches`` through every stage; ``last_stage(hidden, tokens)`` is called
    on the rank holding the last stage, once per microbatch, in order.

    ``parts`` are this rank's stages (``plan.local_stages``); every rank passes the same
    microbatches. Hidden states travel between ranks as ``[*microbatch.shape, hidden_dim]`` in
    ``dtype``, the shape and dtype the receiver allocates. Call it under ``torch.no_grad()``.
    """
    owner = {stage: rank for rank in range(plan.pp_degree) for stage in plan.stages_of(rank)}
    here = dict(zip(plan.local_stages, parts))
    last = plan.num_stages - 1
    inputs: dict[tuple[int, int], Tensor] = {}  # (stage, microbatch) -> its input, received or from this rank
    entries = sorted(itertools.product(range(plan.num_stages), range(len(microbatches))), key=lambda e: (sum(e), e[0]))
    for stage, m in entries:
        tokens = microbatches[m]
        if stage in here:
            part = here[stage]
            hidden = part(tokens if stage == 0 else inputs.pop((stage, m)), **part.stage_kwargs(tokens))
            if stage == last:
                last_stage(hidden, tokens)
            elif stage + 1 in here:
                inputs[(stage + 1, m)] = hidden
            else:
                peer = dist.get_global_rank(pp_group, owner[stage + 1])
                dist.send(hidden.to(dtype).contiguous(), peer, group=pp_group)
        elif stage + 1 in here:
            received = torch.empty(*tokens.shape, hidden_dim, dtype=dtype, device=tokens.device)
            dist.recv(received, dist.get_global_rank(pp_group, owner[stage]), group=pp_group)
            inputs[(stage + 1, m)] = received
