"""The pipeline plan: one candidate's checks (``plan_pipeline``) and the search over the recipe's "auto" keys."""

import itertools
from dataclasses import replace

import pytest
import torch
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from config.errors import ConfigError
from config.job_config import Parallelism
from parallelisms.parallel_dims import ParallelDims
from parallelisms.pipeline import PIPELINE_SCHEDULES
from planning import schedule_search
from planning.cost import RATES, stage_cost_inputs
from planning.gpu import of_kind
from planning.memory import CUDA_OVERHEAD_GIB, GIB, estimate_memory, stage_fits
from planning.pipeline_plan import plan_pipeline
from planning.schedule_search import choose_pipeline
from planning.timing import predict_timing
from training.recipe import load_recipe

PP4 = "configs/qwen3_1p7b_pp4.toml"


def _keys(**keys) -> Parallelism:
    """Pipeline keys with a schedule, stages per rank and microbatch size set (1F1B, 1, 1 unless given)."""
    given = {
        "pipeline_parallel_schedule": "1F1B",
        "pipeline_parallel_virtual_stages": 1,
        "pipeline_parallel_microbatch_size": 1,
        **keys,
    }
    return Parallelism(**given)


@pytest.mark.parametrize(
    "overrides, local_batch, key, message",
    [
        (dict(pipeline_parallel_microbatch_size=3), 8, "microbatch_size", "does not divide"),
        (dict(pipeline_parallel_microbatch_size=4), 4, "microbatch_size", "needs at least 2 microbatches"),
        (dict(pipeline_parallel_schedule="Interleaved1F1B"), 8, "virtual_stages", "at least 2 stages per rank"),
        (dict(pipeline_parallel_virtual_stages=2), 8, "pipeline_parallel_schedule", "one stage per rank"),
        (dict(pipeline_parallel_layers_per_stage=3), 8, "layers_per_stage", "does not divide"),
        (dict(pipeline_parallel_stage_split_points=[3, 2]), 8, "split_points", "strictly increasing"),
        (
            dict(pipeline_parallel_schedule="ZBVZeroBubble", pipeline_parallel_virtual_stages=4),
            8,
            "virtual_stages",
            "exactly 2 stages per rank",
        ),
        (  # torch's own rule, checked before anything is built
            dict(pipeline_parallel_schedule="DualPipeV", pipeline_parallel_virtual_stages=2),
            2,
            "microbatch_size",
            "at least as many microbatches as stages",
        ),
    ],
)
def test_pipeline_plan_errors(overrides, local_batch, key, message):
    with pytest.raises(ConfigError, match=message) as err:
        plan_pipeline(8, _keys(pipeline_parallel_degree=2, **overrides), 0, local_batch)
    assert key in err.value.key


def test_pipeline_plan_splits():
    even = plan_pipeline(8, _keys(pipeline_parallel_degree=4), 1, 4)
    assert even.layer_ranges == ((0, 2), (2, 4), (4, 6), (6, 8)) and even.local_stages == (1,)
    uneven = plan_pipeline(7, _keys(pipeline_parallel_degree=2), 0, 4)
    assert uneven.layer_ranges == ((0, 4), (4, 7))
    points = plan_pipeline(8, _keys(pipeline_parallel_degree=2, pipeline_parallel_stage_split_points=[3]), 1, 2)
    assert points.layer_ranges == ((0, 3), (3, 8))
    interleaved = dict(pipeline_parallel_virtual_stages=2, pipeline_parallel_schedule="Interleaved1F1B")
    assert plan_pipeline(8, _keys(pipeline_parallel_degree=2, **interleaved), 1, 4).local_stages == (1, 3)
    for v_shaped in ("ZBVZeroBubble", "DualPipeV"):
        keys = _keys(
            pipeline_parallel_degree=2, pipeline_parallel_virtual_stages=2, pipeline_parallel_schedule=v_shaped
        )
        assert plan_pipeline(8, keys, 0, 4).local_stages == (0, 3)


def _recipe(*overrides, world=8):
    cfg = load_recipe(["--config", PP4, *overrides])
    return cfg, ParallelDims.from_config(cfg.parallelism, world)


def test_the_headline_recipe_predicts_a_bubble_of_at_most_10_percent_within_80_gib():
    cfg, dims = _recipe()
    best = choose_pipeline(cfg, dims, of_kind("h200", 80)).best
    assert best.fits and best.bubble <= 0.10
    assert all(m.peak / GIB + CUDA_OVERHEAD_GIB <= 80 for m in estimate_memory(cfg, dims, best.plan))
    assert predict_timing(cfg, dims, best.plan, RATES["h200"]).schedule.bubble == pytest.approx(best.bubble)


def _every_candidate(cfg, dims, gpu):
    """(step, candidate, fits) of every schedule x stages per rank x microbatch size that plan_pipeline
    accepts, each planned and replayed on its own: what the search's bound lets it skip included."""
    p, n_layers = cfg.parallelism, 28
    out = []
    for schedule, per_rank, mbs in itertools.product(PIPELINE_SCHEDULES, range(1, 8), (1, 2, 4, 8)):
        keys = replace(
            p,
            pipeline_parallel_schedule=schedule,
            pipeline_parallel_virtual_stages=per_rank,
            pipeline_parallel_microbatch_size=mbs,
        )
        cost = stage_cost_inputs(cfg, dims, mbs, RATES["h200"])
        try:
            plan = plan_pipeline(
                n_layers,
                keys,
                0,
                cfg.training.local_batch_size,
                cost,
                stage_fits(cfg, dims, gpu),
                lambda plan: predict_timing(cfg, dims, plan, RATES["h200"]).schedule.makespan_ms,
            )
        except ConfigError:
            continue
        peak = max(m.peak for m in estimate_memory(cfg, dims, plan)) / GIB + CUDA_OVERHEAD_GIB
        out.append(
            (
                round(predict_timing(cfg, dims, plan, RATES["h200"]).schedule.makespan_ms, 6),
                (schedule, per_rank, mbs),
                peak <= gpu,
            )
        )
    return out


@pytest.mark.parametrize("gpu", [80, 16])  # at 16 GiB the fastest candidates do not fit
def test_the_winner_and_the_best_shown_are_the_fastest_that_fit_of_every_candidate(gpu):
    cfg, dims = _recipe("--training.local_batch_size", "8")
    choice = choose_pipeline(cfg, dims, of_kind("h200", gpu))
    brute = sorted((step, c) for step, c, fits in _every_candidate(cfg, dims, gpu) if fits)
    shown = [
        (round(o.step_ms, 6), (o.candidate.schedule, o.candidate.virtual_stages, o.candidate.microbatch_size))
        for o in choice.outcomes[:5]
    ]
    assert [step for step, _ in shown] == [step for step, _ in brute[:5]]
    assert shown[0] == brute[0]
    assert choice.best.fits and choice.best.peak_gib <= gpu


def test_explicit_keys_are_obeyed():
    cfg, dims = _recipe("--parallelism.pipeline_parallel_schedule", "1F1B")
    assert {o.candidate.schedule for o in choose_pipeline(cfg, dims, of_kind("h200", 80)).outcomes} == {"1F1B"}
    cfg, dims = _recipe("--parallelism.pipeline_parallel_microbatch_size", "2")
    assert {o.candidate.microbatch_size for o in choose_pipeline(cfg, dims, of_kind("h200", 80)).outcomes} == {2}
    cfg, dims = _recipe("--parallelism.pipeline_parallel_virtual_stages", "3")
    choice = choose_pipeline(cfg, dims, of_kind("h200", 80))
    assert {o.plan.num_stages for o in choice.outcomes} == {12} and choice.best.plan.schedule == "Interleaved1F1B"
    cfg, dims = _recipe("--parallelism.pipeline_parallel_stage_split_points", "[7, 14, 21]")
    assert {o.plan.layer_ranges for o in choose_pipeline(cfg, dims, of_kind("h200", 80)).outcomes} == {
        ((0, 7), (7, 14), (14, 21), (21, 28))
    }


def test_every_rank_reaches_the_same_plan():
    cfg, dims = _recipe()
    plans = [choose_pipeline(cfg, dims, of_kind("h200", 80)).plan_for(r) for r in range(4)]
    assert len({(p.schedule, p.microbatch_size, p.layer_ranges, p.n_microbatches) for p in plans}) == 1
    assert [p.pp_rank for p in plans] == [0, 1, 2, 3]
    assert (
        choose_pipeline(*_recipe(), of_kind("h200", 80)).plan_for(0) == plans[0]
    )  # a pure function of recipe, layout and GPU


def test_nothing_that_fits_is_one_config_line_naming_the_fix():
    cfg, dims = _recipe()
    err = choose_pipeline(cfg, dims, of_kind("h200", 10)).problem  # what train.py raises
    assert "no schedule, stages per rank and microbatch size fit" in str(err)
    assert err.key == "parallelism.pipeline_parallel_schedule" and "activation_checkpoint.mode" in str(err)
    explicit = ["--parallelism.pipeline_parallel_schedule", "GPipe", "--parallelism.pipeline_parallel_virtual_stages"]
    cfg, dims = _recipe(*explicit, "1", "--parallelism.pipeline_parallel_microbatch_size", "1")
    err = choose_pipeline(cfg, dims, of_kind("h200", 40)).problem  # GPipe holds all 32 microbatches
    assert "with the three keys 'auto' the run takes Interleaved1F1B" in str(err)
    assert err.key == "parallelism.pipeline_parallel_microbatch_size" and "\n" not in str(err)


def test_zero_bubble_schedules_are_left_out_where_torch_cannot_split_a_function(monkeypatch):
    monkeypatch.setattr(schedule_search, "torch_splits_function_backward", lambda: False)
    cfg, dims = _recipe("--training.local_batch_size", "8")
    choice = choose_pipeline(cfg, dims, of_kind("h200", 80))
    assert not {o.candidate.schedule for o in choice.outcomes} & {"InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"}
    assert "cannot split the backward of the compiled blocks" in choice.notes[0]
    cfg, dims = _recipe("--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble")
    with pytest.raises(ConfigError, match="cannot split the backward") as err:
        choose_pipeline(cfg, dims, of_kind("h200", 80))
    assert err.value.key == "parallelism.pipeline_parallel_schedule"
    # eager blocks and the materialized loss: plain autograd nodes, which any torch splits
    plain = ["--compile.enable", "false", "--loss.name", "cross_entropy", "--training.local_batch_size", "8"]
    cfg, dims = _recipe("--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble", *plain)
    assert choose_pipeline(cfg, dims, of_kind("h200", 80)).best.plan.schedule == "ZBVZeroBubble"


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def test_torch_runs_a_compiled_blocks_backward_whole_in_both_zero_bubble_actions():
    """What the cost model's BackwardSplit assumes, asked of torch: a compiled block is one autograd node,
    which the input action (stage_backward_input) and the weight action (stage_backward_weight) each run."""
    torch.manual_seed(0)
    block = _Block()
    block.compile(backend="aot_eager", fullgraph=True)  # one graph, as parallelisms/compile.py compiles a block
    x = torch.randn(2, 4, requires_grad=True)
    y = block(x)
    runs = []
    y.grad_fn.register_prehook(lambda grads: runs.append(1))  # the compiled graph's backward node
    _, groups = stage_backward_input([y], [torch.ones_like(y)], [x], list(block.parameters()))
    assert len(runs) == 1
    if not schedule_search.torch_splits_function_backward():  # torch 2.11: the search leaves them out
        with pytest.raises(RuntimeError, match="_input_metadata"):
            stage_backward_weight(list(block.parameters()), groups)
        return
    stage_backward_weight(list(block.parameters()), groups)
    assert len(runs) == 2
