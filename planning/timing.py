"""Predicted compute time of a recipe's pipeline: per stage, per rank, and the schedule's bubble.

Stage times come from planning/cost.py, the bubble from replaying torch's own action lists
with them (planning/replay.py). Predictions of compute only:
sends and receives, FSDP's collectives, the optimizer and host overhead are not in them.
``--dry_run`` prints them (planning/dry_run.py); ``split_summary`` is the run log's line.
"""

from dataclasses import dataclass

from config.job_config import JobConfig
from parallelisms.parallel_dims import ParallelDims
from parallelisms.pipeline import PipelinePlan
from planning.cost import StageCostInputs, StageTime, head_in_layers, stage_cost_inputs, stage_time
from planning.replay import ScheduleTiming, schedule_ops, simulate_schedule


@dataclass(frozen=True)
class PipelineTiming:
    plan: PipelinePlan
    cost: StageCostInputs
    stages: tuple[StageTime, ...]  # one microbatch through each stage
    schedule: ScheduleTiming  # one micro-step: every microbatch through every stage

    def rank(self, pp_rank: int) -> StageTime:
        """One microbatch through every stage of ``pp_rank``."""
        times = [self.stages[s] for s in self.plan.stages_of(pp_rank)]
        return sum(times[1:], times[0])

    @property
    def slowest_over_fastest(self) -> float:
        """Over the pipeline ranks, per microbatch."""
        ranks = [self.rank(r).total_ms for r in range(self.plan.pp_degree)]
        return max(ranks) / min(ranks)


def predict_timing(cfg: JobConfig, dims: ParallelDims, plan: PipelinePlan) -> PipelineTiming:
    cost = stage_cost_inputs(cfg, dims)
    last = plan.num_stages - 1
    stages = tuple(stage_time(cost, end - start, s == 0, s == last) for s, (start, end) in enumerate(plan.layer_ranges))
    ops = schedule_ops(plan, cfg.parallelism.pipeline_parallel_schedule)
    schedule = simulate_schedule(ops, [t.forward_ms for t in stages], [t.backward_ms for t in stages])
    return PipelineTiming(plan, cost, stages, schedule)


def why_this_split(cfg: JobConfig, timing: PipelineTiming) -> str:
    p, last = cfg.parallelism, timing.plan.num_stages - 1
    for key in ("pipeline_parallel_stage_split_points", "pipeline_parallel_layers_per_stage"):
        if getattr(p, key):
            return f"set by parallelism.{key}"
    on = f"stage {last}" + (" (pp rank 0)" if timing.plan.v_shape else "")
    return (
        f"chosen to balance the head ({timing.cost.loss}, {head_in_layers(timing.cost):.1f} decoder layers of "
        f"fw + bw work) on {on}"
    )


def split_summary(cfg: JobConfig, dims: ParallelDims, plan: PipelinePlan) -> str:
    """One line for the run log, e.g. "pipeline split 8/8/8/4 layers (stages 0-3), predicted fw + bw ms
    per microbatch 24/24/24/25, slowest/fastest 1.04, 1F1B bubble 28 %; chosen to balance the head ..."."""
    t = predict_timing(cfg, dims, plan)
    layers = "/".join(str(end - start) for start, end in plan.layer_ranges)
    per_stage = [s.total_ms for s in t.stages]
    return (
        f"pipeline split {layers} layers (stages 0-{plan.num_stages - 1}), predicted fw + bw ms per microbatch "
        f"{'/'.join(f'{ms:.0f}' for ms in per_stage)}, slowest/fastest {max(per_stage) / min(per_stage):.2f}, "
        f"{cfg.parallelism.pipeline_parallel_schedule} bubble {100 * t.schedule.bubble:.0f} %; "
        f"{why_this_split(cfg, t)}"
    )
