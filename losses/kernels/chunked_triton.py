"""Triton kernels for the chunked loss on CUDA: two passes over a chunk's logits.

The chunked loss spends three GEMMs per token chunk (logits, then the two
gradients) and, between them, elementwise work over the ``[chunk, V]`` block.
In PyTorch that work is several passes over fp32 copies of the block; here it is
two passes over the block in the GEMM's own dtype (bf16), with fp32 arithmetic:

* ``row_stats``: one read; per row the maximum, the sum of ``exp(z - max)`` (an
  online softmax), the target logit and, for label smoothing, the sum of logits.
* ``logit_grad``: one read and one write, in place: the block of logits becomes
  the block of logit gradients the two gradient GEMMs consume.

The logit softcap is applied inside both (the block holds the raw GEMM output),
so no capped copy exists either. The math is that of the PyTorch ops in
``chunked_linear_cross_entropy.py``; the tests compare the two.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from losses.kernels.chunked import FILTER_SLAB

_BLOCK = FILTER_SLAB  # logits per program step; a row of V logits takes ceil(V / _BLOCK) steps
# The vocabulary (of this shard) is a compile-time constant: one model has one or two
# sizes, and Triton 3.6's interpreter cannot loop to a run-time bound.


@triton.jit
def _capped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        z = softcap * (2 * tl.sigmoid(2 * z / softcap) - 1)  # softcap * tanh(z / softcap)
    return z


@triton.jit
def _row_stats_kernel(
    logits_ptr,
    stride,
    vocab: tl.constexpr,
    col_ptr,
    owned_ptr,
    max_ptr,
    sums_ptr,
    n_rows,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    WITH_SUM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    row_max = float("-inf")
    exp_sum = 0.0
    logit_sum = 0.0
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab
        z = _capped(tl.load(base + offs, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(z, 0))
        exp_sum = exp_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max), 0)
        row_max = new_max
        if WITH_SUM:
            logit_sum += tl.sum(tl.where(mask, z, 0.0), 0)
    owned = tl.load(owned_ptr + row)
    target = tl.load(base + tl.load(col_ptr + row)).to(tl.float32)
    target = tl.where(owned != 0, _capped(target, softcap, HAS_SOFTCAP), 0.0)
    tl.store(max_ptr + row, row_max)
    tl.store(sums_ptr + row, exp_sum)
    tl.store(sums_ptr + n_rows + row, target)
    if WITH_SUM:
        tl.store(sums_ptr + 2 * n_rows + row, logit_sum)


@triton.jit
def _logit_grad_kernel(
    logits_ptr,
    stride,
    vocab: tl.constexpr,
    lse_ptr,
    col_ptr,
    owned_ptr,
    weight_ptr,
    slab_max_ptr,
    softcap,
    z_loss_weight,
    label_smoothing,
    total_vocab,
    HAS_SOFTCAP: tl.constexpr,
    FILTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    lse = tl.load(lse_ptr + row)
    weight = tl.load(weight_ptr + row)
    softmax_scale = 1 + 2 * z_loss_weight * lse
    uniform = label_smoothing / total_vocab  # the global vocabulary under vocab parallelism
    target_step = 1 - label_smoothing
    col = tl.where(tl.load(owned_ptr + row) != 0, tl.load(col_ptr + row), -1)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab
        z = _capped(tl.load(base + offs, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        grad = tl.exp(z - lse) * softmax_scale - uniform - tl.where(offs == col, target_step, 0.0)
        if HAS_SOFTCAP:
            grad *= 1 - (z / softcap) * (z / softcap)
        if FILTER:  # the slab's largest unweighted gradient among the tokens that count
            tl.atomic_max(slab_max_ptr + start // BLOCK, tl.max(tl.where(mask, tl.abs(grad), 0.0), 0), mask=weight != 0)
        tl.store(base + offs, (grad * weight).to(logits_ptr.dtype.element_ty), mask=mask)


def linear_logits_raw(e: Tensor, w: Tensor, bias: Optional[Tensor], softcap: float) -> Tensor:
    """The GEMM output in its own dtype; the kernels apply the softcap."""
    logits = e @ w.T
    if bias is not None:
        logits += bias
    return logits


def row_stats(logits: Tensor, col: Tensor, owned: Tensor, with_logit_sum: bool, softcap: float):
    """(row max, stack of [sum exp(z - max), target logit (0 if not owned), sum of logits])."""
    n, vocab = logits.shape
    row_max = torch.empty(n, dtype=torch.float32, device=logits.device)
    sums = torch.empty(3 if with_logit_sum else 2, n, dtype=torch.float32, device=logits.device)
    _row_stats_kernel[(n,)](
        logits,
        logits.stride(0),
        vocab,
        col,
        owned,
        row_max,
        sums,
        n,
        softcap,
        HAS_SOFTCAP=softcap > 0,
        WITH_SUM=with_logit_sum,
        BLOCK=_BLOCK,
    )
    return row_max, sums


def logit_grad(
    logits: Tensor,
    lse: Tensor,
    col: Tensor,
    owned: Tensor,
    token_weight: Tensor,
    vocab_size: Optional[int],
    softcap: float,
    z_loss_weight: float,
    label_smoothing: float,
    slab_max: Optional[Tensor] = None,
) -> Tensor:
    """The gradient of the weighted loss w.r.t. the raw logits, written over ``logits``;
    ``slab_max`` (zeros, one per ``FILTER_SLAB`` columns) gets the largest unweighted magnitude
    in each slab over the tokens whose weight is not 0, for the gradient filter."""
    n, vocab = logits.shape
    _logit_grad_kernel[(n,)](
        logits,
        logits.stride(0),
        vocab,
        lse.float(),
        col,
        owned,
        token_weight.float(),
        lse if slab_max is None else slab_max,  # not read without FILTER
        softcap,
        z_loss_weight,
        label_smoothing,
        vocab_size or vocab,
        HAS_SOFTCAP=softcap > 0,
        FILTER=slab_max is not None,
        BLOCK=_BLOCK,
    )
    return logits
