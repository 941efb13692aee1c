"""The default pipeline split against splits found from FLOP arithmetic written here.

The stage times below are counted in this file (not with the module's helpers) at the
module's measured rates; the expected split is found by trying every split (pp 2 and 4) or
every first/last stage size with the middle stages even (pp 8, whose middle stages cost the
same), and picking the one whose stage times sorted slowest first are smallest, earlier
stages taking the extra layer on a tie.
"""

import itertools

import pytest

from models.flavors import LLAMA3_FLAVORS, QWEN3_FLAVORS
from parallelisms.pipeline import plan_pipeline
from parallelisms.pipeline_cost import MEASURED as R
from parallelisms.pipeline_cost import StageCostInputs
from training.config import Parallelism

# (name, model, seq_len, AC mode, what the recipe trains with)
QWEN = ("Qwen3-1.7B", QWEN3_FLAVORS["1.7B"], 4096, "selective")  # configs/qwen3_1p7b_pp4.toml
LLAMA = ("Llama-3-8B", LLAMA3_FLAVORS["8B"], 8192, "full")  # configs/llama3_8b.toml


def _stage_ms(model, seq, ac, loss, layers, first, last):
    """One microbatch (one sequence) through a stage, in ms, counted from the shapes."""
    d, v, t = model.dim, model.vocab_size, seq
    q, kv = model.n_heads * model.head_dim, model.n_kv_heads * model.head_dim
    weights = d * q * 2 + d * kv * 2 + d * model.ffn_dim * 3  # wq, wo, wk, wv, w1-w3
    scores = 4 * seq * q / 2  # QK^T and PV, causal: half
    fwd, bwd = t * (2 * weights + scores), t * (4 * weights + 2.5 * scores)
    flops = layers * (fwd + bwd) + (layers * fwd if ac == "full" else 0)
    ms = flops / (R.layer_tflops * 1e9)
    if first:  # token rows forward; dense [V, D] gradient + rows backward; bf16
        ms += (v * d * 2 + 5 * t * d * 2) / (R.embedding_gbs * 1e6)
    if last:
        ms += 5 * t * d * 2 / (R.norm_gbs * 1e6)
        gemm = 2 * t * d * v
        ms += {"chunked": 3 * gemm / (R.chunked_tflops * 1e9), "cce": 4 * gemm / (R.cce_tflops * 1e9)}[loss]
    return ms


def _key(times, counts):
    return tuple(sorted(times, reverse=True)), tuple(-k for k in counts)


def _best_by_trying_all(model, seq, ac, loss, n_stages):
    best = None
    for cuts in itertools.combinations(range(1, model.n_layers), n_stages - 1):
        counts = [b - a for a, b in zip((0, *cuts), (*cuts, model.n_layers))]
        times = [_stage_ms(model, seq, ac, loss, k, s == 0, s == n_stages - 1) for s, k in enumerate(counts)]
        best = min(best or _key(times, counts), _key(times, counts))
    return tuple(-k for k in best[1])


def _best_with_even_middles(model, seq, ac, loss, n_stages):
    best, middles = None, n_stages - 2
    for first in range(1, model.n_layers):
        for last in range(1, model.n_layers - first - middles + 1):
            base, extra = divmod(model.n_layers - first - last, middles)
            if base == 0:
                continue
            counts = [first, *(base + (i < extra) for i in range(middles)), last]
            times = [_stage_ms(model, seq, ac, loss, k, s == 0, s == n_stages - 1) for s, k in enumerate(counts)]
            best = min(best or _key(times, counts), _key(times, counts))
    return tuple(-k for k in best[1])


def _planned(model, seq, ac, loss, pp, **parallelism):
    cost = StageCostInputs(model, seq, 1, loss, ac, "op")
    plan = plan_pipeline(model.n_layers, Parallelism(pipeline_parallel_degree=pp, **parallelism), 0, 16, cost)
    return tuple(b - a for a, b in plan.layer_ranges)


@pytest.mark.parametrize("flavor", [QWEN, LLAMA], ids=lambda f: f[0])
@pytest.mark.parametrize("loss", ["chunked", "cce"])
@pytest.mark.parametrize("pp", [2, 4, 8])
def test_default_split_is_the_best_by_hand_counted_cost(flavor, loss, pp):
    _, model, seq, ac = flavor
    expected = (_best_by_trying_all if pp <= 4 else _best_with_even_middles)(model, seq, ac, loss, pp)
    assert _planned(model, seq, ac, loss, pp) == expected


def test_the_headline_recipe_gives_the_head_stage_fewer_layers():
    """Qwen3-1.7B PP=4: the head + cce is 8.2 layers of work, so its stage keeps one layer."""
    _, model, seq, ac = QWEN
    assert _planned(model, seq, ac, "cce", 4) == (9, 9, 9, 1)
    assert _planned(model, seq, ac, "chunked", 4) == (8, 9, 8, 3)


@pytest.mark.parametrize("schedule", ["Interleaved1F1B", "ZBVZeroBubble"])
def test_virtual_stages_balance_the_stage_list(schedule):
    """8 stages on 4 ranks: the embedding on stage 0, the head on stage 7 (rank 3, or rank 0 in ZBV)."""
    _, model, seq, ac = QWEN
    got = _planned(model, seq, ac, "cce", 4, pipeline_parallel_schedule=schedule, pipeline_parallel_virtual_stages=2)
    assert got == _best_with_even_middles(model, seq, ac, "cce", 8) == (3, 4, 4, 4, 4, 4, 4, 1)


@pytest.mark.parametrize("keys, ranges", [
    (dict(pipeline_parallel_stage_split_points=[7, 14, 21]), ((0, 7), (7, 14), (14, 21), (21, 28))),
    (dict(pipeline_parallel_layers_per_stage=7), ((0, 7), (7, 14), (14, 21), (21, 28))),
])
def test_explicit_keys_win(keys, ranges):
    _, model, seq, ac = QWEN
    cost = StageCostInputs(model, seq, 1, "cce", ac, "op")
    assert plan_pipeline(28, Parallelism(pipeline_parallel_degree=4, **keys), 0, 8, cost).layer_ranges == ranges


def test_memory_predicate_bounds_the_split():
    _, model, seq, ac = QWEN
    cost = StageCostInputs(model, seq, 1, "cce", ac, "op")
    p = Parallelism(pipeline_parallel_degree=4)
    seen = set()

    def at_most_8_before_the_last(plan, stage, layers):
        seen.add((plan.num_stages, stage))
        return stage == 3 or layers <= 8

    plan = plan_pipeline(28, p, 0, 8, cost, at_most_8_before_the_last)
    # 24 layers at most on stages 0-2, so stage 3 holds 4 or more: 8/8/8/4 is the best left
    assert [b - a for a, b in plan.layer_ranges] == [8, 8, 8, 4]
    assert seen == {(4, s) for s in range(4)}
    # nothing fits: the unconstrained split (the memory estimate then reports the rank that is over)
    assert plan_pipeline(28, p, 0, 8, cost, lambda *_: False).layer_ranges == plan_pipeline(28, p, 0, 8, cost).layer_ranges


def test_without_costs_the_split_stays_even():
    assert plan_pipeline(28, Parallelism(pipeline_parallel_degree=4), 0, 8).layer_ranges == \
        ((0, 7), (7, 14), (14, 21), (21, 28))
