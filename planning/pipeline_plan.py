"""The recipe's pipeline plan: the stages, their layers and the microbatches, decided before anything is built.

``recipe_plan`` is what the run (train.py) and its prediction (``--dry_run``) both ask, so they
split the layers alike: the recipe's explicit split, or the one that balances the stages'
predicted time (``planning/cost.py``, ``planning/split.py``) within the GPU's memory
(``planning/memory.py``). ``parallelisms/pipeline.py`` builds the stages and the schedule it names.
"""

from dataclasses import replace
from typing import Optional

from torch.distributed.pipelining.schedules import PipelineScheduleMulti, ScheduleGPipe, ScheduleZBVZeroBubble

from config.errors import ConfigError
from config.job_config import JobConfig, Parallelism
from parallelisms.parallel_dims import ParallelDims
from parallelisms.pipeline import PIPELINE_SCHEDULES, PipelinePlan
from planning.cost import StageCostInputs, StageTime, stage_cost_inputs, stage_time
from planning.memory import StageFits, stage_fits
from planning.replay import schedule_ops, simulate_schedule
from planning.split import balanced_split


def recipe_plan(
    cfg: JobConfig, dims: ParallelDims, pp_rank: int, gpu_memory_gib: Optional[float] = None
) -> PipelinePlan:
    """The plan of pipeline rank ``pp_rank``; the default split fits ``gpu_memory_gib`` when it is known."""
    cost = stage_cost_inputs(cfg, dims)
    fits = stage_fits(cfg, dims, gpu_memory_gib)
    return plan_pipeline(cost.model.n_layers, cfg.parallelism, pp_rank, cfg.training.local_batch_size, cost, fits)


def _layer_ranges(n_layers: int, p: Parallelism) -> list[tuple[int, int]]:
    if p.pipeline_parallel_stage_split_points:
        points = list(p.pipeline_parallel_stage_split_points)
        if points != sorted(set(points)) or points[0] <= 0 or points[-1] >= n_layers:
            raise ConfigError(
                "parallelism.pipeline_parallel_stage_split_points",
                f"need strictly increasing layer indices in 1..{n_layers - 1}, got {points}",
            )
        bounds = [0, *points, n_layers]
    else:
        if p.pipeline_parallel_layers_per_stage:
            per = p.pipeline_parallel_layers_per_stage
            if n_layers % per:
                raise ConfigError(
                    "parallelism.pipeline_parallel_layers_per_stage",
                    f"{per} does not divide the model's {n_layers} layers",
                )
            n_stages = n_layers // per
        else:
            n_stages = p.pipeline_parallel_degree * p.pipeline_parallel_virtual_stages
        if n_stages > n_layers:
            raise ConfigError(
                "parallelism.pipeline_parallel_virtual_stages",
                f"{n_stages} stages for {n_layers} layers leaves a stage empty; use fewer stages",
            )
        # Even split; the first stages take one extra layer when it does not divide. plan_pipeline
        # replaces it with the balanced split when it is given the stage costs.
        base, extra = divmod(n_layers, n_stages)
        bounds = [0]
        for s in range(n_stages):
            bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def plan_pipeline(
    n_layers: int,
    p: Parallelism,
    pp_rank: int,
    local_batch_size: int,
    cost: Optional[StageCostInputs] = None,
    fits: Optional[StageFits] = None,
) -> PipelinePlan:
    """Validate the split and microbatching (a one-line ConfigError) before anything is built.

    Without ``pipeline_parallel_stage_split_points`` or ``_layers_per_stage``, and given the
    stage costs (the embedding on the first stage, the head and loss on the last), the split
    whose slowest stage is fastest, among the splits ``fits`` accepts; without the costs, the
    even split. With several stages per rank the slowest stage and the slowest rank (its
    stages' sum) are not the same split: both are tried, and the one whose replay of the
    schedule's action lists ends first is taken (the rank-balanced one on a tie).
    """
    pp = p.pipeline_parallel_degree
    ranges = _layer_ranges(n_layers, p)
    n_stages = len(ranges)
    schedule = PIPELINE_SCHEDULES[p.pipeline_parallel_schedule]
    multi = issubclass(schedule, PipelineScheduleMulti)
    if n_stages % pp:
        raise ConfigError(
            "parallelism.pipeline_parallel_degree",
            f"{n_stages} stages cannot be spread evenly over {pp} pipeline ranks",
        )
    per_rank = n_stages // pp
    if not multi and per_rank != 1:
        raise ConfigError(
            "parallelism.pipeline_parallel_schedule",
            f"{p.pipeline_parallel_schedule} runs one stage per rank but the split gives {per_rank}; "
            "use Interleaved1F1B, or one stage per rank",
        )
    if multi and per_rank < 2:
        raise ConfigError(
            "parallelism.pipeline_parallel_virtual_stages",
            f"{p.pipeline_parallel_schedule} needs at least 2 stages per rank, the split gives "
            f"{per_rank}; set pipeline_parallel_virtual_stages = 2 (or split points / "
            "layers_per_stage giving 2 x pipeline_parallel_degree stages)",
        )
    if schedule is ScheduleZBVZeroBubble and per_rank != 2:
        raise ConfigError(
            "parallelism.pipeline_parallel_virtual_stages", "ZBVZeroBubble needs exactly 2 stages per rank"
        )
    mbs = p.pipeline_parallel_microbatch_size
    if local_batch_size % mbs:
        raise ConfigError(
            "parallelism.pipeline_parallel_microbatch_size",
            f"{mbs} does not divide training.local_batch_size {local_batch_size}",
        )
    n_micro = local_batch_size // mbs
    if n_micro < pp and schedule is not ScheduleGPipe:
        raise ConfigError(
            "parallelism.pipeline_parallel_microbatch_size",
            f"{p.pipeline_parallel_schedule} needs at least {pp} microbatches (one per pipeline rank), "
            f"got local_batch_size {local_batch_size} / microbatch_size {mbs} = {n_micro}",
        )
    plan = PipelinePlan(tuple(ranges), pp, pp_rank, schedule is ScheduleZBVZeroBubble, n_micro)
    explicit = p.pipeline_parallel_stage_split_points or p.pipeline_parallel_layers_per_stage
    if cost is None or explicit:
        return plan
    return _balanced(plan, n_layers, cost, fits, p.pipeline_parallel_schedule)


def _balanced(
    plan: PipelinePlan, n_layers: int, cost: StageCostInputs, fits: Optional[StageFits], schedule_name: str
) -> PipelinePlan:
    last = plan.num_stages - 1

    def time(stage: int, layers: int) -> StageTime:
        return stage_time(cost, layers, stage == 0, stage == last)

    stage_fits = None if fits is None else lambda s, k: fits(plan, s, k)
    by_rank = [sorted(plan.stages_of(r)) for r in range(plan.pp_degree)]
    by_stage = [[s] for s in range(plan.num_stages)]
    candidates = [
        balanced_split(n_layers, groups, lambda s, k: time(s, k).total_ms, stage_fits) for groups in (by_rank, by_stage)
    ]
    counts = candidates[0]
    if candidates[1] != counts:
        ops = schedule_ops(plan, schedule_name)

        def makespan(split: tuple[int, ...]) -> float:  # to the ns: rounding noise is no reason to switch
            times = [time(s, k) for s, k in enumerate(split)]
            return round(
                simulate_schedule(ops, [t.forward_ms for t in times], [t.backward_ms for t in times]).makespan_ms, 6
            )

        counts = min(candidates, key=makespan)
    bounds = [0]
    for k in counts:
        bounds.append(bounds[-1] + k)
    return replace(plan, layer_ranges=tuple(zip(bounds[:-1], bounds[1:])))
