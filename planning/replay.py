"""Replay a schedule's per-rank action lists with predicted stage times: makespan and bubble.

The action lists are torch's own (``schedule_ops``: ``get_schedule_ops``), so the order is the
one the schedule runs. Each rank runs its actions in order, each as soon as the rank is free and
its inputs exist: F(s, m) after F(s-1, m); the backward of (s, m) after that of (s+1, m)
and after F(s, m); a weight backward after its input backward. Sends and receives take no
time here.
"""

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
from torch.distributed.pipelining.schedules import _Action, _ComputationType

from config.errors import ConfigError
from parallelisms.pipeline import PIPELINE_SCHEDULES, PipelinePlan

_F, _B = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD
_I, _W = _ComputationType.BACKWARD_INPUT, _ComputationType.BACKWARD_WEIGHT


def schedule_ops(plan: PipelinePlan, schedule_name: str) -> list:
    """torch's per-rank action lists for the plan's schedule (those its visualizer draws)."""
    try:
        return get_schedule_ops(
            PIPELINE_SCHEDULES[schedule_name], plan.pp_degree, plan.n_microbatches, plan.num_stages // plan.pp_degree
        )
    except ValueError as err:  # e.g. Interleaved1F1B's microbatches-per-round rule
        raise ConfigError("parallelism.pipeline_parallel_microbatch_size", str(err)) from None


@dataclass(frozen=True)
class ScheduleTiming:
    makespan_ms: float  # first forward to last backward, every rank
    busy_ms: tuple[float, ...]  # computing, per rank

    @property
    def bubble(self) -> float:
        """The idle share of ranks x makespan."""
        return 1 - sum(self.busy_ms) / (len(self.busy_ms) * self.makespan_ms)


def simulate_schedule(
    ops: Sequence[Sequence[Optional[_Action]]], forward_ms: Sequence[float], backward_ms: Sequence[float]
) -> ScheduleTiming:
    """``ops[rank]``: that rank's actions; ``forward_ms[s]``, ``backward_ms[s]``: one microbatch
    through stage s. Zero-bubble schedules split a backward into input (I) and weight (W)
    actions; each takes half of the stage's backward time (the two are about equal: the
    input and the weight gradient GEMMs are the same size)."""
    duration = {_F: forward_ms, _B: backward_ms, _I: [b / 2 for b in backward_ms], _W: [b / 2 for b in backward_ms]}
    last = len(forward_ms) - 1
    queues = [_numbered(rank_ops) for rank_ops in ops]
    done: dict[tuple, float] = {}  # (kind, stage, microbatch) -> finish time
    free = [0.0] * len(ops)
    busy = [0.0] * len(ops)
    position = [0] * len(ops)
    while any(p < len(q) for p, q in zip(position, queues)):
        progressed = False
        for rank, queue in enumerate(queues):
            while position[rank] < len(queue):
                kind, stage, micro = queue[position[rank]]
                needs = _inputs(kind, stage, micro, last)
                if any(n not in done for n in needs):
                    break
                start = max([free[rank], *(done[n] for n in needs)])
                time = duration[kind][stage]
                done[(_B if kind == _I else kind, stage, micro)] = free[rank] = start + time
                busy[rank] += time
                position[rank] += 1
                progressed = True
        if not progressed:
            raise ValueError("the action lists deadlock: an action waits on one that never runs")
    return ScheduleTiming(max(free), tuple(busy))


def _numbered(rank_ops: Sequence[Optional[_Action]]) -> list[tuple]:
    """(kind, stage, microbatch) of each compute action. Each stage runs its microbatches in
    order, so the i-th forward (backward, ...) of a stage is microbatch i: torch's 1F1B table
    numbers the last rank's forwards from 1, which would leave it waiting forever."""
    seen: dict[tuple, int] = defaultdict(int)
    out = []
    for action in rank_ops:
        if action is None or action.computation_type not in (_F, _B, _I, _W):
            continue  # idle slots, gradient reductions
        key = (action.computation_type, action.stage_index)
        out.append((*key, seen[key]))
        seen[key] += 1
    return out


def _inputs(kind, stage: int, micro: int, last: int) -> list[tuple]:
    """The (kind, stage, microbatch) actions whose results this one reads; an input backward (I)
    counts as the stage's backward (B) for the stage before it."""
    if kind == _F:
        return [(_F, stage - 1, micro)] if stage > 0 else []
    if kind == _W:
        return [(_B, stage, micro)]
    return [(_F, stage, micro)] + ([(_B, stage + 1, micro)] if stage < last else [])
