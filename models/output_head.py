"""The output projection, owned by the model but applied by the loss."""

from typing import Callable, Optional

import torch
from torch import Tensor, nn

# fn(hidden [..., D], weight [V, D], bias [V] | None) -> Tensor
HeadFn = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


class OutputHead(nn.Module):
    """Holds the classifier weight ``[vocab, dim]`` and lends it to a function.

    The model never multiplies by this weight itself: a stage that ends the model
    returns hidden states, and the loss calls ``head(hidden, fn)``. Going through
    ``nn.Module.__call__`` is what lets FSDP's hooks unshard the weight before
    ``fn`` sees it and reduce-scatter its gradient afterwards.
    """

    def __init__(self, dim: int, vocab_size: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        self.bias = nn.Parameter(torch.empty(vocab_size)) if bias else None

    def forward(self, hidden: Tensor, fn: HeadFn) -> Tensor:
        return fn(hidden, self.weight, self.bias)

    def logits(self, hidden: Tensor) -> Tensor:
        """Materialized logits, for inference and evaluation only."""
        return self(hidden, nn.functional.linear)
