"""``cross_entropy``: materialized logits; the reference every other entry is compared with."""

from typing import Optional

from torch import Tensor
from torch.nn import functional as F

from losses.base import OutputLoss
from losses.functional import linear_logits, mean_divisor


class MaterializedCrossEntropy(OutputLoss):
    """``F.cross_entropy`` on fp32 ``[N, V]`` logits: simple, and the memory cost this
    project avoids elsewhere. Use it to check the other entries or for small vocabularies."""

    name = "cross_entropy"

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
