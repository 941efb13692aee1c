"""``chunked``: pure-PyTorch loss over token chunks, for the CPU and any GPU."""

from typing import Optional

from torch import Tensor, nn

from losses.base import OutputLoss
from losses.chunked_linear_cross_entropy import DEFAULT_CHUNK_SIZE, chunked_linear_cross_entropy
from losses.options import COMMON_OPTIONS


class ChunkedCrossEntropy(OutputLoss):
    """Never holds more than ``[chunk_size, V]`` logits; see ``chunked_linear_cross_entropy``."""

    name = "chunked"
    options = COMMON_OPTIONS | {"chunk_size", "compile"}

    def __init__(self, head: nn.Module, *, chunk_size: int = DEFAULT_CHUNK_SIZE, compile: bool = False, **common):
        super().__init__(head, **common)
        self.chunk_size = chunk_size
        self.compile_chunk_math = compile  # not "compile": that would hide nn.Module.compile()

    def linear_loss(self, e: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor) -> Tensor:
        return chunked_linear_cross_entropy(
            e,
            weight,
            targets,
            bias,
            chunk_size=self.chunk_size,
            ignore_index=self.ignore_index,
            softcap=self.logit_softcap,
            z_loss_weight=self.z_loss_weight,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            compile=self.compile_chunk_math,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}, compile={self.compile_chunk_math}"
