"""``cce`` and ``cce_torch_compile``: Apple's cut-cross-entropy (the 25.1.1 release).

25.1.1 has no bias, z-loss or label smoothing; their facts and options say so and the
registry refuses those at config time. ``cut_cross_entropy`` is imported on first use
because importing it needs Triton.
"""

import functools
import importlib.util
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from losses.base import OutputLoss
from losses.facts import LossFacts, LossShape, fixed_kernels, gradients_held
from losses.functional import mean_divisor
from losses.kernels.cce_vocab_parallel import cce_kernels, vocab_parallel_cce
from losses.options import CCE_FILTER_EPS, DEFAULT_FILTER_EPS


@functools.cache
def cce_problem() -> Optional[str]:
    """Why cut-cross-entropy's kernels cannot be called here (missing, no Triton, another
    release than the one they are called as), or None."""
    try:
        cce_kernels()
    except ImportError as err:
        return str(err)
    return None


def _cut_cross_entropy_problem() -> Optional[str]:
    """Looked up, not imported: importing it (and Triton) takes seconds."""
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return "cut-cross-entropy is not installed: pip install cut-cross-entropy==25.1.1"
    return None


def _vocab_parallel(
    e, c, targets, bias, options, group, *, z_loss_weight, label_smoothing, kernels, vocab_size, **loss_options
):
    """Its loss on this rank's rows of the classifier (the vocab-parallel head's backend)."""
    del bias, z_loss_weight, label_smoothing, kernels, vocab_size  # none of them: refused by its facts
    return vocab_parallel_cce(
        e, c, targets, vocab_start=options.start, group=group, reduce_e_grad=options.reduce_e_grad, **loss_options
    )


def _cce_workspace(s: LossShape) -> float:
    """Only the gradients: its kernels write no logits."""
    return gradients_held(s, 0)


def _torch_compile_workspace(s: LossShape) -> float:
    """The compiled graph keeps its 16-bit logits for the backward."""
    return gradients_held(s, s.act_bytes * s.tokens * s.rows)


class CutCrossEntropy(OutputLoss):
    """Calls ``cut_cross_entropy.linear_cross_entropy`` with implementation ``impl``.

    Its "mean" is NaN on a batch whose targets are all ignored, so "mean" asks it for
    the sum and divides by the number of real targets here.
    """

    impl: ClassVar[str]
    options = frozenset({"ignore_index", "logit_softcap"})

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
    """Apple's cut-cross-entropy 25.1.1 Triton kernels: no logits in memory at all; CUDA only, its
    backward takes only bf16/fp16 hidden states. 1.7x ``chunked``'s time on random logits; its
    gradient filter (``filter_eps``) closes the gap once predictions are peaked."""

    name = "cce"
    impl = "cce"
    options = CutCrossEntropy.options | {"filter_eps"}
    facts = LossFacts(
        devices=frozenset({"cuda"}),
        forward_dtypes=None,
        backward_dtypes=(torch.bfloat16, torch.float16),
        bias=False,
        requires=cce_problem,
        kernels=fixed_kernels("cce", "cut-cross-entropy's Triton kernels"),
        vocab_parallel=_vocab_parallel,
        head_gemms=(1, 3),  # the backward recomputes the logits before the two gradient GEMMs
        logit_bytes=(0, 0),
        rate_key="cce",
        workspace=_cce_workspace,
    )

    def __init__(self, head: nn.Module, *, filter_eps: float | str | None = DEFAULT_FILTER_EPS, **common):
        super().__init__(head, **common)
        # 25.1.1 matches a threshold as float(); TOML may give an int such as 0.
        filter_eps = CCE_FILTER_EPS if filter_eps == "default" else filter_eps
        self.filter_eps = float(filter_eps) if isinstance(filter_eps, int) else filter_eps

    def linear_loss(self, e: Tensor, c: Tensor, bias: Optional[Tensor], targets: Tensor) -> Tensor:
        # 25.1.1 asserts this only in the backward, after a whole forward pass.
        needs_backward = torch.is_grad_enabled() and (e.requires_grad or c.requires_grad)
        if needs_backward and e.dtype not in self.facts.backward_dtypes:
            raise ValueError(
                f"'cce' backpropagates only bf16/fp16 hidden states, got {e.dtype}; "
                "train in bf16 (mixed precision) or use loss 'chunked'"
            )
        return super().linear_loss(e, c, bias, targets)

    def impl_options(self) -> dict[str, object]:
        return {"filter_eps": self.filter_eps}


class CCETorchCompileLoss(CutCrossEntropy):
    """cut-cross-entropy's ``torch.compile`` path: materializes the logits inside a compiled
    graph; runs on the CPU too."""

    name = "cce_torch_compile"
    impl = "torch_compile"
    facts = LossFacts(
        devices=None,
        forward_dtypes=None,
        backward_dtypes=None,
        bias=False,
        requires=_cut_cross_entropy_problem,
        kernels=fixed_kernels("torch_compile", "cut-cross-entropy's torch.compile path"),
        vocab_parallel=None,
        head_gemms=(1, 2),  # the compiled graph keeps its logits for the backward
        logit_bytes=(0, 0),
        rate_key="cce_torch_compile",
        workspace=_torch_compile_workspace,
    )
