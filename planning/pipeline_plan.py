"""One candidate pipeline plan: the stages, their layers and the microbatches, checked before anything is built.

``plan_pipeline`` takes a schedule, a stage count and a microbatch size (the recipe's, or a
candidate of the search in ``planning/schedule_search.py``, which turns the recipe's ``"auto"``
keys into them) and splits the layers: the recipe's explicit split, or the one that balances
the stages' predicted time (``planning/cost.py``, ``planning/split.py``) within the GPU's memory
(``planning/memory.py``). ``parallelisms/pipeline.py`` builds the stages and the schedule it names.
"""

from dataclasses import replace
from functools import lru_cache
from typing import Callable, Optional

from torch.distributed.pipelining.schedules import PipelineScheduleMulti, ScheduleGPipe

from config.errors import ConfigError
from config.job_config import Parallelism
from parallelisms.pipeline import PIPELINE_SCHEDULES, V_SHAPED, PipelinePlan
from planning.cost import StageCostInputs, stage_time
from planning.memory import StageFits
from planning.replay import StageDurations, schedule_ops, simulate_schedule
from planning.split import balanced_split

_KEY = "parallelism.pipeline_parallel_"


def stage_count(n_layers: int, p: Parallelism) -> int:
    """Stages of the split: from the split points or layers per stage when set, else degree x virtual stages."""
    if p.pipeline_parallel_stage_split_points:
        return len(p.pipeline_parallel_stage_split_points) + 1
    if p.pipeline_parallel_layers_per_stage:
        return n_layers // p.pipeline_parallel_layers_per_stage
    return p.pipeline_parallel_degree * p.pipeline_parallel_virtual_stages


def _layer_ranges(n_layers: int, p: Parallelism) -> list[tuple[int, int]]:
    if p.pipeline_parallel_stage_split_points:
        points = list(p.pipeline_parallel_stage_split_points)
        if points != sorted(set(points)) or points[0] <= 0 or points[-1] >= n_layers:
            raise ConfigError(
                _KEY + "stage_split_points",
                f"need strictly increasing layer indices in 1..{n_layers - 1}, got {points}",
            )
        bounds = [0, *points, n_layers]
    else:
        per = p.pipeline_parallel_layers_per_stage
        if per and n_layers % per:
            raise ConfigError(_KEY + "layers_per_stage", f"{per} does not divide the model's {n_layers} layers")
        n_stages = stage_count(n_layers, p)
        if n_stages > n_layers:
            raise ConfigError(
                _KEY + "virtual_stages",
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
    step_ms: Optional[Callable[[PipelinePlan], float]] = None,
) -> PipelinePlan:
    """Validate the split and microbatching of ``p``, whose schedule, virtual stages and microbatch
    size are set (not ``"auto"``), before anything is built: a one-line ConfigError naming the key.

    Without ``pipeline_parallel_stage_split_points`` or ``_layers_per_stage``, and given the
    stage costs (the embedding on the first stage, the head and loss on the last), the split
    whose slowest stage is fastest, among the splits ``fits`` accepts; without the costs, the
    even split. With several stages per rank the slowest stage and the slowest rank (its
    stages' sum) are not the same split: both are tried, and the one with the shorter
    ``step_ms`` is taken (the rank-balanced one on a tie); by default the replay of the
    schedule's action lists with the stages' compute alone.
    """
    name, mbs = p.pipeline_parallel_schedule, p.pipeline_parallel_microbatch_size
    if "auto" in (name, mbs, p.pipeline_parallel_virtual_stages):
        raise ValueError("plan_pipeline needs a schedule, virtual stages and microbatch size: resolve 'auto' first")
    pp = p.pipeline_parallel_degree
    ranges = _layer_ranges(n_layers, p)
    n_stages = len(ranges)
    schedule = PIPELINE_SCHEDULES[name]
    multi = issubclass(schedule, PipelineScheduleMulti)
    if n_stages % pp:
        raise ConfigError(_KEY + "degree", f"{n_stages} stages cannot be spread evenly over {pp} pipeline ranks")
    per_rank = n_stages // pp
    if not multi and per_rank != 1:
        raise ConfigError(
            _KEY + "schedule",
            f"{name} runs one stage per rank but the split gives {per_rank}; use Interleaved1F1B or 'auto', "
            "or one stage per rank",
        )
    if multi and per_rank < 2:
        raise ConfigError(
            _KEY + "virtual_stages",
            f"{name} needs at least 2 stages per rank, the split gives {per_rank}; set "
            "pipeline_parallel_virtual_stages = 2 or 'auto' (or split points / layers_per_stage giving "
            "2 x pipeline_parallel_degree stages)",
        )
    if name in V_SHAPED and per_rank != 2:
        raise ConfigError(_KEY + "virtual_stages", f"{name} needs exactly 2 stages per rank; set it to 2 or 'auto'")
    if local_batch_size % mbs:
        raise ConfigError(
            _KEY + "microbatch_size", f"{mbs} does not divide training.local_batch_size {local_batch_size}"
        )
    n_micro = local_batch_size // mbs
    if n_micro < pp and schedule is not ScheduleGPipe:
        raise ConfigError(
            _KEY + "microbatch_size",
            f"{name} needs at least {pp} microbatches (one per pipeline rank), "
            f"got local_batch_size {local_batch_size} / microbatch_size {mbs} = {n_micro}",
        )
    try:
        schedule_ops(name, pp, n_micro, per_rank)
    except ValueError as err:  # torch's own rules, e.g. DualPipeV's microbatches per stage
        raise ConfigError(_KEY + "microbatch_size", f"{name}: {err}") from None
    plan = PipelinePlan(tuple(ranges), pp, pp_rank, name, n_micro, mbs)
    explicit = p.pipeline_parallel_stage_split_points or p.pipeline_parallel_layers_per_stage
    if cost is None or explicit:
        return plan
    return _balanced(plan, n_layers, replace(cost, microbatch_size=mbs), fits, step_ms)


def _balanced(
    plan: PipelinePlan,
    n_layers: int,
    cost: StageCostInputs,
    fits: Optional[StageFits],
    step_ms: Optional[Callable[[PipelinePlan], float]],
) -> PipelinePlan:
    splits = balanced_splits(plan, n_layers, cost, fits)
    if len(splits) == 1:
        return splits[0]
    if step_ms is None:
        ops = schedule_ops(plan.schedule, plan.pp_degree, plan.n_microbatches, plan.num_stages // plan.pp_degree)
        last = plan.num_stages - 1

        def step_ms(split: PipelinePlan) -> float:
            times = [stage_time(cost, e - s, i == 0, i == last) for i, (s, e) in enumerate(split.layer_ranges)]
            durations = [StageDurations.halves(t.forward_ms, t.backward_ms) for t in times]
            return simulate_schedule(ops, durations).makespan_ms

    return min(splits, key=lambda split: round(step_ms(split), 6))  # to the ns: rounding noise is no reason to switch


def balanced_splits(
    plan: PipelinePlan, n_layers: int, cost: StageCostInputs, fits: Optional[StageFits]
) -> list[PipelinePlan]:
    """``plan`` with the split that balances its ranks' time and, when the stages of a rank may
    differ, the one that balances its stages' time (the first on a tie of the step they lead to)."""
    last = plan.num_stages - 1

    def split(groups: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
        # The best split that fits is the best split when that one fits: the constrained search
        # (every stage size's memory) only runs when it does not.
        best = _fastest_split(n_layers, groups, cost)
        if fits is None or all(fits(plan, s, k) for s, k in enumerate(best)):
            return best
        return balanced_split(
            n_layers, groups, lambda s, k: _stage_ms(cost, k, s == 0, s == last), lambda s, k: fits(plan, s, k)
        )

    by_rank = split(tuple(tuple(sorted(plan.stages_of(r))) for r in range(plan.pp_degree)))
    by_stage = split(tuple((s,) for s in range(plan.num_stages)))
    return [_with_split(plan, counts) for counts in ([by_rank] if by_stage == by_rank else [by_rank, by_stage])]


@lru_cache(maxsize=256)
def _fastest_split(n_layers: int, groups: tuple[tuple[int, ...], ...], cost: StageCostInputs) -> tuple[int, ...]:
    """``balanced_split`` without a memory bound; cached, as a schedule search asks for the same
    grouping under many schedules."""
    last = sum(map(len, groups)) - 1
    return balanced_split(n_layers, groups, lambda s, k: _stage_ms(cost, k, s == 0, s == last))


@lru_cache(maxsize=4096)
def _stage_ms(cost: StageCostInputs, layers: int, first: bool, last: bool) -> float:
    return stage_time(cost, layers, first, last).total_ms


def _with_split(plan: PipelinePlan, counts: tuple[int, ...]) -> PipelinePlan:
    bounds = [0]
    for k in counts:
        bounds.append(bounds[-1] + k)
    return replace(plan, layer_ranges=tuple(zip(bounds[:-1], bounds[1:])))
