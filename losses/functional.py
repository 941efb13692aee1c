"""Small pure functions every loss entry shares, so each rule is written once."""

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from config.job_config import Loss

IGNORE_INDEX = Loss.ignore_index  # the recipe's default (PyTorch's -100)
REDUCTIONS = ("mean", "sum", "none")


def shift_targets(labels: Tensor, shift: int, ignore_index: int) -> Tensor:
    """Targets for next-token prediction: ``targets[..., t] = labels[..., t + shift]``.

    The last ``shift`` positions have nothing to predict and get ``ignore_index``.
    Shifting the (small) labels keeps the hidden states in place: no copy of the
    ``[B, S, D]`` activations and no gradient scatter back into a slice.
    """
    if shift == 0:
        return labels
    pad = labels.new_full((*labels.shape[:-1], shift), ignore_index)
    return torch.cat([labels[..., shift:], pad], dim=-1)


def linear_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None, softcap: float = 0.0) -> Tensor:
    """``hidden @ weight.T (+ bias)`` in at least fp32, then softcapped when ``softcap > 0``.

    The GEMM runs in the input dtype (it accumulates in fp32 on GPUs); its output is
    upcast before the bias, the softcap and any exponent, which is where bf16 would
    lose the loss. fp64 inputs stay fp64, which the tests use for tight checks.
    """
    logits = F.linear(hidden, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def mean_divisor(targets: Tensor, ignore_index: int) -> Tensor:
    """Number of real targets, at least 1: a batch with none gives a mean of 0, not NaN."""
    return (targets != ignore_index).sum().clamp(min=1)
