"""Linear + cross-entropy over token chunks, with the vocabulary optionally sharded.

One implementation serves two callers: the ``chunked`` loss entry (``group=None``,
the whole classifier on this rank) and the vocab-parallel CPU backend (each rank
of ``group`` holds rows ``[vocab_start, vocab_start + V_local)`` of the classifier
and the same hidden states and targets). The largest temporary is a
``[chunk_size, V_local]`` block of logits; nothing ``[N, V]`` is ever allocated.

Per token chunk, the vocab-parallel case adds two small collectives: an all-reduce
MAX of the ``[chunk]`` row maxima, then one all-reduce SUM of a ``[2 or 3, chunk]``
stack (sum of exponentials, the target logit from the rank that owns the target
and zeros elsewhere, and the sum of logits when label smoothing needs it).
"""

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from losses.functional import IGNORE_INDEX, REDUCTIONS, linear_logits, mean_divisor

# 1024 tokens per chunk: the GEMM is [1024, D] x [D, V], large enough to keep a GPU
# busy, while the per-chunk temporaries (fp32 logits, their gradient and its
# low-precision copy, about 10 bytes per entry) stay near 1.5 GB for Qwen3's
# 151,936-token vocabulary. 4096 would be the whole sequence of a typical
# microbatch, i.e. the materialized logits this loss exists to avoid.
DEFAULT_CHUNK_SIZE = 1024


def _chunk_partial_sums(
    logits: Tensor, row_max: Tensor, target_col: Tensor, owned: Tensor, with_logit_sum: bool
) -> Tensor:
    """This shard's contributions to the per-token sums, stacked to share one all-reduce.

    Rows: sum of ``exp(logit - row_max)``, the target logit (0 where another shard
    owns the target) and, for label smoothing, the sum of the logits.
    """
    parts = [
        (logits - row_max[:, None]).exp_().sum(-1),
        logits.gather(1, target_col[:, None]).squeeze(1).where(owned, 0.0),
    ]
    if with_logit_sum:
        parts.append(logits.sum(-1))
    return torch.stack(parts)


def _chunk_token_loss(
    lse: Tensor,
    target_logit: Tensor,
    logit_sum: Optional[Tensor],
    valid: Tensor,
    vocab_size: int,
    z_loss_weight: float,
    label_smoothing: float,
) -> Tensor:
    """``(1-eps)(lse - z_y) + eps(lse - mean_v z_v) + w_z lse^2`` per token, 0 where ignored."""
    loss = lse - target_logit
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - logit_sum / vocab_size)
    if z_loss_weight > 0:
        loss = loss + z_loss_weight * lse.square()
    return loss.where(valid, 0.0)


def _chunk_logit_grad(
    logits: Tensor,
    lse: Tensor,
    target_col: Tensor,
    owned: Tensor,
    token_weight: Tensor,
    vocab_size: int,
    softcap: float,
    z_loss_weight: float,
    label_smoothing: float,
) -> Tensor:
    """d(token_weight . loss)/d(pre-softcap logits) for this shard's columns.

    ``softmax * (1 + 2 w_z lse) - (1-eps) onehot(y) - eps/V``, scaled per token;
    ``token_weight`` is 0 on ignored tokens. The softcap's derivative is
    ``1 - (z/cap)^2`` in terms of the capped logits ``z``.
    """
    grad = (logits - lse[:, None]).exp_()  # in place from here: one [chunk, V] buffer
    if z_loss_weight > 0:
        grad.mul_((1 + 2 * z_loss_weight * lse)[:, None])
    if label_smoothing > 0:
        grad.sub_(label_smoothing / vocab_size)
    target_step = (label_smoothing - 1) * owned.to(grad.dtype)
    grad.scatter_add_(1, target_col[:, None], target_step[:, None])
    grad.mul_(token_weight[:, None])
    if softcap > 0:
        grad.mul_(1 - (logits / softcap).square())
    return grad


class _ChunkOps(NamedTuple):
    logits: Callable[..., Tensor]
    partial_sums: Callable[..., Tensor]
    token_loss: Callable[..., Tensor]
    logit_grad: Callable[..., Tensor]


@functools.cache
def _chunk_ops(compiled: bool) -> _ChunkOps:
    """The per-chunk math, eager or through ``torch.compile`` (which fuses the
    elementwise passes over each ``[chunk, V]`` block). Collectives stay outside."""
    ops = _ChunkOps(linear_logits, _chunk_partial_sums, _chunk_token_loss, _chunk_logit_grad)
    if compiled:
        ops = _ChunkOps(*(torch.compile(fn) for fn in ops))
    return ops


@dataclass(frozen=True)
class _Params:
    vocab_start: int
    vocab_size: Optional[int]  # global; only label smoothing needs it
    group: Optional[dist.ProcessGroup]
    reduce_e_grad: bool
    chunk_size: int
    ignore_index: int
    softcap: float
    z_loss_weight: float
    label_smoothing: float
    reduction: str
    grad_enabled: bool
    ops: _ChunkOps


def _all_reduce(tensor: Tensor, op: dist.ReduceOp, group: Optional[dist.ProcessGroup]) -> None:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)


def _local_targets(targets: Tensor, vocab_start: int, local_vocab: int, ignore_index: int):
    """(column of the target in this shard (0 if not here), owned by this shard, not ignored)."""
    valid = targets != ignore_index
    col = targets - vocab_start
    owned = valid & (col >= 0) & (col < local_vocab)
    return col.where(owned, 0), owned, valid


class _Grads:
    """Gradient buffers filled chunk by chunk; None where no gradient is wanted.

    ``e`` is accumulated in at least fp32 (it may still be all-reduced across the
    vocab group); ``w`` in the classifier's dtype with one fused ``addmm_`` per chunk,
    rounding once per chunk (an fp32 buffer would be twice the weight's size, plus a
    cast copy per chunk); ``bias`` in fp32.
    """

    def __init__(self, e: Tensor, w: Tensor, bias: Optional[Tensor], needs: tuple[bool, ...]):
        acc = torch.promote_types(e.dtype, torch.float32)
        self.e = torch.zeros(e.shape, dtype=acc, device=e.device) if needs[0] else None
        self.w = torch.zeros_like(w) if needs[1] else None
        self.bias = (
            torch.zeros(w.shape[0], dtype=torch.promote_types(bias.dtype, torch.float32), device=w.device)
            if bias is not None and needs[2]
            else None
        )

    def add_chunk(self, rows: slice, logit_grad: Tensor, e_chunk: Tensor, w: Tensor) -> None:
        low = logit_grad.to(w.dtype)
        if self.e is not None:
            self.e[rows] = low @ w
        if self.w is not None:
            self.w.addmm_(low.T, e_chunk)
        if self.bias is not None:
            self.bias += logit_grad.sum(0)

    def finish(self, e: Tensor, bias: Optional[Tensor], p: _Params):
        """Reduce the hidden-state gradient over the vocab group and cast to input dtypes."""
        grad_e = self.e
        if grad_e is not None:
            if p.reduce_e_grad:
                _all_reduce(grad_e, dist.ReduceOp.SUM, p.group)
            grad_e = grad_e.to(e.dtype)
        grad_bias = None if self.bias is None else self.bias.to(bias.dtype)
        return grad_e, self.w, grad_bias


def _backprop_chunk(grads, rows, e_chunk, w, logits, lse, col, owned, token_weight, p):
    logit_grad = p.ops.logit_grad(
        logits, lse, col, owned, token_weight,
        p.vocab_size, p.softcap, p.z_loss_weight, p.label_smoothing,
    )  # fmt: skip
    grads.add_chunk(rows, logit_grad, e_chunk, w)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """With reduction mean/sum the gradients are computed in the forward, while each
    chunk's logits are at hand, and the backward only scales them by grad_output: no
    second pass over the vocabulary. With reduction "none" the per-token grad_output
    is unknown in the forward, so the backward recomputes each chunk's logits from
    the saved log-sum-exp (no collectives needed but the e-gradient reduction)."""

    @staticmethod
    def forward(ctx, e: Tensor, w: Tensor, bias: Optional[Tensor], targets: Tensor, p: _Params):
        n = e.shape[0]
        needs = ctx.needs_input_grad[:3]
        grads_now = p.grad_enabled and any(needs) and p.reduction != "none"
        grads = _Grads(e, w, bias, needs) if grads_now else None
        acc = torch.promote_types(e.dtype, torch.float32)
        scale = 1 / mean_divisor(targets, p.ignore_index).to(acc) if p.reduction == "mean" else 1.0

        token_loss = torch.empty(n, dtype=acc, device=e.device)
        lse = torch.empty(n, dtype=acc, device=e.device)
        for start in range(0, n, p.chunk_size):
            rows = slice(start, start + p.chunk_size)
            e_chunk, t_chunk = e[rows], targets[rows]
            logits = p.ops.logits(e_chunk, w, bias, p.softcap)
            row_max = logits.amax(-1)
            _all_reduce(row_max, dist.ReduceOp.MAX, p.group)
            col, owned, valid = _local_targets(t_chunk, p.vocab_start, w.shape[0], p.ignore_index)
            sums = p.ops.partial_sums(logits, row_max, col, owned, p.label_smoothing > 0)
            _all_reduce(sums, dist.ReduceOp.SUM, p.group)
            lse_chunk = row_max + sums[0].log()
            logit_sum = sums[2] if p.label_smoothing > 0 else None
            token_loss[rows] = p.ops.token_loss(
                lse_chunk, sums[1], logit_sum, valid, p.vocab_size, p.z_loss_weight, p.label_smoothing
            )
            lse[rows] = lse_chunk
            if grads_now:
                weight = valid.to(logits.dtype) * scale
                _backprop_chunk(grads, rows, e_chunk, w, logits, lse_chunk, col, owned, weight, p)

        ctx.p = p
        ctx.stashed = grads_now
        ctx.applied_scale = None
        if grads_now:
            # Kept as an attribute, not saved tensors: they are new tensors (no cycle), and
            # scaling them in place must not trip autograd's version check on a second backward.
            ctx.stash = grads.finish(e, bias, p)
        elif p.reduction == "none":
            ctx.save_for_backward(e, w, bias, targets, lse)
        if p.reduction == "none":
            return token_loss
        return token_loss.sum() * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        p: _Params = ctx.p
        if ctx.stashed:
            # Zero-bubble pipeline schedules run backward twice over one graph (input
            # grads, then weight grads) with the same upstream gradient: the stash,
            # scaled in place by the first call, is already the answer for the second.
            if ctx.applied_scale is None:
                ctx.applied_scale = grad_loss.detach().clone()
                for g in ctx.stash:
                    if g is not None:
                        g.mul_(grad_loss.to(g.dtype))
            elif not torch.equal(grad_loss, ctx.applied_scale):
                raise RuntimeError("the chunked loss was backpropagated twice with different upstream gradients")
            return (*ctx.stash, None, None)

        e, w, bias, targets, lse = ctx.saved_tensors
        grads = _Grads(e, w, bias, ctx.needs_input_grad[:3])
        for start in range(0, e.shape[0], p.chunk_size):
            rows = slice(start, start + p.chunk_size)
            logits = p.ops.logits(e[rows], w, bias, p.softcap)
            col, owned, valid = _local_targets(targets[rows], p.vocab_start, w.shape[0], p.ignore_index)
            weight = grad_loss[rows].to(logits.dtype) * valid
            _backprop_chunk(grads, rows, e[rows], w, logits, lse[rows], col, owned, weight, p)
        return (*grads.finish(e, bias, p), None, None)


def chunked_linear_cross_entropy(
    e: Tensor,
    w: Tensor,
    targets: Tensor,
    bias: Optional[Tensor] = None,
    *,
    vocab_start: int = 0,
    vocab_size: Optional[int] = None,
    group: Optional[dist.ProcessGroup] = None,
    reduce_e_grad: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = IGNORE_INDEX,
    softcap: float = 0.0,
    z_loss_weight: float = 0.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    compile: bool = False,
) -> Tensor:
    """Cross-entropy of ``e [N, D] @ w.T`` against ``targets [N]``, ``chunk_size`` tokens at a time.

    ``group=None``: ``w`` is the whole classifier ``[V, D]``. With a group: ``w`` is
    this rank's rows ``[vocab_start, vocab_start + V_local)`` of a ``vocab_size``-row
    classifier (only label smoothing needs ``vocab_size``; it is all-reduced when not
    given) and ``bias`` the same slice of its bias. Every rank passes the same ``e``
    and ``targets`` and gets the same loss. The gradient of ``e`` is all-reduced over
    the group when ``reduce_e_grad``, else left partial for the caller to reduce
    (e.g. reduce-scatter); each rank gets only its shard's classifier (and bias)
    gradient. ``compile`` runs the per-chunk math through ``torch.compile``.

    Returns a scalar for "mean"/"sum" and ``[N]`` for "none", in fp32 (fp64 for fp64
    inputs). "mean" divides by the number of non-ignored targets, and is 0 with zero
    gradients when there are none. With "mean"/"sum" the result can be backpropagated
    once (its stashed gradients are scaled in place).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if e.dim() != 2 or w.dim() != 2 or e.shape[1] != w.shape[1] or targets.shape != e.shape[:1]:
        raise ValueError(f"expected e [N, D], w [V, D], targets [N]; got {e.shape}, {w.shape}, {targets.shape}")
    if e.dtype != w.dtype:
        raise ValueError(f"e and w must share a dtype, got {e.dtype} and {w.dtype}")
    if bias is not None and bias.shape != w.shape[:1]:
        raise ValueError(f"bias must be [{w.shape[0]}], got {list(bias.shape)}")
    if vocab_size is None and label_smoothing > 0:
        vocab_size = _global_vocab_size(w, group)
    params = _Params(
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        group=group,
        reduce_e_grad=reduce_e_grad,
        chunk_size=chunk_size,
        ignore_index=ignore_index,
        softcap=float(softcap),
        z_loss_weight=float(z_loss_weight),
        label_smoothing=float(label_smoothing),
        reduction=reduction,
        grad_enabled=torch.is_grad_enabled(),
        ops=_chunk_ops(compile),
    )
    return _ChunkedLinearCrossEntropy.apply(e, w, bias, targets.long(), params)


def _global_vocab_size(w: Tensor, group: Optional[dist.ProcessGroup]) -> int:
    if group is None:
        return w.shape[0]
    size = torch.tensor([w.shape[0]], device=w.device)
    dist.all_reduce(size, group=group)
    return int(size.item())
