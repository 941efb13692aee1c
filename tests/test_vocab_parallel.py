"""Vocab-parallel linear cross-entropy on groups of 2, 3 and 4 gloo ranks vs a float64 reference.

One spawn of 4 processes runs every case on each group size (ranks ``[0, size)``
form the vocab-parallel group, as a subgroup would in training); the parent
builds the inputs and the reference, the ranks return their loss and gradients.
"""

from dataclasses import dataclass
from unittest import mock

import pytest
import torch

from losses.kernels import chunked
from losses.kernels.chunked import chunked_linear_cross_entropy
from losses.vocab_parallel import VocabParallelOptions, vocab_parallel_linear_cross_entropy, vocab_shard_range
from tests.dist_utils import run_distributed
from tests.reference import IGNORE, reference

D = 24


def make_case(
    seed, *, vocab, batch_shape=(48,), ignored=0.0, target_below=None, bias=False,
    reduce_e_grad=True, chunk_size=None, vocab_given=False, **kwargs,
):  # fmt: skip
    """Inputs plus the loss options (``kwargs``) shared by both sides of the comparison."""
    gen = torch.Generator().manual_seed(seed)
    e = torch.randn(*batch_shape, D, generator=gen) / D**0.5
    c = torch.randn(vocab, D, generator=gen)
    targets = torch.randint(0, target_below or vocab, batch_shape, generator=gen)
    targets[torch.rand(batch_shape, generator=gen) < ignored] = IGNORE
    case = dict(
        e=e, c=c, targets=targets, bias=torch.randn(vocab, generator=gen) if bias else None,
        reduce_e_grad=reduce_e_grad, chunk_size=chunk_size, kwargs=kwargs, vocab_given=vocab_given,
    )  # fmt: skip
    out_shape = reference(e, c, targets, case["bias"], **kwargs).shape
    case["grad_out"] = torch.rand(out_shape, generator=gen) + 0.5
    return case


CASES = {
    "even_split": make_case(0, vocab=96),
    "uneven_ignored_shift": make_case(1, vocab=101, batch_shape=(2, 24), ignored=0.3, shift=1),
    "shift_none": make_case(8, vocab=101, batch_shape=(2, 24), ignored=0.3, shift=1, reduction="none"),
    "all_ignored": make_case(2, vocab=101, ignored=1.0),
    "targets_on_first_rank_only": make_case(3, vocab=101, target_below=10, reduction="sum"),
    "zloss_softcap_none": make_case(4, vocab=101, ignored=0.2, z_loss_weight=1e-2, softcap=3.0, reduction="none"),
    "smoothing_bias": make_case(5, vocab=101, ignored=0.2, label_smoothing=0.1, bias=True),
    # The training head passes the vocabulary's size: nothing all-reduces it (a GPU wait per call).
    "smoothing_vocab_given": make_case(9, vocab=101, ignored=0.2, label_smoothing=0.1, vocab_given=True),
    "partial_e_grad": make_case(6, vocab=101, ignored=0.2, z_loss_weight=1e-2, reduce_e_grad=False),
    "multi_chunk_kernel": make_case(7, vocab=101, batch_shape=(45,), ignored=0.2, softcap=3.0, chunk_size=7),
}


GROUP_SIZES = (2, 3, 4)


def _run_cases(rank, world_size, cases):
    """On each rank: {group size: {case: loss and gradients of this rank's shard}}."""
    results = {}
    for size in GROUP_SIZES:
        group = torch.distributed.new_group(list(range(size)))  # every rank must create it
        if rank < size:
            results[size] = _run_cases_in_group(group, cases)
    return results


def _run_cases_in_group(group, cases):
    results = {}
    for name, case in cases.items():
        kwargs = case["kwargs"]
        options = VocabParallelOptions.from_vocab(case["c"].shape[0], group, reduce_e_grad=case["reduce_e_grad"])
        e = case["e"].clone().requires_grad_()
        c_shard = case["c"][options.start : options.stop].clone().requires_grad_()
        bias = None if case["bias"] is None else case["bias"][options.start : options.stop].clone().requires_grad_()
        if case["vocab_given"]:
            with mock.patch.object(chunked, "_global_vocab_size", side_effect=AssertionError("all-reduced")):
                loss = vocab_parallel_linear_cross_entropy(
                    e, c_shard, case["targets"], options, bias=bias, vocab_size=case["c"].shape[0], **kwargs
                )
        elif case["chunk_size"] is None:
            loss = vocab_parallel_linear_cross_entropy(e, c_shard, case["targets"], options, bias=bias, **kwargs)
        else:  # the kernel directly, to cross chunk boundaries with collectives in each
            loss = chunked_linear_cross_entropy(
                e, c_shard, case["targets"], bias, vocab_start=options.start,
                group=group, chunk_size=case["chunk_size"], **kwargs,
            )  # fmt: skip
        loss.backward(case["grad_out"])
        results[name] = dict(
            range=(options.start, options.stop),
            loss=loss.detach(),
            e_grad=e.grad,
            c_grad=c_shard.grad,
            bias_grad=None if bias is None else bias.grad,
        )
    return results


def _expected(case):
    e = case["e"].double().requires_grad_()
    c = case["c"].double().requires_grad_()
    bias = None if case["bias"] is None else case["bias"].double().requires_grad_()
    loss = reference(e, c, case["targets"], bias, **case["kwargs"])
    loss.backward(case["grad_out"].double())
    return loss.detach(), e.grad, c.grad, None if bias is None else bias.grad


def assert_close(actual, expected, what):
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def results_by_group_size():
    per_rank = run_distributed(_run_cases, max(GROUP_SIZES), CASES)
    return {size: [results[size] for results in per_rank[:size]] for size in GROUP_SIZES}


@pytest.mark.multiprocess
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_matches_single_process_reference(results_by_group_size, group_size):
    per_rank = results_by_group_size[group_size]
    for name, case in CASES.items():
        loss, e_grad, c_grad, bias_grad = _expected(case)
        ranks = [results[name] for results in per_rank]
        vocab = case["c"].shape[0]
        assert [r["range"] for r in ranks] == [vocab_shard_range(vocab, k, group_size) for k in range(group_size)]
        for rank, r in enumerate(ranks):
            start, stop = r["range"]
            assert_close(r["loss"], loss, f"{name} rank {rank} loss")
            assert_close(r["c_grad"], c_grad[start:stop], f"{name} rank {rank} classifier grad")
            if bias_grad is not None:
                assert_close(r["bias_grad"], bias_grad[start:stop], f"{name} rank {rank} bias grad")
            if case["reduce_e_grad"]:
                assert_close(r["e_grad"], e_grad, f"{name} rank {rank} e grad")
        if not case["reduce_e_grad"]:
            assert_close(sum(r["e_grad"] for r in ranks), e_grad, f"{name} summed partial e grads")


@pytest.mark.parametrize("vocab,world_size", [(101, 4), (101, 3), (96, 4), (3, 4)])
def test_shard_ranges_tile_the_vocab(vocab, world_size):
    ranges = [vocab_shard_range(vocab, rank, world_size) for rank in range(world_size)]
    sizes = [stop - start for start, stop in ranges]
    assert ranges[0][0] == 0 and ranges[-1][1] == vocab
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_unknown_impl_is_rejected():
    e, c, targets = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown loss 'triton'"):
        vocab_parallel_linear_cross_entropy(e, c, targets, VocabParallelOptions(0, 5), impl="triton")


@dataclass
class _OtherOptions:
    """Stands in for cut_cross_entropy's own VocabParallelOptions (absent from 25.1.1)."""

    start: int
    stop: int
    group: object = None


def test_accepts_cut_cross_entropy_options(monkeypatch):
    monkeypatch.setattr("losses.vocab_parallel._upstream_options_type", lambda: _OtherOptions)
    case = CASES["even_split"]
    loss = vocab_parallel_linear_cross_entropy(case["e"], case["c"], case["targets"], _OtherOptions(0, 96))
    assert_close(loss, _expected(case)[0], "loss")


def _per_rank_upstream(rank, world_size, case, reduction):
    """Each rank backpropagates a different scalar, g_r = 1 + rank."""
    options = VocabParallelOptions.from_vocab(case["c"].shape[0])
    e = case["e"].clone().requires_grad_()
    c_shard = case["c"][options.start : options.stop].clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(e, c_shard, case["targets"], options, reduction=reduction)
    loss.backward(torch.tensor(1.0 + rank))
    return (options.start, options.stop), e.grad, c_shard.grad


@pytest.mark.multiprocess
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_each_ranks_upstream_gradient_weighs_its_own_shard(reduction):
    """As upstream CCE: e gets sum_r g_r * (shard r's part of dL/de); shard r's rows get g_r * dL/dc_r."""
    case = make_case(9, vocab=101, ignored=0.2)
    per_rank = run_distributed(_per_rank_upstream, 2, case, reduction)
    ranges = [r[0] for r in per_rank]
    # float64 reference: one copy of e per shard, so autograd separates each shard's part
    copies = [case["e"].double().requires_grad_() for _ in ranges]
    shards = [case["c"][a:b].double().requires_grad_() for a, b in ranges]
    logits = torch.cat([e @ c.T for e, c in zip(copies, shards)], dim=-1)
    loss = torch.nn.functional.cross_entropy(logits, case["targets"], ignore_index=IGNORE, reduction=reduction)
    loss.backward()
    expected_e = sum((1.0 + r) * copies[r].grad for r in range(len(ranges)))
    for rank, (_, e_grad, c_grad) in enumerate(per_rank):
        assert_close(e_grad, expected_e, f"rank {rank} e grad")
        assert_close(c_grad, (1.0 + rank) * shards[rank].grad, f"rank {rank} classifier grad")
