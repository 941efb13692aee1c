"""``liger``: Liger-Kernel's fused linear cross-entropy (``pip install liger-kernel``, 0.8.2 or later).

Its forward runs the logits GEMM over token chunks, turns each chunk's logits into their
gradient in place with one Triton kernel (softmax, z-loss, label smoothing, softcap) and
multiplies it out into the hidden states' and the classifier's gradients at once; the
backward only scales them. We call that forward (``liger_kernel.ops.fused_linear_cross_entropy``)
from our own autograd function, whose backward hands the gradients out the way zero-bubble
pipeline schedules need (``losses/kernels/forward_grads.py``; Liger's own scales them in place
on every call). Reduction "none" computes no gradients in the forward; its backward runs
Liger's forward again with the per-token upstream gradient (what 0.8.2 added). Liger-Kernel
is optional and imported on first use: it needs Triton.
"""

import functools
import importlib
import importlib.metadata
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from losses.base import OutputLoss
from losses.facts import LossFacts, LossShape, fixed_kernels, gradients_held
from losses.functional import mean_divisor
from losses.kernels.forward_grads import ForwardGradients
from losses.options import COMMON_OPTIONS

MINIMUM_VERSION = (0, 8, 2)  # per-token upstream gradients for reduction "none" (earlier releases get them wrong)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def liger_problem() -> Optional[str]:
    """Why Liger-Kernel's fused linear cross-entropy cannot be called here, or None."""
    try:
        importlib.import_module("liger_kernel.ops.fused_linear_cross_entropy")
    except ModuleNotFoundError as err:
        if err.name is not None and err.name.split(".")[0] == "liger_kernel":
            return "liger-kernel is not installed: pip install liger-kernel"
        return f"Liger-Kernel cannot be imported ({err})"
    except ImportError as err:
        return f"Liger-Kernel cannot be imported ({err})"
    version = importlib.metadata.version("liger-kernel")
    release = tuple(int(part) for part in version.split(".")[:3] if part.isdigit())
    if release < MINIMUM_VERSION:
        return f"liger-kernel {version} is installed, and this entry needs 0.8.2 or later: pip install -U liger-kernel"
    return None


def _chunk_tokens(s: LossShape) -> int:
    """Tokens per chunk as Liger-Kernel 0.8.5 sizes them: a [chunk, V] block about the size of
    the [tokens, D] hidden states, rounded up to a power of two."""
    per_chunk = -(-s.rows // s.dim)  # ceil(V / D) chunks' worth of hidden states in one block
    return min(1 << (-(-s.tokens // per_chunk) - 1).bit_length(), s.tokens)


def _workspace(s: LossShape) -> float:
    """One [chunk, V] logits block in the hidden states' dtype beside the gradients (Qwen3-1.7B,
    8,192 tokens: 37 MiB, as benchmarks/loss_bench.py measured, docs/performance.md). An fp32
    classifier's gradient is accumulated through a [V, D] temporary per chunk."""
    fp32_temporary = s.act_bytes * s.rows * s.dim if s.act_bytes == 4 else 0
    return gradients_held(s, s.act_bytes * _chunk_tokens(s) * s.rows + fp32_temporary)


class _LigerLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e: Tensor, c: Tensor, bias: Optional[Tensor], targets: Tensor, loss: "LigerLoss", grad: bool):
        from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

        options = loss.liger_options()
        per_token = loss.reduction == "none"
        needs = ctx.needs_input_grad[:3]
        grads_now = grad and any(needs) and not per_token
        total, *_, grad_e, grad_c, grad_bias = fused_linear_cross_entropy_forward(
            e,
            c,
            targets,
            bias=bias,
            reduction="none" if per_token else "sum",
            compute_gradients=grads_now,
            weight_requires_grad=grads_now and needs[1],
            **options,
        )
        ctx.stash = None
        if per_token:
            ctx.options = options
            ctx.save_for_backward(e, c, bias, targets)
            return total
        scale = 1 / mean_divisor(targets, loss.ignore_index) if loss.reduction == "mean" else None
        if grads_now:
            grads = [g if need else None for g, need in zip((grad_e, grad_c, grad_bias), needs)]
            ctx.stash = ForwardGradients(grads, "liger", scale=scale)
        return total if scale is None else total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        if ctx.stash is not None:
            return (*ctx.stash.hand_out(ctx, grad_loss), None, None, None)
        from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

        e, c, bias, targets = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        *_, grad_e, grad_c, grad_bias = fused_linear_cross_entropy_forward(
            e,
            c,
            targets,
            bias=bias,
            reduction="none",
            token_grad_output=grad_loss,
            compute_gradients=True,
            weight_requires_grad=needs[1],
            **ctx.options,
        )
        grads = [g if need else None for g, need in zip((grad_e, grad_c, grad_bias), needs)]
        return (*grads, None, None, None)


class LigerLoss(OutputLoss):
    """Liger-Kernel's fused linear cross-entropy: gradients computed in the forward over chunks
    of about the hidden states' size (little memory); CUDA only. Every common option and the
    head's bias; the classifier's gradient is accumulated in its own dtype, as Liger does by default."""

    name = "liger"
    options = COMMON_OPTIONS
    facts = LossFacts(
        devices=frozenset({"cuda"}),
        forward_dtypes=_DTYPES,
        backward_dtypes=_DTYPES,
        bias=True,
        requires=liger_problem,
        kernels=fixed_kernels("liger", "Liger-Kernel's fused linear cross-entropy"),
        vocab_parallel=None,
        head_gemms=(3, 0),  # mean/sum: gradients in the forward ("none" recomputes: (1, 3))
        logit_bytes=(0, 0),
        rate_key="liger",
        workspace=_workspace,
    )

    def liger_options(self) -> dict[str, object]:
        """The options as Liger-Kernel names them."""
        return dict(
            ignore_index=self.ignore_index,
            lse_square_scale=self.z_loss_weight,
            label_smoothing=self.label_smoothing,
            softcap=self.logit_softcap or None,
        )

    def linear_loss(self, e: Tensor, c: Tensor, bias: Optional[Tensor], targets: Tensor) -> Tensor:
        return _LigerLinearCrossEntropy.apply(e, c, bias, targets, self, torch.is_grad_enabled())
