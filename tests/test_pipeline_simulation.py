"""Replaying torch's schedule action lists against timelines worked out by hand."""

import pytest
from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
from torch.distributed.pipelining.schedules import _Action, _ComputationType

from parallelisms.pipeline import PIPELINE_SCHEDULES
from planning.replay import Communication, StageDurations, schedule_ops, simulate_schedule

_F, _I, _W = _ComputationType.FORWARD, _ComputationType.BACKWARD_INPUT, _ComputationType.BACKWARD_WEIGHT


def _stages(forward, backward):
    return [StageDurations.halves(f, b) for f, b in zip(forward, backward)]


@pytest.mark.parametrize(
    "schedule, per_rank", [(name, 1 if name in ("GPipe", "1F1B") else 2) for name in PIPELINE_SCHEDULES]
)
@pytest.mark.parametrize("pp, microbatches", [(2, 4), (4, 8), (4, 3)])
def test_action_lists_are_the_visualizers(schedule, per_rank, pp, microbatches):
    """The lists built with stand-in stages are torch's own (its visualizer mocks the whole stage)."""
    try:
        reference = get_schedule_ops(PIPELINE_SCHEDULES[schedule], pp, microbatches, per_rank)
    except ValueError:
        with pytest.raises(ValueError):
            schedule_ops(schedule, pp, microbatches, per_rank)
        return
    compute = []
    for rank_ops in reference:
        actions = []
        for a in rank_ops:
            if a is not None and a.computation_type == _ComputationType.OVERLAP_F_B:
                actions += a.sub_actions
            elif a is not None and a.computation_type in (_F, _ComputationType.FULL_BACKWARD, _I, _W):
                actions.append(a)
        compute.append(tuple(actions))
    assert schedule_ops(schedule, pp, microbatches, per_rank) == tuple(compute)


# 1F1B on 2 ranks, stage 0: F 1 ms, B 2 ms; stage 1: F 2 ms, B 4 ms.
# 2 microbatches:  rank 0  F0 0-1  F1 1-2  .......  B0 7-9  ....  B1 13-15
#                  rank 1  .  F0 1-3  B0 3-7  F1 7-9  B1 9-13
# 3 microbatches:  rank 0  F0 0-1  F1 1-2  B0 7-9  F2 9-10  B1 13-15  B2 19-21
#                  rank 1  F0 1-3  B0 3-7  F1 7-9  B1 9-13  F2 13-15  B2 15-19
@pytest.mark.parametrize("microbatches, makespan", [(2, 15.0), (3, 21.0)])
def test_1f1b_two_ranks_unequal_stages(microbatches, makespan):
    timing = simulate_schedule(schedule_ops("1F1B", 2, microbatches, 1), _stages([1, 2], [2, 4]))
    assert timing.makespan_ms == makespan
    assert timing.busy_ms == (3.0 * microbatches, 6.0 * microbatches)
    assert timing.bubble == pytest.approx(1 - 9 * microbatches / (2 * makespan))


def test_transfers_hold_up_the_receiver():
    # The 2-microbatch timeline above with 0.5 ms per send between the ranks:
    # rank 1  F0 1.5-3.5  B0 3.5-7.5  F1 7.5-9.5  B1 9.5-13.5;  rank 0  F0 0-1  F1 1-2  B0 8-10  B1 14-16
    comm = Communication(transfer_ms=0.5)
    timing = simulate_schedule(schedule_ops("1F1B", 2, 2, 1), _stages([1, 2], [2, 4]), comm)
    assert timing.makespan_ms == 16.0 and timing.busy_ms == (6.0, 12.0)


def test_fsdp_gathers_precede_the_first_forward_and_reductions_end_the_step():
    # As above without sends; stage 0 gathers for 3 ms, stage 1 for 0.5 ms: rank 0's F0 runs 3-4, F1 4-5,
    # rank 1's F0 4-6, B0 6-10, F1 10-12, B1 12-16; rank 0's B0 10-12, B1 16-18. Stage 0's reduction
    # (1 ms) ends at 19, stage 1's (2 ms) at 18: the step ends at 19.
    comm = Communication(gather_ms=(3.0, 0.5), reduce_ms=(1.0, 2.0))
    timing = simulate_schedule(schedule_ops("1F1B", 2, 2, 1), _stages([1, 2], [2, 4]), comm)
    assert timing.makespan_ms == 19.0 and timing.busy_ms == (6.0, 12.0)


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
    timing = simulate_schedule(
        schedule_ops(schedule, pp, microbatches, per_rank), _stages([1.0] * stages, [2.0] * stages)
    )
    assert timing.bubble == pytest.approx(bubble)


def test_zero_bubble_runs_the_input_and_weight_actions():
    # One microbatch, F 1 ms on both stages, B 2 ms on stage 0 and 4 on stage 1, split in halves:
    # rank 1  F 1-2  I 2-4  W 4-6;  rank 0  F 0-1  I 4-5 (after rank 1's I)  W 5-6.
    ops = [[_Action(s, kind, 0) for kind in (_F, _I, _W)] for s in (0, 1)]
    timing = simulate_schedule(ops, _stages([1, 1], [2, 4]))
    assert timing.makespan_ms == 6.0 and timing.busy_ms == (3.0, 5.0)
    # a backward whose I and W each run it whole (a compiled block): twice its time
    whole = simulate_schedule(ops, [StageDurations(1, b, b, b) for b in (2, 4)])
    assert whole.busy_ms == (5.0, 9.0)


@pytest.mark.parametrize("schedule", ["ZBVZeroBubble", "DualPipeV"])
def test_v_schedules_count_each_backward_once(schedule):
    timing = simulate_schedule(schedule_ops(schedule, 2, 4, 2), _stages([1, 2, 3, 4], [2, 4, 6, 8]))
    # rank 0 holds stages 0 and 3, rank 1 stages 1 and 2; 4 microbatches each
    assert timing.busy_ms == (4 * (1 + 2 + 4 + 8), 4 * (2 + 4 + 3 + 6))
    assert 0 < timing.bubble < 1


def test_an_action_that_waits_forever_is_an_error():
    with pytest.raises(ValueError, match="deadlock"):
        simulate_schedule([[], [_Action(1, _F, 0)]], _stages([1, 1], [1, 1]))
