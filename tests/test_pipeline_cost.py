"""The stage cost model's pieces against FLOPs and bytes counted by hand for Qwen3-1.7B."""

import dataclasses

import pytest

from models.flavors import QWEN3_FLAVORS
from planning.comm import LINKS
from planning.cost import AchievedRates, StageCostInputs, stage_time
from planning.dry_run import _float8_rate_note

QWEN = QWEN3_FLAVORS["1.7B"]  # dim 2048, 16 heads of 128, 8 kv heads, ffn 6144, vocab 151,936
T = 4096  # one sequence of 4,096 tokens
# Rates of 1 TFLOP/s and 1 GB/s make milliseconds = FLOPs / 1e9 = bytes / 1e6.
UNIT = AchievedRates(
    gpu="unit",
    memory_gib=80,
    layer_tflops=1,
    head_tflops={"chunked": 1, "cce": 1, "cce_torch_compile": 1, "head_matmul": 1, "liger": 1},
    logits_gbs=1,
    embedding_gbs=1,
    norm_gbs=1,
)

# By hand: weights of one block: wq, wo 2048 x 2048; wk, wv 2048 x 1024; w1, w2, w3 2048 x 6144.
WEIGHTS = 2 * 2048 * 2048 + 2 * 2048 * 1024 + 3 * 2048 * 6144  # 50,331,648
ATTENTION = 4 * 4096 * 16 * 128 // 2  # scores and PV per token, causal half: 16,777,216
LAYER_FWD = T * (2 * WEIGHTS + ATTENTION)  # 481,036,337,152
LAYER_BWD = T * (4 * WEIGHTS + 5 * ATTENTION // 2)  # 996,432,412,672
GEMM = 2 * T * 2048 * 151936  # one [T, D] x [D, V] matmul: 2,549,099,216,896 FLOPs


def _inputs(**kw) -> StageCostInputs:
    return StageCostInputs(
        **{"model": QWEN, "seq_len": 4096, "microbatch_size": 1, "loss": "chunked", "rates": UNIT, **kw}
    )


def _ms(flops_or_bytes: float) -> float:
    return flops_or_bytes / 1e9


def test_hand_counted_layer_flops():
    assert (LAYER_FWD, LAYER_BWD) == (481_036_337_152, 996_432_412_672)
    t = stage_time(_inputs(), 3, first=False, last=False)
    assert t.forward_ms == pytest.approx(3 * _ms(LAYER_FWD))
    assert t.backward_ms == pytest.approx(3 * _ms(LAYER_BWD))


@pytest.mark.parametrize(
    "mode, option, layers, recomputed",
    [
        ("none", "op", 5, 0),
        ("selective", "op", 5, 0),
        ("full", "op", 5, 5),
        ("selective", "2", 5, 2),
        ("selective", "3", 7, 2),
        ("selective", "1", 4, 4),
    ],
)
def test_activation_checkpointing_adds_one_forward_per_recomputed_block(mode, option, layers, recomputed):
    t = stage_time(_inputs(ac_mode=mode, ac_option=option), layers, first=False, last=False)
    assert t.forward_ms == pytest.approx(layers * _ms(LAYER_FWD))
    assert t.backward_ms == pytest.approx(layers * _ms(LAYER_BWD) + recomputed * _ms(LAYER_FWD))


# (forward, backward) ms at the unit rates: GEMMs / 1e9 and, for cross_entropy, its bytes per
# logit (20 forward, 22 backward) / 1e6.
LOGITS = T * 151936


@pytest.mark.parametrize(
    "loss, fwd, bwd",
    [
        ("chunked", 3 * GEMM / 1e9, 0),  # gradients in the forward
        ("cce", GEMM / 1e9, 3 * GEMM / 1e9),  # logits recomputed in the backward: 8·T·D·V in all
        ("cce_torch_compile", GEMM / 1e9, 2 * GEMM / 1e9),
        ("cross_entropy", GEMM / 1e9 + 20 * LOGITS / 1e6, 2 * GEMM / 1e9 + 22 * LOGITS / 1e6),
        ("liger", 3 * GEMM / 1e9, 0),  # gradients in the forward, like chunked
    ],
)
def test_head_and_loss_by_entry(loss, fwd, bwd):
    norm = 2 * T * 2048 * 2, 3 * T * 2048 * 2  # RMSNorm: read x + write y; read x, dy + write dx
    with_head = stage_time(_inputs(loss=loss), 2, first=False, last=True)
    without = stage_time(_inputs(loss=loss), 2, first=False, last=False)
    assert with_head.forward_ms - without.forward_ms == pytest.approx(fwd + norm[0] / 1e6)
    assert with_head.backward_ms - without.backward_ms == pytest.approx(bwd + norm[1] / 1e6)


def test_embedding_is_its_rows_forward_and_the_dense_gradient_backward():
    first = stage_time(_inputs(), 2, first=True, last=False)
    middle = stage_time(_inputs(), 2, first=False, last=False)
    assert first.forward_ms - middle.forward_ms == pytest.approx(2 * T * 2048 * 2 / 1e6)
    assert first.backward_ms - middle.backward_ms == pytest.approx((151936 * 2048 * 2 + 3 * T * 2048 * 2) / 1e6)


@pytest.mark.parametrize("degree", [2, 4, 8])
def test_vocab_parallel_head_keeps_the_flops_and_adds_the_gather_and_reduce_scatter(degree):
    # Each rank: all n x T gathered tokens against V/n rows = the unsharded head's FLOPs;
    # plus (n - 1) x T x D bf16 received by the all-gather and again by the reduce-scatter, at the link rate.
    sharded = stage_time(_inputs(loss="cce", vocab_parallel_degree=degree), 1, first=False, last=True)
    whole = stage_time(_inputs(loss="cce"), 1, first=False, last=True)
    moved = (degree - 1) * T * 2048 * 2 / (LINKS.collective_gbs * 1e6)
    assert sharded.forward_ms - whole.forward_ms == pytest.approx(moved)
    assert sharded.backward_ms - whole.backward_ms == pytest.approx(moved)


def test_unresolved_loss_is_refused():
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        _inputs(loss="auto")


def test_microbatch_scales_tokens_not_attention_length():
    two = stage_time(dataclasses.replace(_inputs(), microbatch_size=2), 1, first=False, last=False)
    assert two.forward_ms == pytest.approx(2 * _ms(LAYER_FWD))


def test_float8_blocks_run_at_the_tables_float8_rate_and_at_bf16s_where_it_has_none():
    plain = stage_time(_inputs(), 1, False, False)
    assert stage_time(_inputs(float8=True), 1, False, False) == plain  # UNIT has no float8 rate
    faster = dataclasses.replace(UNIT, layer_tflops_float8=2.0)
    float8 = stage_time(_inputs(rates=faster, float8=True), 1, False, False)
    assert float8.forward_ms == pytest.approx(_ms(LAYER_FWD) / 2) and float8.backward_ms == pytest.approx(
        _ms(LAYER_BWD) / 2
    )
    assert stage_time(_inputs(rates=faster), 1, False, False) == plain  # a bf16 run keeps the bf16 rate


@pytest.mark.parametrize("float8_rate, says", [(None, "no float8 rate"), (0.5, "below bf16's 1"), (2.0, "(float8)")])
def test_the_dry_run_says_which_block_rate_a_float8_run_got(float8_rate, says):
    """A float8 recipe is told when its GPU's table has no float8 rate, or one below bf16's (the H100's, timed
    at one 4,096-token sequence, is): the prediction is then no faster than bf16's."""
    rates = dataclasses.replace(UNIT, layer_tflops_float8=float8_rate)
    assert says in _float8_rate_note(_inputs(rates=rates, float8=True))
    assert _float8_rate_note(_inputs(rates=rates)) == ""
