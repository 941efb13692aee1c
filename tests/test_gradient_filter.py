"""``chunked``'s gradient filter (``filter_eps``) against a float64 reference that drops the same slabs.

The classifier's bias makes slabs 0 and 2 of the vocabulary likely and slabs 1 and 3 unlikely, so a
chunk's unweighted logit gradients there stay below ``EPS`` and the filter leaves those slabs out of
both gradient GEMMs, except in the one chunk whose token has its target in slab 1. What is dropped is
about 1 % of the gradients: the exact path differs from the filtered one, and the filtered one must
equal the reference to rounding.
"""

import pytest
import torch
import torch.nn.functional as F

from losses import build_loss
from losses.kernels.chunked import FILTER_SLAB, chunked_linear_cross_entropy
from losses.options import filter_threshold
from models.output_head import OutputHead

N, D, CHUNK = 48, 16, 16
V = 3 * FILTER_SLAB + 100  # four slabs, the last one partial
EPS = 1e-3
HAS_CUDA = torch.cuda.is_available()
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


def make_inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64) / D**0.5
    bias = torch.zeros(V, dtype=torch.float64)
    bias[:FILTER_SLAB] = bias[2 * FILTER_SLAB : 3 * FILTER_SLAB] = 3.0
    targets = torch.randint(0, FILTER_SLAB, (N,), generator=gen) + torch.tensor([0, 2 * FILTER_SLAB]).repeat(N // 2)
    targets[CHUNK + 3] = FILTER_SLAB + 7  # chunk 1 keeps slab 1
    targets[[5, 40]] = -100
    return hidden, weight, bias, targets


def reference(hidden, weight, bias, targets, upstream):
    """(loss, dhidden, dweight, dbias, slabs dropped) in float64, dropping a chunk's slab whose
    unweighted gradients of the tokens that count are all below EPS."""
    valid = targets != -100
    logits = hidden @ weight.T + bias
    unit = logits.softmax(-1) - F.one_hot(targets.where(valid, 0), V).double()
    dropped = 0
    for start in range(0, N, CHUNK):
        for lo in range(0, V, FILTER_SLAB):
            block = unit[start : start + CHUNK, lo : lo + FILTER_SLAB]
            if block[valid[start : start + CHUNK]].abs().max() < EPS:
                block.zero_()
                dropped += 1
    grad = unit * (upstream * valid)[:, None]
    loss = F.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
    return loss, grad @ weight, grad.T @ hidden, grad.sum(0), dropped


def filtered(hidden, weight, bias, targets, reduction, device, dtype, filter_eps=EPS):
    leaves = [x.to(device, dtype, copy=True).requires_grad_() for x in (hidden, weight, bias)]
    loss = chunked_linear_cross_entropy(
        *leaves[:2], targets.to(device), leaves[2], chunk_size=CHUNK, reduction=reduction, filter_eps=filter_eps
    )
    upstream = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    loss.backward(upstream.to(device, loss.dtype) if reduction == "none" else None)
    return loss.detach(), [x.grad for x in leaves], upstream


@pytest.mark.parametrize(
    "device, dtype, tolerance",
    [
        ("cpu", torch.float64, 1e-12),
        pytest.param("cuda", torch.float32, 1e-5, marks=cuda_only),  # its Triton kernels
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_filtered_gradients_are_the_reference_without_the_dropped_slabs(device, dtype, tolerance, reduction):
    hidden, weight, bias, targets = make_inputs()
    loss, grads, upstream = filtered(hidden, weight, bias, targets, reduction, device, dtype)
    valid = targets != -100
    if reduction == "mean":
        upstream = torch.full((N,), 1 / valid.sum().item(), dtype=torch.float64)
    ref_loss, *ref_grads, dropped = reference(hidden, weight, bias, targets, upstream)
    assert dropped == 2 + 3  # slab 1 of chunks 0 and 2 (chunk 1 has a target there), slab 3 of all three

    expected_loss = ref_loss if reduction == "none" else ref_loss.sum() / valid.sum()
    torch.testing.assert_close(loss.cpu().double(), expected_loss, rtol=tolerance, atol=0)  # the loss is exact
    _, exact_grads, _ = filtered(hidden, weight, bias, targets, reduction, device, dtype, filter_eps=None)
    for name, got, exact, ref in zip(("hidden", "weight", "bias"), grads, exact_grads, ref_grads):
        scale = ref.abs().max()
        error = (got.cpu().double() - ref).abs().max() / scale
        dropped_part = (exact.cpu().double() - ref).abs().max() / scale
        assert error < tolerance, (name, error.item())
        assert dropped_part > 10 * max(tolerance, 1e-5), (name, dropped_part.item())  # the filter dropped some


def test_the_entry_filters_at_the_recipe_threshold():
    hidden, weight, bias, targets = make_inputs()
    head = OutputHead(D, V, bias=True).double()
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    labels = torch.cat([targets.new_zeros(1), targets])[None]  # the entry scores hidden[t] against labels[t + 1]
    e = torch.cat([hidden, hidden.new_zeros(1, D)])[None].requires_grad_()
    loss = build_loss("chunked", head, {"filter_eps": EPS, "chunk_size": CHUNK}, device="cpu")(e, labels)
    loss.backward()
    _, (grad_hidden, grad_weight, _), _ = filtered(hidden, weight, bias, targets, "mean", "cpu", torch.float64)
    torch.testing.assert_close(e.grad[0, :N], grad_hidden)
    torch.testing.assert_close(head.weight.grad, grad_weight)


def test_filter_eps_values_become_thresholds():
    assert filter_threshold("default", torch.bfloat16) is None  # chunked's default: exact
    assert filter_threshold(0, torch.bfloat16) is None
    assert filter_threshold("high", torch.bfloat16) == filter_threshold("auto", torch.bfloat16) == 2.0**-12
    assert filter_threshold("high", torch.float32) == torch.finfo(torch.float32).eps / 32
    assert filter_threshold(1e-5, torch.bfloat16) == 1e-5
