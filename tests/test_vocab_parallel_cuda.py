"""The "cce" vocab-parallel backend (CCE 25.1.1's Triton kernels) vs a float64 reference.

One GPU, no group: the whole classifier (also against CCE's own loss) and a strict
sub-range (a shard's local loss: targets owned elsewhere are masked out). Two GPUs:
one process per GPU, vocab-parallel over an NCCL group, one spawn running every case
with impl "cce" and "chunked". On the CPU: which backend "auto" and "cce" resolve to.
"""

import pytest
import torch
import torch.distributed as dist

from losses.registry import ENTRIES
from losses.vocab_parallel import VocabParallelOptions, _backend, vocab_parallel_linear_cross_entropy, vocab_shard_range
from tests.dist_utils import run_distributed
from tests.reference import IGNORE, reference

# Relative tolerance on max |error| / max |reference|. Loss: CCE's target logit sums
# bf16-rounded products, and "chunked" rounds the logits to bf16. Gradients: both
# round the logit gradient to bf16 before the GEMMs (3e-2 as in test_losses); CCE
# 25.1.1 also accumulates the e gradient in bf16 over blocks of 128 vocabulary rows:
# on H200s, 2.9% of max for CCE alone (4,099 rows) and up to 4.8% here (25,001 a shard).
LOSS_TOL = 3e-3
GRAD_TOL = {"cce": 8e-2, "chunked": 3e-2}
IMPLS = ("cce", "chunked")


def needs_gpus(count: int):
    return pytest.mark.skipif(torch.cuda.device_count() < count, reason=f"needs {count} CUDA GPU(s)")


def make_case(
    seed, *, vocab, tokens=(256,), dim=128, scale=1.0, ignored=0.0, target_below=None, dtype=torch.bfloat16,
    reduce_e_grad=True, filter_eps="high", shift=0, softcap=None, reduction="mean",
):  # fmt: skip
    """Inputs on the CPU; ``kwargs`` are the loss options the reference shares."""
    gen = torch.Generator().manual_seed(seed)
    e = (torch.randn(*tokens, dim, generator=gen) * scale / dim**0.5).to(dtype)
    c = torch.randn(vocab, dim, generator=gen).to(dtype)
    targets = torch.randint(0, target_below or vocab, tokens, generator=gen)
    targets[torch.rand(tokens, generator=gen) < ignored] = IGNORE
    out_shape = (*tokens[:-1], tokens[-1] - shift) if reduction == "none" else ()
    return dict(
        e=e, c=c, targets=targets, grad_out=torch.rand(out_shape, generator=gen) + 0.5,
        reduce_e_grad=reduce_e_grad, filter_eps=filter_eps,
        kwargs=dict(shift=shift, softcap=softcap, reduction=reduction),
    )  # fmt: skip


def loss_and_grads(case, options, impl, device):
    """This rank's loss and gradients (on the CPU) for ``c``'s rows ``[options.start, options.stop)``."""
    e = case["e"].to(device).requires_grad_()
    c_shard = case["c"][options.start : options.stop].to(device).requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(
        e, c_shard, case["targets"].to(device), options, impl=impl, filter_eps=case["filter_eps"], **case["kwargs"]
    )
    loss.backward(case["grad_out"].to(device))
    return dict(range=(options.start, options.stop), loss=loss.detach().cpu(), e=e.grad.cpu(), c=c_shard.grad.cpu())


def expected(case, device="cpu"):
    """Float64 (loss, e grad, c grad) of the bf16/fp16 inputs."""
    e = case["e"].to(device).double().requires_grad_()
    c = case["c"].to(device).double().requires_grad_()
    loss = reference(e, c, case["targets"].to(device), **case["kwargs"])
    loss.backward(case["grad_out"].to(device).double())
    return dict(loss=loss.detach().cpu(), e=e.grad.cpu(), c=c.grad.cpu())


def assert_rel(actual, wanted, tol, what):
    """max |actual - wanted| <= tol * max |wanted|: exact where ``wanted`` is all zeros."""
    wanted = wanted.double().cpu()
    error = (actual.double().cpu() - wanted).abs().max().item()
    bound = tol * wanted.abs().max().item()
    print(f"{what}: {error / (bound / tol or 1):.2e} of max |reference|")  # shown by pytest -rP
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g} ({tol} of max |reference|)"


def assert_results(got, want, what, grad_tol=GRAD_TOL["cce"], loss_tol=LOSS_TOL):
    assert_rel(got["loss"], want["loss"], loss_tol, f"{what} loss")
    assert_rel(got["e"], want["e"], grad_tol, f"{what} e grad")
    assert_rel(got["c"], want["c"], grad_tol, f"{what} c grad")


# --- one GPU ---------------------------------------------------------------------------

ONE_GPU_CASES = {
    "mean_filtered": dict(ignored=0.2),
    "sum_softcap_exact": dict(softcap=3.0, filter_eps=None, reduction="sum", dim=120),
    "none_fp16_shift": dict(tokens=(2, 128), ignored=0.2, dtype=torch.float16, shift=1, reduction="none"),
}


@pytest.mark.cuda
@needs_gpus(1)
@pytest.mark.parametrize("name", ONE_GPU_CASES)
def test_whole_vocab_matches_cce_and_reference(name):
    from cut_cross_entropy import linear_cross_entropy

    case = make_case(0, vocab=4099, **ONE_GPU_CASES[name])
    got = loss_and_grads(case, VocabParallelOptions(0, 4099), "cce", "cuda")
    assert_results(got, expected(case, "cuda"), name)

    e = case["e"].cuda().requires_grad_()
    c = case["c"].cuda().requires_grad_()
    kwargs = case["kwargs"]
    loss = linear_cross_entropy(
        e, c, case["targets"].cuda(), softcap=kwargs["softcap"], reduction=kwargs["reduction"],
        shift=bool(kwargs["shift"]), filter_eps=case["filter_eps"], impl="cce",
    )  # fmt: skip
    loss.backward(case["grad_out"].cuda())
    assert_results(got, dict(loss=loss.detach(), e=e.grad, c=c.grad), f"{name} vs CCE")


@pytest.mark.cuda
@needs_gpus(1)
def test_sub_range_is_the_shards_local_loss():
    """Alone, the shard ``[start, stop)`` scores each token against its own rows only,
    and a target outside them contributes no target logit (forward) and matches no
    column (backward)."""
    start, stop = 1000, 3000
    case = make_case(1, vocab=4096, ignored=0.2, reduction="none")
    got = loss_and_grads(case, VocabParallelOptions(start, stop), "cce", "cuda")

    e = case["e"].cuda().double().requires_grad_()
    c_shard = case["c"][start:stop].cuda().double().requires_grad_()
    targets = case["targets"].cuda()
    logits = e @ c_shard.T
    owned = (targets >= start) & (targets < stop)
    target_logit = logits.gather(1, (targets - start).clamp(0, stop - start - 1)[:, None]).squeeze(1)
    loss = torch.where(targets != IGNORE, logits.logsumexp(1) - target_logit * owned, 0.0)
    loss.backward(case["grad_out"].cuda().double())
    assert 0 < owned.sum() < (targets != IGNORE).sum()
    assert_results(got, dict(loss=loss.detach(), e=e.grad, c=c_shard.grad), "sub-range")


@pytest.mark.cuda
@needs_gpus(1)
def test_auto_picks_cce_where_its_kernels_can_compute_the_loss():
    e = torch.randn(8, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    c = torch.randn(32, 16, device="cuda", dtype=torch.bfloat16)
    cce, chunked = ENTRIES["cce"].facts.vocab_parallel, ENTRIES["chunked"].facts.vocab_parallel
    assert _backend("auto", e, c, None, {})[0] is cce
    assert _backend("auto", e, c, None, {"z_loss_weight": 1e-4})[0] is chunked
    assert _backend("auto", e.float(), c, None, {})[0] is chunked  # CCE backpropagates bf16/fp16 only
    with pytest.raises(ValueError, match="bf16/fp16"):
        _backend("cce", e.float(), c, None, {})
    with torch.no_grad():
        assert _backend("auto", e.float(), c.float(), None, {})[0] is cce  # forward is fine


# --- two GPUs, one NCCL process each ---------------------------------------------------

DIST_CASES = {
    "even_split": dict(seed=10, vocab=8192, ignored=0.1),
    "uneven_50001_ignored_shift": dict(seed=11, vocab=50_001, tokens=(2, 128), ignored=0.25, shift=1),
    "all_ignored": dict(seed=12, vocab=1001, ignored=1.0),
    "softcap_none_uneven_dim": dict(seed=13, vocab=50_001, tokens=(200,), dim=120, ignored=0.2, softcap=3.0,
                                    reduction="none"),
    "targets_on_rank0_only": dict(seed=14, vocab=8191, target_below=100, reduction="sum"),
    "partial_e_grad": dict(seed=15, vocab=8191, ignored=0.2, reduce_e_grad=False),
    "peaked_exact": dict(seed=16, vocab=8191, scale=2.0, filter_eps=None),
    "fp16": dict(seed=17, vocab=8191, dtype=torch.float16, ignored=0.1),
}  # fmt: skip


def _run_dist_cases(rank, world_size, cases):
    """Gloo joins the processes; the loss's collectives run on an NCCL group of all of them."""
    torch.cuda.set_device(rank)
    group = dist.new_group(list(range(world_size)), backend="nccl")
    results = {}
    for name, case in cases.items():
        options = VocabParallelOptions.from_vocab(case["c"].shape[0], group, reduce_e_grad=case["reduce_e_grad"])
        results[name] = {impl: loss_and_grads(case, options, impl, torch.device("cuda", rank)) for impl in IMPLS}
    return results


@pytest.fixture(scope="module")
def dist_cases_and_results():
    cases = {name: make_case(**spec) for name, spec in DIST_CASES.items()}
    return cases, run_distributed(_run_dist_cases, 2, cases, timeout_s=200)


@pytest.mark.cuda
@needs_gpus(2)
@pytest.mark.parametrize("name", DIST_CASES)
def test_two_gpus_match_reference(dist_cases_and_results, name):
    cases, per_rank = dist_cases_and_results
    case, want = cases[name], expected(cases[name])
    vocab = case["c"].shape[0]
    for impl in IMPLS:
        ranks = [results[name][impl] for results in per_rank]
        for rank, got in enumerate(ranks):
            start, stop = got["range"]
            assert (start, stop) == vocab_shard_range(vocab, rank, 2)
            assert_rel(got["loss"], want["loss"], LOSS_TOL, f"{impl} rank {rank} loss")
            assert_rel(got["c"], want["c"][start:stop], GRAD_TOL[impl], f"{impl} rank {rank} c grad")
            if case["reduce_e_grad"]:
                assert_rel(got["e"], want["e"], GRAD_TOL[impl], f"{impl} rank {rank} e grad")
        if not case["reduce_e_grad"]:
            summed = sum(got["e"].double() for got in ranks)
            assert_rel(summed, want["e"], GRAD_TOL[impl], f"{impl} summed partial e grads")
    both = GRAD_TOL["cce"] + GRAD_TOL["chunked"]
    for rank, results in enumerate(per_rank):
        got = results[name]
        assert_results(got["cce"], got["chunked"], f"rank {rank} cce vs chunked", grad_tol=both, loss_tol=2 * LOSS_TOL)


# --- CPU ---------------------------------------------------------------------------------


def test_auto_is_chunked_on_cpu():
    e, c = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4)
    assert _backend("auto", e, c, None, {}) == (ENTRIES["chunked"].facts.vocab_parallel, "torch")


@pytest.mark.parametrize(
    "options,match",
    [(dict(bias=torch.zeros(5)), "bias"), (dict(z_loss_weight=1e-4), "z-loss"),
     (dict(label_smoothing=0.1), "label smoothing"), ({}, "CUDA")],
)  # fmt: skip
def test_cce_says_what_it_cannot_compute(options, match):
    e, c, targets = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=f"'cce' cannot compute this loss here: .*{match}"):
        vocab_parallel_linear_cross_entropy(e, c, targets, VocabParallelOptions(0, 5), impl="cce", **options)
