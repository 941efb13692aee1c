"""Replaying torch's schedule action lists against timelines worked out by hand."""

import pytest
from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
from torch.distributed.pipelining.schedules import _Action, _ComputationType

from parallelisms.pipeline import PIPELINE_SCHEDULES
from planning.replay import simulate_schedule


def _ops(schedule: str, pp: int, microbatches: int, per_rank: int = 1):
    return get_schedule_ops(PIPELINE_SCHEDULES[schedule], pp, microbatches, per_rank)


# 1F1B on 2 ranks, stage 0: F 1 ms, B 2 ms; stage 1: F 2 ms, B 4 ms.
# 2 microbatches:  rank 0  F0 0-1  F1 1-2  .......  B0 7-9  ....  B1 13-15
#                  rank 1  .  F0 1-3  B0 3-7  F1 7-9  B1 9-13
# 3 microbatches:  rank 0  F0 0-1  F1 1-2  B0 7-9  F2 9-10  B1 13-15  B2 19-21
#                  rank 1  F0 1-3  B0 3-7  F1 7-9  B1 9-13  F2 13-15  B2 15-19
@pytest.mark.parametrize("microbatches, makespan", [(2, 15.0), (3, 21.0)])
def test_1f1b_two_ranks_unequal_stages(microbatches, makespan):
    timing = simulate_schedule(_ops("1F1B", 2, microbatches), forward_ms=[1, 2], backward_ms=[2, 4])
    assert timing.makespan_ms == makespan
    assert timing.busy_ms == (3.0 * microbatches, 6.0 * microbatches)
    assert timing.bubble == pytest.approx(1 - 9 * microbatches / (2 * makespan))


@pytest.mark.parametrize(
    "schedule, pp, microbatches, per_rank, bubble",
    [
        ("1F1B", 4, 8, 1, 3 / 11),  # (p - 1) / (m + p - 1) with equal stages
        ("1F1B", 4, 16, 1, 3 / 19),
        ("GPipe", 4, 8, 1, 3 / 11),
        ("Interleaved1F1B", 4, 8, 2, 3 / 19),  # (p - 1) / (v·m + p - 1)
    ],
)
def test_equal_stages_give_the_textbook_bubble(schedule, pp, microbatches, per_rank, bubble):
    stages = pp * per_rank
    timing = simulate_schedule(_ops(schedule, pp, microbatches, per_rank), [1.0] * stages, [2.0] * stages)
    assert timing.bubble == pytest.approx(bubble)


def test_zero_bubble_halves_the_backward_into_input_and_weight():
    # One microbatch, F 1 ms on both stages, B 2 ms on stage 0 and 4 on stage 1, split in halves:
    # rank 1  F 1-2  I 2-4  W 4-6;  rank 0  F 0-1  I 4-5 (after rank 1's I)  W 5-6.
    f, i, w = _ComputationType.FORWARD, _ComputationType.BACKWARD_INPUT, _ComputationType.BACKWARD_WEIGHT
    ops = [[_Action(s, kind, 0) for kind in (f, i, w)] for s in (0, 1)]
    timing = simulate_schedule(ops, forward_ms=[1, 1], backward_ms=[2, 4])
    assert timing.makespan_ms == 6.0 and timing.busy_ms == (3.0, 5.0)


def test_torch_zero_bubble_tables_count_each_backward_once():
    timing = simulate_schedule(_ops("ZBVZeroBubble", 2, 4, 2), [1, 2, 3, 4], [2, 4, 6, 8])
    # rank 0 holds stages 0 and 3, rank 1 stages 1 and 2; 4 microbatches each
    assert timing.busy_ms == (4 * (1 + 2 + 4 + 8), 4 * (2 + 4 + 3 + 6))
    assert 0 < timing.bubble < 1


def test_an_action_that_waits_forever_is_an_error():
    f = _ComputationType.FORWARD
    with pytest.raises(ValueError, match="deadlock"):
        simulate_schedule([[], [_Action(1, f, 0)]], [1, 1], [1, 1])
