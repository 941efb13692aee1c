"""Predicted time of a pipeline plan's step: per stage, per rank, and the schedule's bubble.

Stage compute comes from planning/cost.py, sends and FSDP's collectives from planning/comm.py,
and the step from replaying torch's own action lists with them (planning/replay.py). Not in
it: the tied-embedding sync, the optimizer and host overhead. ``--dry_run`` prints it
(planning/dry_run.py); the schedule search (planning/schedule_search.py) ranks candidates by it.
"""

from dataclasses import dataclass

from config.job_config import JobConfig
from parallelisms.parallel_dims import ParallelDims
from parallelisms.pipeline import ZERO_BUBBLE, PipelinePlan
from planning.comm import fsdp_ms, transfer_ms
from planning.cost import (
    AchievedRates,
    StageCostInputs,
    StageTime,
    head_in_layers,
    head_time,
    stage_cost_inputs,
    stage_time,
)
from planning.memory import stage_parameters
from planning.replay import Communication, ScheduleTiming, StageDurations, schedule_ops, simulate_schedule

_BYTES = {"bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class BackwardSplit:
    """How a zero-bubble schedule's input (I) and weight (W) backward actions divide a stage's backward.

    torch splits it through autograd: I asks for the input gradients, W for the weight gradients
    from the nodes where the two paths meet. An eager block's nodes are single ops, each running
    only the half asked for. A compiled block is one autograd node (AOTAutograd's compiled
    backward), and so is every loss entry but ``cross_entropy`` (a custom autograd.Function that
    takes the classifier and the hidden states): such a node runs its whole backward in I and
    again in W."""

    blocks_whole: bool  # compiled blocks
    head_whole: bool  # the loss is one custom autograd.Function

    @classmethod
    def of(cls, cfg: JobConfig, cost: StageCostInputs) -> "BackwardSplit":
        compiled = cfg.compile.enable and "model" in cfg.compile.components
        return cls(compiled, cost.loss != "cross_entropy" or cost.vocab_parallel_degree > 1)

    def durations(self, cost: StageCostInputs, layers: int, first: bool, last: bool) -> StageDurations:
        whole = stage_time(cost, layers, first, last)
        blocks = stage_time(cost, layers, False, False).backward_ms
        head = head_time(cost).backward_ms if last else 0.0
        rest = whole.backward_ms - blocks - head  # embedding and norm: weight-only and one small op
        each = (blocks if self.blocks_whole else blocks / 2) + (head if self.head_whole else head / 2) + rest / 2
        return StageDurations(whole.forward_ms, whole.backward_ms, each, each)  # I and W alike


@dataclass(frozen=True)
class PipelineTiming:
    plan: PipelinePlan
    cost: StageCostInputs  # at the plan's microbatch size
    stages: tuple[StageTime, ...]  # one microbatch through each stage, compute
    comm: Communication  # what the step moves between GPUs
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


def communication(cfg: JobConfig, dims: ParallelDims, plan: PipelinePlan, cost: StageCostInputs) -> Communication:
    """The plan's sends (hidden states in the parameter dtype) and each stage's FSDP collectives."""
    t = cfg.training
    param_b, reduce_b = _BYTES[t.mixed_precision_param], _BYTES[t.mixed_precision_reduce]
    gather, reduce = zip(
        *(fsdp_ms(n, dims.dp_shard, dims.dp_replicate, param_b, reduce_b) for n in stage_parameters(cfg, dims, plan))
    )
    return Communication(transfer_ms(cost.model, cost.tokens, param_b), tuple(gather), tuple(reduce))


def predict_timing(cfg: JobConfig, dims: ParallelDims, plan: PipelinePlan, rates: AchievedRates) -> PipelineTiming:
    cost = stage_cost_inputs(cfg, dims, plan.microbatch_size, rates)
    last = plan.num_stages - 1
    ranges = plan.layer_ranges
    stages = tuple(stage_time(cost, end - start, s == 0, s == last) for s, (start, end) in enumerate(ranges))
    split = BackwardSplit.of(cfg, cost)
    durations = [split.durations(cost, end - start, s == 0, s == last) for s, (start, end) in enumerate(ranges)]
    ops = schedule_ops(plan.schedule, plan.pp_degree, plan.n_microbatches, plan.num_stages // plan.pp_degree)
    comm = communication(cfg, dims, plan, cost)
    return PipelineTiming(plan, cost, stages, comm, simulate_schedule(ops, durations, comm))


def step_lower_bound(cfg: JobConfig, dims: ParallelDims, plan: PipelinePlan, rates: AchievedRates) -> float:
    """A bound below ``plan``'s replayed micro-step, from its split alone: each rank starts no earlier
    than the first microbatch's forward through the stages before its first, computes for all its
    microbatches and, unless the schedule ends on weight actions (zero-bubble), is followed by the
    last microbatch's backward through those stages. The schedule search replays only the
    candidates whose bound is below the steps they would have to beat."""
    cost = stage_cost_inputs(cfg, dims, plan.microbatch_size, rates)
    split, last = BackwardSplit.of(cfg, cost), plan.num_stages - 1
    d = [split.durations(cost, end - start, s == 0, s == last) for s, (start, end) in enumerate(plan.layer_ranges)]
    zero_bubble = plan.schedule in ZERO_BUBBLE
    bound = 0.0
    for r in range(plan.pp_degree):
        stages, first = plan.stages_of(r), min(plan.stages_of(r))
        backward = [min(t.backward, t.backward_input + t.backward_weight) if zero_bubble else t.backward for t in d]
        busy = plan.n_microbatches * sum(d[s].forward + backward[s] for s in stages)
        fill = sum(d[s].forward for s in range(first))
        drain = 0.0 if zero_bubble else sum(d[s].backward for s in range(first))
        bound = max(bound, fill + busy + drain)
    return bound


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


def split_summary(cfg: JobConfig, dims: ParallelDims, plan: PipelinePlan, rates: AchievedRates) -> str:
    """One line for the run log, e.g. "pipeline split 8/8/8/4 layers (stages 0-3), predicted fw + bw ms
    per microbatch 24/24/24/25, slowest/fastest 1.04, 1F1B bubble 28 %; chosen to balance the head ..."."""
    t = predict_timing(cfg, dims, plan, rates)
    layers = "/".join(str(end - start) for start, end in plan.layer_ranges)
    per_stage = [s.total_ms for s in t.stages]
    return (
        f"pipeline split {layers} layers (stages 0-{plan.num_stages - 1}), predicted fw + bw ms per microbatch "
        f"{'/'.join(f'{ms:.0f}' for ms in per_stage)}, slowest/fastest {max(per_stage) / min(per_stage):.2f}, "
        f"{plan.schedule} bubble {100 * t.schedule.bubble:.0f} %; {why_this_split(cfg, t)}"
    )
