"""The run log's split line and the dry run's compute prediction for the PP=4 recipe."""

import pytest

from parallelisms.parallel_dims import ParallelDims
from planning.cost import head_in_layers, stage_cost_inputs, stage_time
from planning.pipeline_plan import recipe_plan
from planning.timing import predict_timing, split_summary
from training.recipe import load_recipe

PP4 = "configs/qwen3_1p7b_pp4.toml"


def _plan(*overrides):
    cfg = load_recipe(["--config", PP4, *overrides])
    dims = ParallelDims.from_config(cfg.parallelism, 8)
    return cfg, dims, recipe_plan(cfg, dims, 0)


def test_split_summary_names_the_split_and_why():
    cfg, dims, plan = _plan()
    line = split_summary(cfg, dims, plan)
    layers = "/".join(str(end - start) for start, end in plan.layer_ranges)
    head = head_in_layers(stage_cost_inputs(cfg, dims))
    assert line.startswith(f"pipeline split {layers} layers (stages 0-3), predicted fw + bw ms per microbatch ")
    assert line.endswith(f"chosen to balance the head (cce, {head:.1f} decoder layers of fw + bw work) on stage 3")
    cfg, dims, plan = _plan("--parallelism.pipeline_parallel_stage_split_points", "[7, 14, 21]")
    line = split_summary(cfg, dims, plan)
    assert "split 7/7/7/7 layers" in line and line.endswith("set by parallelism.pipeline_parallel_stage_split_points")
    cfg, dims, plan = _plan(
        "--parallelism.pipeline_parallel_schedule",
        "ZBVZeroBubble",
        "--parallelism.pipeline_parallel_virtual_stages",
        "2",
    )
    assert split_summary(cfg, dims, plan).endswith("on stage 7 (pp rank 0)")


def test_ranks_add_their_stages_and_the_even_split_is_slower():
    cfg, dims, plan = _plan(
        "--parallelism.pipeline_parallel_schedule",
        "Interleaved1F1B",
        "--parallelism.pipeline_parallel_virtual_stages",
        "2",
    )
    timing = predict_timing(cfg, dims, plan)
    cost = stage_cost_inputs(cfg, dims)
    (a, b), (c, d) = plan.layer_ranges[3], plan.layer_ranges[7]  # rank 3 holds stages 3 and 7 (the last)
    assert timing.rank(3).total_ms == pytest.approx(
        stage_time(cost, b - a, False, False).total_ms + stage_time(cost, d - c, False, True).total_ms
    )
    balanced = predict_timing(*_plan())
    even = predict_timing(*_plan("--parallelism.pipeline_parallel_stage_split_points", "[7, 14, 21]"))
    assert balanced.slowest_over_fastest < 1.1 and even.slowest_over_fastest > 1.5
    assert balanced.schedule.makespan_ms < even.schedule.makespan_ms
