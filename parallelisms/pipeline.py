"""Pipeline parallel: cut the model into the stages a plan names and build its schedule.

What the plan is (the schedule, which layers each stage holds, which stages each rank runs, the
microbatches) is decided before anything is built, in ``planning/pipeline_plan.py``; this
module applies it. The last stage ends at the final norm and returns hidden states; the
schedule's ``loss_fn`` is the recipe's loss, so logits never cross a stage boundary.
"""

import copy
from dataclasses import dataclass

import torch
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from models.transformer import Transformer

PIPELINE_SCHEDULES = {
    "GPipe": ScheduleGPipe,
    "1F1B": Schedule1F1B,
    "Interleaved1F1B": ScheduleInterleaved1F1B,
    "InterleavedZeroBubble": ScheduleInterleavedZeroBubble,
    "ZBVZeroBubble": ScheduleZBVZeroBubble,
    "DualPipeV": ScheduleDualPipeV,
}
# Two stages per rank in a V: rank r holds stages r and 2*pp-1-r, so the last stage sits on rank 0.
V_SHAPED = ("ZBVZeroBubble", "DualPipeV")
# Split each backward into an input-gradient and a weight-gradient action (I and W).
ZERO_BUBBLE = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")


@dataclass(frozen=True)
class PipelinePlan:
    """The schedule, which layers each stage holds and which stages this rank runs."""

    layer_ranges: tuple[tuple[int, int], ...]  # [start, end) per stage
    pp_degree: int
    pp_rank: int
    schedule: str  # a key of PIPELINE_SCHEDULES
    n_microbatches: int
    microbatch_size: int  # sequences per microbatch

    @property
    def num_stages(self) -> int:
        return len(self.layer_ranges)

    @property
    def v_shape(self) -> bool:
        return self.schedule in V_SHAPED

    def stages_of(self, pp_rank: int) -> tuple[int, ...]:
        if self.v_shape:
            return (pp_rank, self.num_stages - 1 - pp_rank)
        return tuple(range(pp_rank, self.num_stages, self.pp_degree))

    @property
    def local_stages(self) -> tuple[int, ...]:
        return self.stages_of(self.pp_rank)


def build_stage_module(model: Transformer, plan: PipelinePlan, stage: int) -> Transformer:
    """A copy of the (meta) model keeping only this stage's modules and their names."""
    part = copy.deepcopy(model)
    start, end = plan.layer_ranges[stage]
    for name in list(part.layers.keys()):
        if not start <= int(name) < end:
            del part.layers[name]
    if stage != 0:
        part.tok_embeddings = None
    if stage != plan.num_stages - 1:
        part.norm = None
        part.output = None
    return part


def build_schedule(modules: list[torch.nn.Module], plan: PipelinePlan, pp_group, device: torch.device, loss_fn):
    """The plan's schedule over this rank's stage ``modules``. ``loss_fn(hidden, labels)`` already
    carries the global normalization, so grads are not rescaled."""
    stages = [PipelineStage(m, s, plan.num_stages, device, group=pp_group) for m, s in zip(modules, plan.local_stages)]
    schedule = PIPELINE_SCHEDULES[plan.schedule]
    if issubclass(schedule, PipelineScheduleMulti):
        return schedule(stages, n_microbatches=plan.n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return schedule(stages[0], n_microbatches=plan.n_microbatches, loss_fn=loss_fn, scale_grads=False)
