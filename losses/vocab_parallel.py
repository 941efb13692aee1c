"""Linear cross-entropy with the classifier sharded along the vocabulary.

The API is upstream cut-cross-entropy's (GitHub main, not in the 25.1.1 release):
``VocabParallelOptions`` names this rank's rows of the classifier and the group
that holds the others; every rank passes the same hidden states and targets and
gets the same loss, the same hidden-state gradient (unless ``reduce_e_grad`` is
off) and the gradient of its own shard only.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from losses.functional import IGNORE_INDEX, shift_targets
from losses.options import CCE_FILTER_EPS
from losses.registry import ENTRIES
from losses.resolve import choose_loss


def vocab_shard_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank``: contiguous, in rank order, and the first
    ``vocab_size % world_size`` ranks get one extra row (upstream's split), e.g. 101
    rows over 4 ranks are 26, 25, 25, 25."""
    base, extra = divmod(vocab_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass
class VocabParallelOptions:
    """This rank's classifier rows ``[start, stop)`` and its vocab-parallel group.

    ``group=None`` means the default process group. ``reduce_e_grad=False`` leaves
    each rank's hidden-state gradient partial (its shard's contribution) for a caller
    that reduces it itself, e.g. with a reduce-scatter.
    """

    start: int
    stop: int
    group: Optional[dist.ProcessGroup] = None
    reduce_e_grad: bool = True

    @classmethod
    def from_vocab(
        cls, vocab_size: int, group: Optional[dist.ProcessGroup] = None, reduce_e_grad: bool = True
    ) -> "VocabParallelOptions":
        """Split ``vocab_size`` rows over ``group`` with ``vocab_shard_range``."""
        start, stop = vocab_shard_range(vocab_size, dist.get_rank(group), dist.get_world_size(group))
        return cls(start, stop, group, reduce_e_grad)


def _backend(
    impl: str, e: Tensor, c: Tensor, bias: Optional[Tensor], options: dict[str, float]
) -> tuple[Callable[..., Tensor], str]:
    """The entry's vocab-parallel function and its kernels for ``impl`` on these tensors with the
    loss ``options`` (z_loss_weight, label_smoothing, logit_softcap), as ``choose_loss`` decides
    (a ``ConfigError``, a ``ValueError``, for what ``impl`` cannot compute)."""
    choice = choose_loss(
        impl,
        options,
        device_type=e.device.type,
        dtype=e.dtype,
        vocab_parallel=True,
        needs_grad=torch.is_grad_enabled() and (e.requires_grad or c.requires_grad),
        bias=bias is not None,
    )
    return ENTRIES[choice.entry].facts.vocab_parallel, choice.kernels


def vocab_parallel_linear_cross_entropy(
    e: Tensor,
    c: Tensor,
    targets: Tensor,
    options: VocabParallelOptions,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    shift: bool | int = False,
    z_loss_weight: float = 0.0,
    label_smoothing: float = 0.0,
    impl: str = "auto",
    filter_eps: float | str | None = CCE_FILTER_EPS,
    vocab_size: Optional[int] = None,
) -> Tensor:
    """Cross-entropy of ``e [..., D]`` against ``targets [...]`` with the classifier sharded by rows.

    ``c`` is this rank's rows ``[options.start, options.stop)`` of the classifier and ``bias``
    (optional) the same slice of its bias. ``shift=k`` (``True`` = 1) scores ``e[..., t]``
    against ``targets[..., t + k]``; with reduction "none" the result then has
    ``S - k`` positions, as upstream. "mean" divides by the number of non-ignored
    targets and is 0 when there are none. ``options`` may also be the installed
    ``cut_cross_entropy``'s own ``VocabParallelOptions``, where it has one. ``impl``: the
    backend, an entry whose facts give a vocab-parallel function ("chunked", "cce"), or
    "auto" for what ``losses/resolve.py`` picks for these tensors. ``vocab_size``: the classifier's
    rows over all shards, which label smoothing needs; None all-reduces it on every call (a wait for
    the GPU).

    Gradients follow upstream CCE: a rank's upstream gradient weighs its own shard's part, so
    with different upstream gradients g_r the hidden states get sum_r g_r * (shard r's part).
    """
    options = _as_options(options)
    if c.shape[0] != options.stop - options.start:
        raise ValueError(f"c has {c.shape[0]} rows but options cover [{options.start}, {options.stop})")
    if e.shape[:-1] != targets.shape:
        raise ValueError(f"e {list(e.shape)} and targets {list(targets.shape)} disagree on the batch shape")
    shift = int(shift)
    if shift and not 0 < shift < targets.shape[-1]:
        raise ValueError(f"shift must be in [0, {targets.shape[-1]}), got {shift}")
    group = options.group
    if group is None and dist.is_initialized():
        group = dist.group.WORLD

    computed = dict(z_loss_weight=z_loss_weight, label_smoothing=label_smoothing, logit_softcap=softcap or 0.0)
    backend, kernels = _backend(impl, e, c, bias, computed)
    loss = backend(
        e.flatten(0, -2),
        c,
        shift_targets(targets, shift, ignore_index).flatten(),
        bias,
        options,
        group,
        ignore_index=ignore_index,
        softcap=softcap or 0.0,
        z_loss_weight=z_loss_weight,
        label_smoothing=label_smoothing,
        reduction=reduction,
        filter_eps=filter_eps,
        kernels=kernels,
        vocab_size=vocab_size,
    )
    if reduction != "none":
        return loss
    loss = loss.view(targets.shape)
    return loss[..., : targets.shape[-1] - shift] if shift else loss


def _as_options(options: object) -> VocabParallelOptions:
    """Accept ours, or cut_cross_entropy's own options type (converted by attributes)."""
    if isinstance(options, VocabParallelOptions):
        return options
    upstream = _upstream_options_type()
    if upstream is not None and isinstance(options, upstream):
        return VocabParallelOptions(options.start, options.stop, options.group, getattr(options, "reduce_e_grad", True))
    raise TypeError(f"options must be a VocabParallelOptions, got {type(options).__name__}")


def _upstream_options_type() -> Optional[type]:
    """cut_cross_entropy.VocabParallelOptions where the installed release has it (25.1.1 does not)."""
    try:
        import cut_cross_entropy
    except ImportError:  # not installed, or Triton missing
        return None
    return getattr(cut_cross_entropy, "VocabParallelOptions", None)
