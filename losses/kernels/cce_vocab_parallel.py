"""The CUDA backend of the vocab-parallel loss, on cut-cross-entropy 25.1.1's Triton kernels.

Each rank runs CCE's kernels on its own rows of the classifier; like CCE, no logits
are ever written to memory. The shards meet in three collectives:

- forward: the local log-sum-exp (``cce_lse_forward_kernel``) and the negated target
  logit from the shard that owns the target (``indexed_neg_dot_forward_kernel``, 0 on
  the others), both over the non-ignored tokens only; an all-reduce MAX of the local
  log-sum-exps, then one all-reduce SUM of ``[exp(local - max), -target logit]``,
  give the global log-sum-exp and target logit ([N]-sized, fp32);
- backward: ``cce_backward_kernel`` fed the global log-sum-exp and the targets as this
  shard's columns (-1, which no column matches, where another shard owns the target)
  computes exactly this shard's part of ``softmax - onehot``: the whole gradient of
  its rows and a partial gradient of the hidden states, which one all-reduce SUM
  ([N, D], in the hidden states' dtype) completes unless ``reduce_e_grad`` is off.

On one rank the loss is CCE's (equal to fp32 rounding), and so are the gradients: the
kernel accumulates the hidden-state gradient in bf16/fp16 over blocks of 128 vocabulary rows,
2-5% of its largest entry off a float64 reference on random data (the chunked backend,
accumulating in fp32: under 1%).

25.1.1's kernels take no bias, z-loss or label smoothing, and its backward takes only
bf16/fp16 hidden states: the ``cce`` entry's facts (``losses/entries/cce.py``) say so, and
``losses/resolve.py`` names what a call needs that they lack. The kernels are called by
position, so ``cce_kernels`` checks once that the installed release's take 25.1.1's
arguments. With a softcap, CCE's forward (upstream main's too) counts the padding columns of each shard's
last vocabulary block as logits of ``-softcap``: ``exp(-softcap)`` each, at most
BLOCK_V - 1 (127) per shard, so negligible for caps above ~15 (Gemma's is 30).
``cut_cross_entropy`` (which needs Triton) is imported on first use, so this module
imports anywhere.
"""

import functools
import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from losses.functional import IGNORE_INDEX, REDUCTIONS
from losses.options import CCE_FILTER_EPS

SUPPORTED_VERSION = "25.1.1"
# What each 25.1.1 kernel this module calls takes, in order: later releases reordered and renamed them.
_SIGNATURES = {
    ("cce_lse_forward", "cce_lse_forward_kernel"): ("e", "c", "valids", "softcap", "return_logit_avg"),
    ("indexed_dot", "indexed_neg_dot_forward_kernel"): ("e", "c", "inds", "shift", "valids", "softcap", "out_dtype"),
    ("cce_backward", "cce_backward_kernel"): (
        "do",
        "e",
        "c",
        "lse",
        "valids",
        "softcap",
        "filter_eps",
        "targets",
        "shift",
        "vocab_ordering",
        "grad_scale",
    ),
    ("utils", "_build_flat_valids"): ("targets", "ignore_index", "shift"),
    ("utils", "handle_reduction_none"): ("batch_shape", "valids", "shift", "loss"),
    ("utils", "_handle_eps"): ("filter_eps", "dtype"),
    ("cce", "sort_logit_avg"): ("logit_avg",),
}


@functools.cache
def cce_kernels() -> SimpleNamespace:
    """cut-cross-entropy's kernels by name, checked once against 25.1.1's signatures.

    Raises ``ImportError`` (one line, naming the supported release) where the package is
    missing, needs a Triton that is not there, or is a release whose kernels take other
    arguments: calling those by position would compute something else silently.
    """
    try:
        version = importlib.metadata.version("cut-cross-entropy")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"cut-cross-entropy is not installed: pip install cut-cross-entropy=={SUPPORTED_VERSION}"
        ) from None
    kernels = {}
    for (module, name), params in _SIGNATURES.items():
        try:
            fn = getattr(importlib.import_module(f"cut_cross_entropy.{module}"), name)
        except (ImportError, AttributeError) as err:
            raise ImportError(
                f"cut-cross-entropy {version}'s {module}.{name} cannot be loaded ({err}); headroom "
                f"calls {SUPPORTED_VERSION}'s kernels: pip install cut-cross-entropy=={SUPPORTED_VERSION}"
            ) from None
        if tuple(inspect.signature(fn).parameters) != params:
            raise ImportError(
                f"cut-cross-entropy {version} is installed, whose {name} takes other arguments than "
                f"{SUPPORTED_VERSION}'s, which headroom calls: pip install "
                f"cut-cross-entropy=={SUPPORTED_VERSION}"
            )
        kernels[name] = fn
    return SimpleNamespace(**kernels)


@dataclass(frozen=True)
class _Params:
    vocab_start: int
    group: Optional[dist.ProcessGroup]
    reduce_e_grad: bool
    ignore_index: int
    softcap: Optional[float]
    reduction: str
    filter_eps: Optional[float]  # None: exact gradients
    sort_vocab: bool  # filtering visits the columns by average logit, as CCE does


def _all_reduce(tensor: Tensor, op: dist.ReduceOp, group: Optional[dist.ProcessGroup]) -> None:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)


def _reduce_over_shards(local_lse: Tensor, neg_target_logit: Tensor, group) -> tuple[Tensor, Tensor]:
    """Global (log-sum-exp, negated target logit) from each shard's; stable for any spread
    of the local log-sum-exps (a shard with no rows has -inf and adds 0)."""
    lse_max = local_lse.clone()
    _all_reduce(lse_max, dist.ReduceOp.MAX, group)
    sums = torch.stack([(local_lse - lse_max).exp(), neg_target_logit])
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    return lse_max + sums[0].log(), sums[1]


class _VocabParallelCCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e: Tensor, c: Tensor, targets: Tensor, p: _Params) -> Tensor:
        k = cce_kernels()
        valids = k._build_flat_valids(targets, p.ignore_index, False)  # int32 rows; None if all count
        n_valid = targets.numel() if valids is None else valids.numel()
        col = targets - p.vocab_start
        owned = (col >= 0) & (col < c.shape[0])

        local = k.cce_lse_forward_kernel(e, c, valids, p.softcap, return_logit_avg=p.sort_vocab)
        local_lse, logit_avg = local if p.sort_vocab else (local, None)
        neg_target = k.indexed_neg_dot_forward_kernel(
            e, c, col.where(owned, 0), False, valids, p.softcap, torch.float32
        )
        neg_target = neg_target.where(owned if valids is None else owned[valids], 0.0)
        lse, neg_target = _reduce_over_shards(local_lse, neg_target, p.group)
        nll = lse + neg_target

        ctx.p = p
        ctx.grad_scale = 1 / max(n_valid, 1) if p.reduction == "mean" else 1.0
        ctx.save_for_backward(e, c, lse, col.where(owned, -1), valids, logit_avg)
        if p.reduction == "none":
            return k.handle_reduction_none(targets.shape, valids, False, nll)
        return nll.sum() * ctx.grad_scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        k = cce_kernels()
        p: _Params = ctx.p
        e, c, lse, local_targets, valids, logit_avg = ctx.saved_tensors
        grad_e, grad_c = k.cce_backward_kernel(
            grad_loss,
            e,
            c.detach().requires_grad_(ctx.needs_input_grad[1]),  # the kernel skips dc unless set
            lse,
            valids,
            p.softcap,
            p.filter_eps,
            targets=local_targets,
            vocab_ordering=None if logit_avg is None else k.sort_logit_avg(logit_avg),
            grad_scale=ctx.grad_scale,
        )
        if not ctx.needs_input_grad[0]:
            grad_e = None
        elif p.reduce_e_grad:
            _all_reduce(grad_e, dist.ReduceOp.SUM, p.group)
        return grad_e, grad_c, None, None


def vocab_parallel_cce(
    e: Tensor,
    c: Tensor,
    targets: Tensor,
    *,
    vocab_start: int = 0,
    group: Optional[dist.ProcessGroup] = None,
    reduce_e_grad: bool = True,
    ignore_index: int = IGNORE_INDEX,
    softcap: float = 0.0,
    reduction: str = "mean",
    filter_eps: float | str | None = CCE_FILTER_EPS,
) -> Tensor:
    """Cross-entropy of ``e [N, D]`` against ``targets [N]`` with a classifier sharded by rows:
    ``c`` is rows ``[vocab_start, vocab_start + V_local)`` of it, the others are on ``group``'s
    other ranks (``group=None``: ``c`` is the whole classifier).

    Same contract as ``chunked_linear_cross_entropy`` with a group (same loss on every
    rank, fp32; "mean" is 0 when every target is ignored), minus what the ``cce`` entry's
    facts exclude. ``filter_eps`` is CCE's: backward skips the blocks of logits whose gradients
    are all below it ("high"/"auto": bf16/fp16 eps / 32); None computes them all.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    # CCE matches a threshold as float(); a config may give an int such as 0.
    eps = cce_kernels()._handle_eps(float(filter_eps) if isinstance(filter_eps, int) else filter_eps, e.dtype)
    needs_grad = torch.is_grad_enabled() and (e.requires_grad or c.requires_grad)
    params = _Params(
        vocab_start=vocab_start,
        group=group,
        reduce_e_grad=reduce_e_grad,
        ignore_index=ignore_index,
        softcap=softcap or None,
        reduction=reduction,
        filter_eps=eps,
        sort_vocab=needs_grad and eps is not None,
    )
    return _VocabParallelCCE.apply(e.contiguous(), c, targets, params)
