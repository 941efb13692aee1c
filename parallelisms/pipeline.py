"""Pipeline parallel: split the model into stages and build the schedule.

The last stage ends at the final norm and returns hidden states; the schedule's
``loss_fn`` is the recipe's loss, so logits never cross a stage boundary.
"""

import copy
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from models.transformer import Transformer
from parallelisms.pipeline_cost import StageCostInputs, stage_time
from parallelisms.pipeline_split import balanced_split
from training.config import Parallelism
from training.errors import ConfigError

PIPELINE_SCHEDULES = {
    "GPipe": ScheduleGPipe,
    "1F1B": Schedule1F1B,
    "Interleaved1F1B": ScheduleInterleaved1F1B,
    "InterleavedZeroBubble": ScheduleInterleavedZeroBubble,
    "ZBVZeroBubble": ScheduleZBVZeroBubble,
}


@dataclass(frozen=True)
class PipelinePlan:
    """Which layers each stage holds and which stages this rank runs."""

    layer_ranges: tuple[tuple[int, int], ...]  # [start, end) per stage
    pp_degree: int
    pp_rank: int
    v_shape: bool  # ZBV: rank r holds stages r and 2*pp-1-r; otherwise r, r+pp, r+2*pp, ...
    n_microbatches: int

    @property
    def num_stages(self) -> int:
        return len(self.layer_ranges)

    def stages_of(self, pp_rank: int) -> tuple[int, ...]:
        if self.v_shape:
            return (pp_rank, self.num_stages - 1 - pp_rank)
        return tuple(range(pp_rank, self.num_stages, self.pp_degree))

    @property
    def local_stages(self) -> tuple[int, ...]:
        return self.stages_of(self.pp_rank)


def _layer_ranges(n_layers: int, p: Parallelism) -> list[tuple[int, int]]:
    if p.pipeline_parallel_stage_split_points:
        points = list(p.pipeline_parallel_stage_split_points)
        if points != sorted(set(points)) or points[0] <= 0 or points[-1] >= n_layers:
            raise ConfigError("parallelism.pipeline_parallel_stage_split_points",
                              f"need strictly increasing layer indices in 1..{n_layers - 1}, got {points}")
        bounds = [0, *points, n_layers]
    else:
        if p.pipeline_parallel_layers_per_stage:
            per = p.pipeline_parallel_layers_per_stage
            if n_layers % per:
                raise ConfigError("parallelism.pipeline_parallel_layers_per_stage",
                                  f"{per} does not divide the model's {n_layers} layers")
            n_stages = n_layers // per
        else:
            n_stages = p.pipeline_parallel_degree * p.pipeline_parallel_virtual_stages
        if n_stages > n_layers:
            raise ConfigError("parallelism.pipeline_parallel_virtual_stages",
                              f"{n_stages} stages for {n_layers} layers leaves a stage empty; use fewer stages")
        # Even split; the first stages take one extra layer when it does not divide. plan_pipeline
        # replaces it with the balanced split when it is given the stage costs.
        base, extra = divmod(n_layers, n_stages)
        bounds = [0]
        for s in range(n_stages):
            bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


# fits(plan, stage, layers): whether the rank holding ``stage`` fits its GPU with ``layers`` layers there.
StageFits = Callable[[PipelinePlan, int, int], bool]


def plan_pipeline(n_layers: int, p: Parallelism, pp_rank: int, local_batch_size: int,
                  cost: Optional[StageCostInputs] = None, fits: Optional[StageFits] = None) -> PipelinePlan:
    """Validate the split and microbatching (a one-line ConfigError) before anything is built.

    Without ``pipeline_parallel_stage_split_points`` or ``_layers_per_stage``, and given the
    stage costs, the layers go where the slowest stage's predicted time is smallest (the
    embedding on the first stage, the head and loss on the last), among the splits ``fits``
    accepts; without the costs, the even split.
    """
    pp = p.pipeline_parallel_degree
    ranges = _layer_ranges(n_layers, p)
    n_stages = len(ranges)
    schedule = PIPELINE_SCHEDULES[p.pipeline_parallel_schedule]
    multi = issubclass(schedule, PipelineScheduleMulti)
    if n_stages % pp:
        raise ConfigError("parallelism.pipeline_parallel_degree",
                          f"{n_stages} stages cannot be spread evenly over {pp} pipeline ranks")
    per_rank = n_stages // pp
    if not multi and per_rank != 1:
        raise ConfigError("parallelism.pipeline_parallel_schedule",
                          f"{p.pipeline_parallel_schedule} runs one stage per rank but the split gives {per_rank}; "
                          "use Interleaved1F1B, or one stage per rank")
    if multi and per_rank < 2:
        raise ConfigError("parallelism.pipeline_parallel_virtual_stages",
                          f"{p.pipeline_parallel_schedule} needs at least 2 stages per rank, the split gives "
                          f"{per_rank}; set pipeline_parallel_virtual_stages = 2 (or split points / "
                          "layers_per_stage giving 2 x pipeline_parallel_degree stages)")
    if schedule is ScheduleZBVZeroBubble and per_rank != 2:
        raise ConfigError("parallelism.pipeline_parallel_virtual_stages", "ZBVZeroBubble needs exactly 2 stages per rank")
    mbs = p.pipeline_parallel_microbatch_size
    if local_batch_size % mbs:
        raise ConfigError("parallelism.pipeline_parallel_microbatch_size",
                          f"{mbs} does not divide training.local_batch_size {local_batch_size}")
    n_micro = local_batch_size // mbs
    if n_micro < pp and schedule is not ScheduleGPipe:
        raise ConfigError("parallelism.pipeline_parallel_microbatch_size",
                          f"{p.pipeline_parallel_schedule} needs at least {pp} microbatches (one per pipeline rank), "
                          f"got local_batch_size {local_batch_size} / microbatch_size {mbs} = {n_micro}")
    plan = PipelinePlan(tuple(ranges), pp, pp_rank, schedule is ScheduleZBVZeroBubble, n_micro)
    explicit = p.pipeline_parallel_stage_split_points or p.pipeline_parallel_layers_per_stage
    return plan if cost is None or explicit else _balanced(plan, n_layers, cost, fits)


def _balanced(plan: PipelinePlan, n_layers: int, cost: StageCostInputs, fits: Optional[StageFits]) -> PipelinePlan:
    if cost.model.n_layers != n_layers:
        raise ValueError(f"the stage costs are for {cost.model.n_layers} layers, the model has {n_layers}")
    last = plan.num_stages - 1
    counts = balanced_split(n_layers, plan.num_stages,
                            lambda s, k: stage_time(cost, k, s == 0, s == last).total_ms,
                            None if fits is None else lambda s, k: fits(plan, s, k))
    bounds = [0]
    for k in counts:
        bounds.append(bounds[-1] + k)
    return replace(plan, layer_ranges=tuple(zip(bounds[:-1], bounds[1:])))


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


def build_schedule(modules: list[torch.nn.Module], plan: PipelinePlan, schedule_name: str, pp_group,
                   device: torch.device, loss_fn):
    """``loss_fn(hidden, labels)`` already carries the global normalization, so grads are not rescaled."""
    stages = [PipelineStage(m, s, plan.num_stages, device, group=pp_group)
              for m, s in zip(modules, plan.local_stages)]
    schedule = PIPELINE_SCHEDULES[schedule_name]
    if issubclass(schedule, PipelineScheduleMulti):
        return schedule(stages, n_microbatches=plan.n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return schedule(stages[0], n_microbatches=plan.n_microbatches, loss_fn=loss_fn, scale_grads=False)
