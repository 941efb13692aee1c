"""``chunked``: the loss over token chunks (``losses/kernels/chunked.py``), for the CPU and any GPU."""

from typing import Optional

from torch import Tensor, nn

from losses.base import OutputLoss
from losses.kernels.chunked import DEFAULT_CHUNK_SIZE, chunked_linear_cross_entropy
from losses.options import COMMON_OPTIONS
from losses.resolve import chunked_kernels


class ChunkedCrossEntropy(OutputLoss):
    """Never holds more than ``[chunk_size, V]`` logits; see ``chunked_linear_cross_entropy``.

    ``kernels`` is what ``losses/resolve.py`` chose at build time; None (a loss built
    directly) chooses for each call's tensors the same way.
    """

    name = "chunked"
    options = COMMON_OPTIONS | {"chunk_size", "compile"}

    def __init__(
        self,
        head: nn.Module,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compile: bool = False,
        kernels: Optional[str] = None,
        **common,
    ):
        super().__init__(head, **common)
        self.chunk_size = chunk_size
        self.compile_chunk_math = compile  # not "compile": that would hide nn.Module.compile()
        self.kernels = kernels

    def linear_loss(self, e: Tensor, c: Tensor, bias: Optional[Tensor], targets: Tensor) -> Tensor:
        kernels = self.kernels or chunked_kernels(e.device.type, e.dtype, self.compile_chunk_math)[0]
        return chunked_linear_cross_entropy(
            e,
            c,
            targets,
            bias,
            chunk_size=self.chunk_size,
            ignore_index=self.ignore_index,
            softcap=self.logit_softcap,
            z_loss_weight=self.z_loss_weight,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            kernels=kernels,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}, kernels={self.kernels}"
