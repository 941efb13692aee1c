"""The default pipeline split against splits found from FLOP arithmetic written here.

The stage times below are counted in this file (not with the module's helpers) at the
module's measured rates; the expected split is found by trying every split (pp 2 and 4) or
every first/last stage size with the middle stages even (pp 8, whose middle stages cost the
same), and picking the one whose stage times sorted slowest first are smallest, earlier
stages taking the extra layer on a tie. With two stages per rank, the rank-balanced split
is found by trying every number of layers per rank.
"""

import itertools

import pytest

from config.job_config import Parallelism
from models.flavors import LLAMA3_FLAVORS, QWEN3_FLAVORS
from planning.cost import RATES, StageCostInputs
from planning.pipeline_plan import plan_pipeline
from planning.replay import StageDurations, schedule_ops, simulate_schedule

R = RATES["h200"]  # the table the expectations below were worked out with

# (name, model, seq_len, AC mode, what the recipe trains with)
QWEN = ("Qwen3-1.7B", QWEN3_FLAVORS["1.7B"], 4096, "selective")  # configs/qwen3_1p7b_pp4.toml
LLAMA = ("Llama-3-8B", LLAMA3_FLAVORS["8B"], 8192, "full")  # configs/llama3_8b.toml


def _stage_fwd_bwd(model, seq, ac, loss, layers, first, last):
    """(forward, backward) ms of one microbatch (one sequence) through a stage, counted from the shapes."""
    d, v, t = model.dim, model.vocab_size, seq
    q, kv = model.n_heads * model.head_dim, model.n_kv_heads * model.head_dim
    weights = d * q * 2 + d * kv * 2 + d * model.ffn_dim * 3  # wq, wo, wk, wv, w1-w3
    scores = 4 * seq * q / 2  # QK^T and PV, causal: half
    fwd, bwd = t * (2 * weights + scores), t * (4 * weights + 2.5 * scores)
    layer = R.layer_tflops * 1e9  # FLOPs per ms
    f, b = layers * fwd / layer, (layers * bwd + (layers * fwd if ac == "full" else 0)) / layer
    if first:  # token rows forward; dense [V, D] gradient + rows backward; bf16
        f += 2 * t * d * 2 / (R.embedding_gbs * 1e6)
        b += (v * d * 2 + 3 * t * d * 2) / (R.embedding_gbs * 1e6)
    if last:
        f += 2 * t * d * 2 / (R.norm_gbs * 1e6)
        b += 3 * t * d * 2 / (R.norm_gbs * 1e6)
        gemm = 2 * t * d * v
        head_f, head_b = {"chunked": (3, 0), "cce": (1, 3)}[loss]  # chunked: gradients in the forward
        rate = R.head_tflops[loss] * 1e9  # chunked and cce: their rate keys are their names
        f, b = f + head_f * gemm / rate, b + head_b * gemm / rate
    return f, b


def _stage_ms(model, seq, ac, loss, layers, first, last):
    return sum(_stage_fwd_bwd(model, seq, ac, loss, layers, first, last))


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


def _parallelism(**keys):
    """The recipe's keys with a schedule, stages per rank and microbatch size set (1F1B, 1, 1 unless given)."""
    keys = {
        "pipeline_parallel_schedule": "1F1B",
        "pipeline_parallel_virtual_stages": 1,
        "pipeline_parallel_microbatch_size": 1,
        **keys,
    }
    return Parallelism(**keys)


def _planned(model, seq, ac, loss, pp, **parallelism):
    cost = StageCostInputs(model, seq, 1, loss, ac, "op", rates=R)
    plan = plan_pipeline(model.n_layers, _parallelism(pipeline_parallel_degree=pp, **parallelism), 0, 16, cost)
    return tuple(b - a for a, b in plan.layer_ranges)


@pytest.mark.parametrize("flavor", [QWEN, LLAMA], ids=lambda f: f[0])
@pytest.mark.parametrize("loss", ["chunked", "cce"])
@pytest.mark.parametrize("pp", [2, 4, 8])
def test_default_split_is_the_best_by_hand_counted_cost(flavor, loss, pp):
    _, model, seq, ac = flavor
    expected = (_best_by_trying_all if pp <= 4 else _best_with_even_middles)(model, seq, ac, loss, pp)
    assert _planned(model, seq, ac, loss, pp) == expected


def test_the_headline_recipe_gives_the_head_stage_fewer_layers():
    """Qwen3-1.7B PP=4: the head + loss is several layers of work, so its stage keeps clearly fewer."""
    _, model, seq, ac = QWEN
    for loss in ("cce", "chunked"):
        layers = _planned(model, seq, ac, loss, 4)
        assert sum(layers) == 28 and layers[-1] < min(layers[:-1]) - 2, (loss, layers)


def _best_by_rank(model, seq, ac, loss, ranks):
    """Slowest rank first, then slowest stage; earlier ranks, then earlier stages, take the extra layer."""
    n_stages = sum(map(len, ranks))

    def ms(s, k):
        return _stage_ms(model, seq, ac, loss, k, s == 0, s == n_stages - 1)

    def rank_best(stages, layers):  # (a, b) layers on the rank's two stages
        options = [
            (
                (
                    round(ms(stages[0], a) + ms(stages[1], layers - a), 9),
                    tuple(sorted((ms(stages[0], a), ms(stages[1], layers - a)), reverse=True)),
                    -a,
                ),
                a,
            )
            for a in range(1, layers)
        ]
        (total, times, _), a = min(options)
        return total, times, {stages[0]: a, stages[1]: layers - a}

    best = None
    spare = model.n_layers - len(ranks)  # each rank's layers minus one, split into positive parts
    for cuts in itertools.combinations(range(1, spare), len(ranks) - 1):
        per_rank = [b - a + 1 for a, b in zip((0, *cuts), (*cuts, spare))]
        results = [rank_best(stages, k) for stages, k in zip(ranks, per_rank)]
        key = (
            tuple(sorted((r[0] for r in results), reverse=True)),
            tuple(sorted((t for r in results for t in r[1]), reverse=True)),
            tuple(-k for k in per_rank),
        )
        counts = {s: k for r in results for s, k in r[2].items()}
        best = min(best or (key, counts), (key, counts))
    return tuple(best[1][s] for s in range(n_stages))


INTERLEAVED = [(0, 4), (1, 5), (2, 6), (3, 7)]
V_SHAPE = [(0, 7), (1, 6), (2, 5), (3, 4)]  # ZBV: rank 0 holds the embedding's stage and the head's


@pytest.mark.parametrize("schedule, ranks", [("Interleaved1F1B", INTERLEAVED), ("ZBVZeroBubble", V_SHAPE)])
@pytest.mark.parametrize("loss, microbatches", [("cce", 16), ("chunked", 8)])
def test_virtual_stages_take_the_faster_of_rank_and_stage_balance(schedule, ranks, loss, microbatches):
    """8 stages on 4 ranks: the rank-balanced and the stage-balanced splits, replayed on torch's action
    lists with the hand-counted times; the one that ends first (the rank-balanced on a tie)."""
    _, model, seq, ac = QWEN
    by_rank = _best_by_rank(model, seq, ac, loss, ranks)
    by_stage = _best_with_even_middles(model, seq, ac, loss, 8)

    def makespan(counts):
        times = [_stage_fwd_bwd(model, seq, ac, loss, k, s == 0, s == 7) for s, k in enumerate(counts)]
        ops = schedule_ops(schedule, 4, microbatches, 2)
        return round(simulate_schedule(ops, [StageDurations.halves(f, b) for f, b in times]).makespan_ms, 6)

    rank_ms, stage_ms = makespan(by_rank), makespan(by_stage)
    cost = StageCostInputs(model, seq, 1, loss, ac, "op", rates=R)
    p = _parallelism(
        pipeline_parallel_degree=4, pipeline_parallel_schedule=schedule, pipeline_parallel_virtual_stages=2
    )
    plan = plan_pipeline(model.n_layers, p, 0, microbatches, cost)
    assert tuple(b - a for a, b in plan.layer_ranges) == (by_stage if stage_ms < rank_ms else by_rank)


@pytest.mark.parametrize(
    "keys, ranges",
    [
        (dict(pipeline_parallel_stage_split_points=[7, 14, 21]), ((0, 7), (7, 14), (14, 21), (21, 28))),
        (dict(pipeline_parallel_layers_per_stage=7), ((0, 7), (7, 14), (14, 21), (21, 28))),
    ],
)
def test_explicit_keys_win(keys, ranges):
    _, model, seq, ac = QWEN
    cost = StageCostInputs(model, seq, 1, "cce", ac, "op", rates=R)
    assert plan_pipeline(28, _parallelism(pipeline_parallel_degree=4, **keys), 0, 8, cost).layer_ranges == ranges


def test_memory_predicate_bounds_the_split():
    _, model, seq, ac = QWEN
    cost = StageCostInputs(model, seq, 1, "cce", ac, "op", rates=R)
    p = _parallelism(pipeline_parallel_degree=4)
    seen = set()

    def at_most_8_before_the_last(plan, stage, layers):
        seen.add((plan.num_stages, stage))
        return stage == 3 or layers <= 8

    plan = plan_pipeline(28, p, 0, 8, cost, at_most_8_before_the_last)
    # 24 layers at most on stages 0-2, so stage 3 holds 4 or more: 8/8/8/4 is the best left
    assert [b - a for a, b in plan.layer_ranges] == [8, 8, 8, 4]
    assert seen == {(4, s) for s in range(4)}
    # nothing fits: the unconstrained split (the memory estimate then reports the rank that is over)
    assert (
        plan_pipeline(28, p, 0, 8, cost, lambda *_: False).layer_ranges == plan_pipeline(28, p, 0, 8, cost).layer_ranges
    )


def test_without_costs_the_split_stays_even():
    assert plan_pipeline(28, _parallelism(pipeline_parallel_degree=4), 0, 8).layer_ranges == (
        (0, 7),
        (7, 14),
        (14, 21),
        (21, 28),
    )
