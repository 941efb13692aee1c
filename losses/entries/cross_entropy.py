"""``cross_entropy``: materialized logits; the reference every other entry is compared with."""

from typing import Optional

from torch import Tensor
from torch.nn import functional as F

from losses.base import OutputLoss
from losses.facts import LossFacts, LossShape, fixed_kernels
from losses.functional import linear_logits, mean_divisor


def _workspace(s: LossShape) -> float:
    """12 bytes per logit at its peak (fp32 log-probabilities, their gradient and the logits'),
    or, later, the classifier's gradient beside the 16-bit logits' gradient and the hidden states'."""
    return max(12 * s.tokens * s.rows, s.classifier_grad + s.act_bytes * s.tokens * (s.rows + s.dim))


class MaterializedCrossEntropy(OutputLoss):
    """``F.cross_entropy`` on materialized fp32 ``[N, V]`` logits: the reference, and the memory cost
    this project avoids elsewhere. Use it to check the other entries or for small vocabularies."""

    name = "cross_entropy"
    facts = LossFacts(
        devices=None,
        forward_dtypes=None,
        backward_dtypes=None,
        bias=True,
        requires=None,
        kernels=fixed_kernels("torch", "materialized logits"),
        vocab_parallel=None,
        head_gemms=(1, 2),
        # Beyond the GEMMs, per logit. Forward: bf16 logits written (2), read and upcast to fp32
        # (2 + 4), log-softmax's two reads and one write (8 + 4). Backward: the dense fp32 gradient
        # of the log-probabilities (4), log-softmax's backward (read 4 + 4, write 4), the downcast
        # (read 4, write 2).
        logit_bytes=(20, 22),
        rate_key="head_matmul",  # its GEMMs run at the plain GEMM's rate
        workspace=_workspace,
    )

    def linear_loss(self, e: Tensor, c: Tensor, bias: Optional[Tensor], targets: Tensor) -> Tensor:
        logits = linear_logits(e, c, bias, self.logit_softcap)
        loss = F.cross_entropy(
            logits, targets, ignore_index=self.ignore_index, reduction="none", label_smoothing=self.label_smoothing
        )
        if self.z_loss_weight > 0:
            valid = targets != self.ignore_index
            loss = loss + self.z_loss_weight * logits.logsumexp(-1).square().where(valid, 0.0)
        if self.reduction == "none":
            return loss
        total = loss.sum()
        return total / mean_divisor(targets, self.ignore_index) if self.reduction == "mean" else total
