"""Replay a schedule's per-rank action lists with predicted times: the step's makespan and bubble.

The action lists are torch's own (each schedule class's ``pipeline_order``), so the order is the
one the schedule runs. Each rank runs its compute actions in order, each as soon as the rank is
free and its inputs exist: F(s, m) after F(s-1, m); the backward of (s, m) after that of
(s+1, m) and after F(s, m); a weight backward (W) after its input backward (I). An input that
comes from another rank arrives ``transfer_ms`` after it was computed (the send is asynchronous:
it holds up the receiver, not the sender). FSDP gathers a stage's parameters before its first
forward and reduce-scatters its gradients after its last backward (once per step under PP), on
a stream of their own: the gathers of a rank's stages run one after another from the step's
start, the reductions in the order the stages finish, and the step ends when the last is done.
"""

from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    _Action,
    _ComputationType,
    _PipelineScheduleRuntime,
)

from parallelisms.pipeline import PIPELINE_SCHEDULES

_F, _B = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD
_I, _W = _ComputationType.BACKWARD_INPUT, _ComputationType.BACKWARD_WEIGHT
_OVERLAP = _ComputationType.OVERLAP_F_B
_COMPUTE = (_F, _B, _I, _W)


@dataclass
class _StandInStage:
    """What a schedule's constructor reads of its stages to lay out every rank's actions; the
    visualizer's ``get_schedule_ops`` mocks the whole PipelineStage for this, at 20x the cost."""

    group_size: int
    num_stages: int
    group_rank: int = 0
    submod: None = None


@lru_cache(maxsize=None)
def schedule_ops(schedule_name: str, pp_degree: int, n_microbatches: int, stages_per_rank: int) -> tuple:
    """torch's compute actions of every rank, in order: ``ops[rank]`` is a tuple of ``_Action``
    (F, B, I or W; DualPipeV's overlapped F + B pairs run one after the other, as torch runs
    them without a custom overlap function). Raises ValueError (torch's message) for a
    combination the schedule refuses. Cached: the plan, the search and the memory estimate ask
    the same lists again and again."""
    cls = PIPELINE_SCHEDULES[schedule_name]
    single = issubclass(cls, PipelineScheduleSingle)
    if single and stages_per_rank != 1:
        raise ValueError(f"{schedule_name} runs one stage per rank, not {stages_per_rank}")
    if not single and stages_per_rank < 2:
        raise ValueError(f"{schedule_name} runs 2 or more stages per rank, not {stages_per_rank}")
    if issubclass(cls, _PipelineScheduleRuntime):
        # Its constructor also lays out the sends, receives, gathers and reductions of every rank,
        # which the replay does not read: 85 % of the time (the compute actions come first).
        cls = type(cls.__name__, (cls,), {"_prepare_schedule_with_comms": lambda self, *args, **kwargs: None})
    stages = [_StandInStage(pp_degree, pp_degree * stages_per_rank) for _ in range(stages_per_rank)]
    try:
        schedule = cls(stages[0] if single else stages, n_microbatches)
    except (ValueError, AssertionError, RuntimeError) as err:  # torch's checks of the microbatch count
        raise ValueError(str(err)) from None
    return tuple(tuple(_compute_actions(schedule.pipeline_order[rank])) for rank in range(pp_degree))


def _compute_actions(rank_ops: Sequence[Optional[_Action]]):
    for action in rank_ops:
        if action is None:
            continue  # idle slots
        if action.computation_type == _OVERLAP:
            yield from action.sub_actions
        elif action.computation_type in _COMPUTE:
            yield action  # not the sends, receives, gathers and reductions torch adds


@dataclass(frozen=True)
class StageDurations:
    """One microbatch through one stage, ms: the forward, the whole backward (B) and, for the
    zero-bubble schedules, its input (I) and weight (W) halves."""

    forward: float
    backward: float
    backward_input: float
    backward_weight: float

    @classmethod
    def halves(cls, forward: float, backward: float) -> "StageDurations":
        """I and W each half of B: the input and the weight gradient GEMMs are the same size."""
        return cls(forward, backward, backward / 2, backward / 2)


@dataclass(frozen=True)
class Communication:
    """What moves between GPUs, ms (planning/comm.py predicts it)."""

    transfer_ms: float = 0.0  # one microbatch's activations, or their gradient, between pipeline ranks
    gather_ms: tuple[float, ...] = ()  # per stage: FSDP's all-gather of its parameters (empty: none)
    reduce_ms: tuple[float, ...] = ()  # per stage: FSDP's reduce-scatter of its gradients (empty: none)


@dataclass(frozen=True)
class ScheduleTiming:
    makespan_ms: float  # from the step's start until every rank's last computation and reduction is done
    busy_ms: tuple[float, ...]  # computing, per rank

    @property
    def bubble(self) -> float:
        """The share of ranks x makespan not spent computing: waiting for other stages, for
        transfers and for the collectives that compute does not hide."""
        return 1 - sum(self.busy_ms) / (len(self.busy_ms) * self.makespan_ms)


def simulate_schedule(
    ops: Sequence[Sequence[_Action]], stages: Sequence[StageDurations], comm: Communication = Communication()
) -> ScheduleTiming:
    """``ops[rank]``: that rank's compute actions (``schedule_ops``); ``stages[s]``: one microbatch
    through stage s."""
    duration = (  # by action code
        [s.forward for s in stages],
        [s.backward for s in stages],
        [s.backward_input for s in stages],
        [s.backward_weight for s in stages],
    )
    queues = _dependencies(tuple(map(tuple, ops)), len(stages))
    gathered = _gathers_done(queues, comm.gather_ms)
    remaining = defaultdict(int)  # stage -> its backward and weight actions not yet run
    for queue in queues:
        for code, stage, *_ in queue:
            remaining[stage] += code != _FORWARD
    transfer = comm.transfer_ms
    done: dict[int, float] = {}  # an action's key -> its finish time
    free = [0.0] * len(ops)
    busy = [0.0] * len(ops)
    reduced = [0.0] * len(ops)  # when each rank's reduction stream is free
    position = [0] * len(ops)
    while any(p < len(q) for p, q in zip(position, queues)):
        progressed = False
        for rank, queue in enumerate(queues):
            while position[rank] < len(queue):
                code, stage, first_forward, key, needs = queue[position[rank]]
                start = free[rank]
                for need, elsewhere in needs:
                    if need not in done:
                        break
                    start = max(start, done[need] + (transfer if elsewhere else 0.0))
                else:
                    if first_forward:
                        start = max(start, gathered.get(stage, 0.0))
                    time = duration[code][stage]
                    done[key] = free[rank] = start + time
                    busy[rank] += time
                    position[rank] += 1
                    progressed = True
                    if code != _FORWARD:
                        remaining[stage] -= 1
                        if comm.reduce_ms and remaining[stage] == 0:
                            reduced[rank] = max(reduced[rank], free[rank]) + comm.reduce_ms[stage]
                    continue
                break
        if not progressed:
            raise ValueError("the action lists deadlock: an action waits on one that never runs")
    return ScheduleTiming(max(max(free), max(reduced)), tuple(busy))


# Action codes: torch's computation types are str Enums, whose hashing and comparing cost Python calls.
_FORWARD, _BACKWARD, _INPUT, _WEIGHT = range(4)
_CODE = {_F: _FORWARD, _B: _BACKWARD, _I: _INPUT, _W: _WEIGHT}


@lru_cache(maxsize=256)
def _dependencies(ops: tuple, n_stages: int) -> list[list[tuple]]:
    """Per rank, each action as (code, stage, first forward of its stage, key, what it waits for:
    (key, on another rank) pairs). Keys number (code, stage, microbatch), an input backward
    counting as the stage's backward: F(s, m) waits for F(s-1, m); a backward (or input
    backward) of (s, m) for F(s, m) and the backward of (s+1, m); a weight backward for the
    input backward of (s, m). Cached: a search replays the same lists with many times."""
    numbered = [_numbered(rank_ops) for rank_ops in ops]
    rank_of = {stage: rank for rank, queue in enumerate(numbered) for _, stage, _ in queue}
    last = n_stages - 1

    def key(code: int, stage: int, micro: int) -> int:
        return ((min(code, _BACKWARD) if code != _WEIGHT else _WEIGHT) * n_stages + stage) * 1_000_000 + micro

    queues = []
    for rank, queue in enumerate(numbered):
        out = []
        for code, stage, micro in queue:
            if code == _FORWARD:
                needs = [(_FORWARD, stage - 1)] if stage > 0 else []
            elif code == _WEIGHT:
                needs = [(_BACKWARD, stage)]
            else:
                needs = [(_FORWARD, stage)] + ([(_BACKWARD, stage + 1)] if stage < last else [])
            waits = tuple((key(c, s, micro), rank_of.get(s) != rank) for c, s in needs)
            out.append((code, stage, code == _FORWARD and micro == 0, key(code, stage, micro), waits))
        queues.append(out)
    return queues


def _gathers_done(queues: list[list[tuple]], gather_ms: tuple[float, ...]) -> dict[int, float]:
    """When each stage's parameters are gathered: a rank gathers its stages one after another, in
    the order it first runs them (FSDP's prefetch inside a stage is not counted: conservative)."""
    done: dict[int, float] = {}
    if not gather_ms:
        return done
    for queue in queues:
        clock = 0.0
        for _, stage, *_ in queue:
            if stage not in done:
                clock += gather_ms[stage]
                done[stage] = clock
    return done


def _numbered(rank_ops: Sequence[_Action]) -> list[tuple]:
    """(code, stage, microbatch) of each compute action. Each stage runs its microbatches in
    order, so the i-th forward (input backward, weight backward) of a stage is microbatch i:
    torch's 1F1B table numbers the last rank's forwards from 1, which would leave it waiting
    forever. A full backward and an input backward share the count (DualPipeV mixes them)."""
    seen: dict[tuple, int] = defaultdict(int)
    out = []
    for action in rank_ops:
        code, stage = _CODE[action.computation_type], action.stage_index
        counter = (_BACKWARD if code == _INPUT else code, stage)
        out.append((code, stage, seen[counter]))
        seen[counter] += 1
    return out
