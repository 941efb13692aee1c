"""The contract between the model's last stage and the loss that applies its head."""

import functools
from typing import ClassVar, Optional

from torch import Tensor, nn

from losses.facts import LossFacts
from losses.functional import IGNORE_INDEX, REDUCTIONS, linear_logits, shift_targets
from losses.options import COMMON_OPTIONS, OPTIONS


class OutputLoss(nn.Module):
    """Next-token loss on final hidden states ``[B, S, D]`` that applies the output head.

    The model returns hidden states; this module turns them into a loss without
    (for most entries) materializing ``[tokens, vocab]`` logits. The classifier is
    only ever reached through ``head(hidden, fn)`` so that FSDP's hooks on the head
    unshard its weight for ``fn`` and reduce-scatter the gradient afterwards.

    A registry entry sets ``name`` (the recipe's ``[loss] name``), ``options`` (the option
    names it honours, see ``losses.options``) and ``facts`` (``losses/facts.py``: where it
    runs, what it cannot compute, what it costs), takes its own options as keyword
    arguments and implements ``linear_loss``.
    """

    name: ClassVar[str]
    options: ClassVar[frozenset[str]] = COMMON_OPTIONS
    facts: ClassVar[LossFacts]

    def __init__(
        self,
        head: nn.Module,
        *,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        z_loss_weight: float = 0.0,
        label_smoothing: float = 0.0,
        logit_softcap: float = 0.0,
        kernels: Optional[str] = None,
    ):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        given = dict(z_loss_weight=z_loss_weight, label_smoothing=label_smoothing, logit_softcap=logit_softcap)
        for key, value in given.items():
            if key not in self.options and value != OPTIONS[key].default:
                raise ValueError(f"{self.name!r} cannot {OPTIONS[key].capability} ({key}={value!r})")
        facts = getattr(self, "facts", None)
        if facts is not None and not facts.bias and getattr(head, "bias", None) is not None:
            raise ValueError(f"{self.name!r} cannot apply the output head's bias")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.z_loss_weight = z_loss_weight
        self.label_smoothing = label_smoothing
        self.logit_softcap = logit_softcap
        self.kernels = kernels  # what losses/resolve.py chose, for entries with a choice (None: choose per call)
        # A plain attribute, not a submodule: the model owns the head's parameters,
        # so they must not show up (twice) in this module's parameters or state dict.
        object.__setattr__(self, "head", head)

    def forward(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """Loss of predicting ``labels[:, t+1]`` from ``hidden[:, t]``.

        Returns a scalar for "mean"/"sum", ``[B, S]`` for "none" (0 where ignored and
        at the last position, which has no next token).
        """
        targets = shift_targets(labels, 1, self.ignore_index)
        return self.head(hidden, functools.partial(self._apply_head, targets=targets))

    def forward_logits(self, hidden: Tensor) -> Tensor:
        """Materialized fp32 logits ``[..., V]`` (softcap applied), for evaluation and generation."""
        return self.head(hidden, functools.partial(linear_logits, softcap=self.logit_softcap))

    def _apply_head(self, hidden: Tensor, c: Tensor, bias: Optional[Tensor], *, targets: Tensor) -> Tensor:
        loss = self.linear_loss(hidden.flatten(0, -2), c, bias, targets.flatten())
        return loss.view(targets.shape) if self.reduction == "none" else loss

    def linear_loss(self, e: Tensor, c: Tensor, bias: Optional[Tensor], targets: Tensor) -> Tensor:
        """Loss of ``e [N, D]`` against ``targets [N]`` (already shifted) with classifier ``c [V, D]``, reduced by
        ``self.reduction`` ("none": ``[N]``, 0 where ignored; "mean": 0 if all ignored)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        keys = ("reduction", "ignore_index", "z_loss_weight", "label_smoothing", "logit_softcap")
        return ", ".join(f"{key}={getattr(self, key)!r}" for key in keys)
