"""``cce`` and ``cce_torch_compile``: Apple's cut-cross-entropy (the 25.1.1 release).

25.1.1 has no bias, z-loss or label smoothing; the registry rejects those at config
time. ``cut_cross_entropy`` is imported on first use because importing it needs Triton.
"""

from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from config.errors import ConfigError
from losses.base import OutputLoss
from losses.functional import mean_divisor
from losses.options import DEFAULT_FILTER_EPS
from losses.resolve import cce_problem


class CutCrossEntropy(OutputLoss):
    """Calls ``cut_cross_entropy.linear_cross_entropy`` with implementation ``impl``.

    Its "mean" is NaN on a batch whose targets are all ignored, so "mean" asks it for
    the sum and divides by the number of real targets here.
    """

    impl: ClassVar[str]
    options = frozenset({"ignore_index", "logit_softcap"})

    def __init__(self, head: nn.Module, **common):
        super().__init__(head, **common)
        if getattr(head, "bias", None) is not None:
            raise ConfigError(
                "loss.name", f"{self.name!r} cannot apply the output head's bias; use 'chunked' or 'cross_entropy'"
            )

    def linear_loss(self, e: Tensor, c: Tensor, bias: Optional[Tensor], targets: Tensor) -> Tensor:
        from cut_cross_entropy import linear_cross_entropy

        loss = linear_cross_entropy(
            e,
            c,
            targets,
            ignore_index=self.ignore_index,
            softcap=self.logit_softcap or None,
            reduction="none" if self.reduction == "none" else "sum",
            impl=self.impl,
            **self.impl_options(),
        )
        return loss / mean_divisor(targets, self.ignore_index) if self.reduction == "mean" else loss

    def impl_options(self) -> dict[str, object]:
        """Keyword arguments only this ``impl`` takes."""
        return {}


class CCELoss(CutCrossEntropy):
    """The Triton kernels: the least memory and usually the fastest; CUDA only, and
    its backward takes only bf16/fp16 hidden states."""

    name = "cce"
    impl = "cce"
    needs_cuda = True
    options = CutCrossEntropy.options | {"filter_eps"}

    def __init__(self, head: nn.Module, *, filter_eps: float | str | None = DEFAULT_FILTER_EPS, **common):
        super().__init__(head, **common)
        problem = cce_problem()
        if problem is not None:
            raise ConfigError("loss.name", f"'cce': {problem}")
        # 25.1.1 matches a threshold as float(); TOML may give an int such as 0.
        self.filter_eps = float(filter_eps) if isinstance(filter_eps, int) else filter_eps

    def linear_loss(self, e: Tensor, c: Tensor, bias: Optional[Tensor], targets: Tensor) -> Tensor:
        # 25.1.1 asserts this only in the backward, after a whole forward pass.
        needs_backward = torch.is_grad_enabled() and (e.requires_grad or c.requires_grad)
        if needs_backward and e.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"'cce' backpropagates only bf16/fp16 hidden states, got {e.dtype}; "
                "train in bf16 (mixed precision) or use loss 'chunked'"
            )
        return super().linear_loss(e, c, bias, targets)

    def impl_options(self) -> dict[str, object]:
        return {"filter_eps": self.filter_eps}


class CCETorchCompileLoss(CutCrossEntropy):
    """cut-cross-entropy's ``torch.compile`` path: materializes logits inside a compiled
    graph; runs on the CPU too."""

    name = "cce_torch_compile"
    impl = "torch_compile"
