"""The run log's split line and the dry run's step prediction for the PP=4 recipe."""

import pytest

from parallelisms.parallel_dims import ParallelDims
from planning.comm import LINKS
from planning.cost import RATES, head_in_layers, stage_cost_inputs, stage_time
from planning.gpu import of_kind
from planning.schedule_search import choose_pipeline
from planning.timing import predict_timing, split_summary
from training.recipe import load_recipe

PP4 = "configs/qwen3_1p7b_pp4.toml"
ONE_F_ONE_B = ["--parallelism.pipeline_parallel_schedule", "1F1B", "--training.local_batch_size", "8"]


def _plan(*overrides):
    cfg = load_recipe(["--config", PP4, *overrides])
    dims = ParallelDims.from_config(cfg.parallelism, 8)
    return cfg, dims, choose_pipeline(cfg, dims, of_kind("h200", None)).plan_for(0)


def test_split_summary_names_the_split_and_why():
    cfg, dims, plan = _plan(*ONE_F_ONE_B)
    line = split_summary(cfg, dims, plan, RATES["h200"])
    layers = "/".join(str(end - start) for start, end in plan.layer_ranges)
    head = head_in_layers(stage_cost_inputs(cfg, dims, plan.microbatch_size, RATES["h200"]))
    assert line.startswith(f"pipeline split {layers} layers (stages 0-3), predicted fw + bw ms per microbatch ")
    assert ", 1F1B bubble " in line
    assert line.endswith(f"chosen to balance the head (cce, {head:.1f} decoder layers of fw + bw work) on stage 3")
    cfg, dims, plan = _plan(*ONE_F_ONE_B, "--parallelism.pipeline_parallel_stage_split_points", "[7, 14, 21]")
    line = split_summary(cfg, dims, plan, RATES["h200"])
    assert "split 7/7/7/7 layers" in line and line.endswith("set by parallelism.pipeline_parallel_stage_split_points")
    cfg, dims, plan = _plan("--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble")
    assert split_summary(cfg, dims, plan, RATES["h200"]).endswith("on stage 7 (pp rank 0)")


def test_ranks_add_their_stages_and_the_even_split_is_slower():
    cfg, dims, plan = _plan(
        "--parallelism.pipeline_parallel_schedule",
        "Interleaved1F1B",
        "--parallelism.pipeline_parallel_virtual_stages",
        "2",
    )
    timing = predict_timing(cfg, dims, plan, RATES["h200"])
    cost = stage_cost_inputs(cfg, dims, plan.microbatch_size, RATES["h200"])
    (a, b), (c, d) = plan.layer_ranges[3], plan.layer_ranges[7]  # rank 3 holds stages 3 and 7 (the last)
    assert timing.rank(3).total_ms == pytest.approx(
        stage_time(cost, b - a, False, False).total_ms + stage_time(cost, d - c, False, True).total_ms
    )
    balanced = predict_timing(*_plan(*ONE_F_ONE_B), RATES["h200"])
    even = predict_timing(
        *_plan(*ONE_F_ONE_B, "--parallelism.pipeline_parallel_stage_split_points", "[7, 14, 21]"), RATES["h200"]
    )
    assert balanced.slowest_over_fastest < 1.1 and even.slowest_over_fastest > 1.5
    assert balanced.schedule.makespan_ms < even.schedule.makespan_ms


def test_sends_and_fsdp_collectives_are_bytes_over_the_stated_rates():
    cfg, dims, plan = _plan(*ONE_F_ONE_B)
    comm = predict_timing(cfg, dims, plan, RATES["h200"]).comm
    # one sequence of 4,096 tokens x 2,048 bf16 values between stages
    assert comm.transfer_ms == pytest.approx(1e3 * 4096 * 2048 * 2 / (LINKS.p2p_gbs * 1e9))
    # stage 3: 4 blocks, the final norm and the (tied, here separate) head, half of it gathered from the other
    # dp_shard rank in bf16, half of its fp32 gradient reduce-scattered to it
    block = 2048 * (2048 * 2 + 1024 * 2 + 3 * 6144) + 2 * 2048 + 2 * 128  # Qwen3-1.7B: GQA, two norms, qk-norm
    params = 4 * block + 2048 + 151936 * 2048
    assert comm.gather_ms[3] == pytest.approx(1e3 * params / 2 * 2 / (LINKS.collective_gbs * 1e9))
    assert comm.reduce_ms[3] == pytest.approx(1e3 * params / 2 * 4 / (LINKS.collective_gbs * 1e9))
    without = predict_timing(
        cfg, ParallelDims.from_config(cfg.parallelism, 4), plan, RATES["h200"]
    )  # no FSDP: dp_shard 1
    assert sum(without.comm.gather_ms) == sum(without.comm.reduce_ms) == 0
    assert without.schedule.makespan_ms < predict_timing(cfg, dims, plan, RATES["h200"]).schedule.makespan_ms
