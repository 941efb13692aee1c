"""``chunked``: the loss over token chunks (``losses/kernels/chunked.py``), for the CPU and any GPU."""

from typing import Optional

from torch import Tensor, nn

from losses.base import OutputLoss
from losses.facts import LossFacts, LossSetting, LossShape, gradients_held
from losses.kernels.chunked import DEFAULT_CHUNK_SIZE, auto_chunk_size, chunked_kernels, chunked_linear_cross_entropy
from losses.options import COMMON_OPTIONS, DEFAULT_FILTER_EPS, filter_threshold


def _kernels(s: LossSetting) -> tuple[str, str]:
    return chunked_kernels(s.device_type, s.dtype, s.compile, s.gpu_kernels)


def _vocab_parallel(e, c, targets, bias, options, group, *, filter_eps, kernels, **loss_options) -> Tensor:
    """Its loss on this rank's rows of the classifier (the vocab-parallel head's backend), exact: the
    head takes no filter_eps, and the function's default is cut-cross-entropy's, meant for cce."""
    del filter_eps
    return chunked_linear_cross_entropy(
        e,
        c,
        targets,
        bias,
        vocab_start=options.start,
        group=group,
        reduce_e_grad=options.reduce_e_grad,
        kernels=kernels,
        **loss_options,
    )


def _workspace(s: LossShape) -> float:
    """One ``[chunk, rows]`` logits block in the GEMM's dtype (its CUDA kernels) beside the
    gradients; on the vocab-parallel head the hidden states' gradient is also accumulated in
    fp32 for its all-reduce."""
    chunk = min(s.chunk_size or auto_chunk_size(s.rows, s.act_bytes), s.tokens)
    fp32_e_grad = 4 * s.tokens * s.dim if s.vocab_parallel else 0
    return gradients_held(s, s.act_bytes * chunk * s.rows + fp32_e_grad)


class ChunkedCrossEntropy(OutputLoss):
    """Logits ``chunk_size`` tokens at a time, never more than one ``[chunk, V]`` block, gradients
    computed in the forward (no recomputation); on CUDA its Triton kernels
    (``losses/kernels/chunked_triton.py``) keep the block in the GEMM's dtype, elsewhere PyTorch ops.
    The fastest exact entry measured with bounded memory (docs/performance.md); runs anywhere.

    See ``chunked_linear_cross_entropy``. ``kernels`` is what ``losses/resolve.py`` chose at build
    time; None (a loss built directly) chooses for each call's tensors the same way.
    """

    name = "chunked"
    options = COMMON_OPTIONS | {"chunk_size", "compile", "filter_eps"}
    facts = LossFacts(
        devices=None,
        forward_dtypes=None,
        backward_dtypes=None,
        bias=True,
        requires=None,  # without triton it runs PyTorch ops
        kernels=_kernels,
        vocab_parallel=_vocab_parallel,
        head_gemms=(3, 0),  # the gradients are computed in the forward, while each chunk's logits are at hand
        logit_bytes=(0, 0),
        rate_key="chunked",
        workspace=_workspace,
    )

    def __init__(
        self,
        head: nn.Module,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compile: bool = False,
        filter_eps: float | str = DEFAULT_FILTER_EPS,
        **common,
    ):
        super().__init__(head, **common)
        self.chunk_size = chunk_size
        self.compile_chunk_math = compile  # not "compile": that would hide nn.Module.compile()
        self.filter_eps = filter_eps  # "default": exact

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
            filter_eps=filter_threshold(self.filter_eps, e.dtype),
        )

    def extra_repr(self) -> str:
        own = f"chunk_size={self.chunk_size}, kernels={self.kernels}, filter_eps={self.filter_eps!r}"
        return f"{super().extra_repr()}, {own}"
