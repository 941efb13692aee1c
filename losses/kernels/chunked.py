"""Linear + cross-entropy over token chunks, with the vocabulary optionally sharded.

One implementation serves two callers: the ``chunked`` loss entry (``group=None``,
the whole classifier on this rank) and the vocab-parallel CPU backend (each rank
of ``group`` holds rows ``[vocab_start, vocab_start + V_local)`` of the classifier
and the same hidden states and targets). The largest temporary is a
``[chunk_size, V_local]`` block of logits; nothing ``[N, V]`` is ever allocated.

Per token chunk, the vocab-parallel case adds two small collectives: an all-reduce
MAX of the ``[chunk]`` row maxima (each shard's exponential sum is rescaled to the
global maximum), then one all-reduce SUM of a ``[2 or 3, chunk]`` stack (sum of
exponentials, the target logit from the rank that owns the target and zeros
elsewhere, and the sum of logits when label smoothing needs it).
"""

import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from losses.functional import IGNORE_INDEX, REDUCTIONS, linear_logits, mean_divisor
from losses.kernels.forward_grads import ForwardGradients

# chunk_size 0 sizes the chunk by memory: the largest multiple of 128 tokens whose
# [chunk, V_local] logits block fits in 256 MiB (768 tokens for Qwen3's 151,936-entry
# vocabulary in bf16, 1,024 for Llama 3's). Longer chunks run the GEMMs a little
# closer to peak (docs/performance.md has the sweep); a chunk as long as the
# microbatch is the materialized logits this loss exists to avoid.
DEFAULT_CHUNK_SIZE = 0
LOGITS_BLOCK_BYTES = 256 * 2**20


def auto_chunk_size(local_vocab: int, bytes_per_logit: int) -> int:
    """Tokens per chunk for ``chunk_size=0``: a 256 MiB logits block, at least 128 tokens."""
    return max(128, LOGITS_BLOCK_BYTES // (local_vocab * bytes_per_logit) // 128 * 128)


# The gradient filter keeps or skips a chunk's vocabulary columns in slabs this wide (the Triton
# kernels' block): a skipped slab is left out of both gradient GEMMs.
FILTER_SLAB = 4096


# Dtypes the Triton kernels take.
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def triton_available() -> bool:
    """Looked up, not imported: importing triton takes seconds."""
    return importlib.util.find_spec("triton") is not None


def chunked_kernels(
    device_type: str, dtype: torch.dtype, compile: bool = False, gpu_kernels: Optional[bool] = None
) -> tuple[str, str]:
    """(kernels, reason): the Triton kernels on CUDA, else PyTorch ops (through ``torch.compile``
    when asked). ``gpu_kernels``: whether triton is installed, where the caller knows better than
    this machine; None looks here."""
    triton = triton_available() if gpu_kernels is None else gpu_kernels
    if device_type == "cuda" and triton and dtype in TRITON_DTYPES:
        return "triton", "its Triton kernels on CUDA"
    kernels = "compile" if compile else "torch"
    return kernels, f"PyTorch ops{' through torch.compile' if compile else ''} on {device_type}"


def _chunk_row_stats(
    logits: Tensor, target_col: Tensor, owned: Tensor, with_logit_sum: bool, softcap: float
) -> tuple[Tensor, Tensor]:
    """This shard's row maxima and its per-token sums, stacked to share one all-reduce.

    Rows of the stack: sum of ``exp(logit - row_max)``, the target logit (0 where
    another shard owns the target) and, for label smoothing, the sum of the logits.
    ``softcap`` is already in ``logits`` here (``linear_logits`` applied it).
    """
    row_max = logits.amax(-1)
    parts = [
        (logits - row_max[:, None]).exp_().sum(-1),
        logits.gather(1, target_col[:, None]).squeeze(1).where(owned, 0.0),
    ]
    if with_logit_sum:
        parts.append(logits.sum(-1))
    return row_max, torch.stack(parts)


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
    slab_max: Optional[Tensor] = None,
) -> Tensor:
    """d(token_weight . loss)/d(pre-softcap logits) for this shard's columns.

    ``softmax * (1 + 2 w_z lse) - (1-eps) onehot(y) - eps/V``, scaled per token;
    ``token_weight`` is 0 on ignored tokens. The softcap's derivative is
    ``1 - (z/cap)^2`` in terms of the capped logits ``z``. ``slab_max`` (one per
    ``FILTER_SLAB`` columns) gets each slab's largest unweighted magnitude over the tokens
    whose weight is not 0, for the gradient filter.
    """
    grad = (logits - lse[:, None]).exp_()  # in place from here: one [chunk, V] buffer
    if z_loss_weight > 0:
        grad.mul_((1 + 2 * z_loss_weight * lse)[:, None])
    if label_smoothing > 0:
        grad.sub_(label_smoothing / vocab_size)
    target_step = (label_smoothing - 1) * owned.to(grad.dtype)
    grad.scatter_add_(1, target_col[:, None], target_step[:, None])
    if softcap > 0:
        grad.mul_(1 - (logits / softcap).square())
    if slab_max is not None:
        column_max = grad.abs().where(token_weight[:, None] != 0, 0.0).amax(0)
        slabs = torch.nn.functional.pad(column_max, (0, -column_max.shape[0] % FILTER_SLAB)).view(-1, FILTER_SLAB)
        slab_max.copy_(slabs.amax(1))
    return grad.mul_(token_weight[:, None])


class _ChunkOps(NamedTuple):
    logits: Callable[..., Tensor]
    row_stats: Callable[..., tuple[Tensor, Tensor]]
    token_loss: Callable[..., Tensor]
    logit_grad: Callable[..., Tensor]


KERNELS = ("triton", "torch", "compile")


@functools.cache
def _chunk_ops(kernels: str) -> _ChunkOps:
    """The per-chunk math: "triton" (chunked_triton.py: two passes over the block in the
    GEMM's dtype), "compile" (PyTorch through ``torch.compile``, which fuses the elementwise
    passes over each fp32 block) or "torch". Collectives stay outside."""
    if kernels == "triton":
        from losses.kernels import chunked_triton

        return _ChunkOps(
            chunked_triton.linear_logits_raw, chunked_triton.row_stats, _chunk_token_loss, chunked_triton.logit_grad
        )
    ops = _ChunkOps(linear_logits, _chunk_row_stats, _chunk_token_loss, _chunk_logit_grad)
    if kernels == "compile":
        ops = _ChunkOps(*(torch.compile(fn) for fn in ops))
    return ops


def _check_kernels(kernels: Optional[str], e: Tensor) -> str:
    """``None``: what ``chunked_kernels`` picks for ``e``; else a choice it must be able to run."""
    if kernels is None:
        return chunked_kernels(e.device.type, e.dtype)[0]
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS} or None, got {kernels!r}")
    if kernels == "triton" and chunked_kernels(e.device.type, e.dtype)[0] != "triton":
        raise ValueError(f"kernels='triton' needs triton and CUDA tensors in bf16/fp16/fp32, got {e.device} {e.dtype}")
    return kernels


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
    filter_eps: Optional[float]  # None: exact gradients


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

    ``e`` is kept in at least fp32 when it is all-reduced across the vocab group
    here, else in its own dtype; ``c`` in the classifier's dtype with one fused ``addmm_`` per chunk,
    rounded at every chunk (an fp32 buffer would be twice the weight's size, plus a cast copy
    per chunk; on an H100 cuBLAS's error adding into bf16 measured about twice one rounding's,
    docs/performance.md); ``bias`` in fp32.
    """

    def __init__(self, e: Tensor, c: Tensor, bias: Optional[Tensor], needs: tuple[bool, ...], p: "_Params"):
        acc = torch.promote_types(e.dtype, torch.float32) if p.group is not None and p.reduce_e_grad else e.dtype
        self.e = torch.empty(e.shape, dtype=acc, device=e.device) if needs[0] else None
        # The first chunk writes c's gradient and the others add to it; with the gradient filter
        # a chunk may skip rows, so it starts from zeros.
        filtering = p.filter_eps is not None
        self.c = (torch.zeros_like(c) if filtering else torch.empty_like(c)) if needs[1] else None
        self.c_written = filtering
        self.bias = (
            torch.zeros(c.shape[0], dtype=torch.promote_types(bias.dtype, torch.float32), device=c.device)
            if bias is not None and needs[2]
            else None
        )

    def add_chunk(self, rows: slice, logit_grad: Tensor, e_chunk: Tensor, c: Tensor, columns: list) -> None:
        """The chunk's gradients from its logit gradient, over the runs ``[(start, stop)]`` of
        vocabulary columns in ``columns`` (all of them, or those the gradient filter kept)."""
        low = logit_grad.to(c.dtype)
        if self.e is not None:
            e_rows = self.e[rows]
            if not columns:
                e_rows.zero_()
            for i, (lo, hi) in enumerate(columns):
                if self.e.dtype != low.dtype:  # accumulated in fp32 for the vocab group's all-reduce
                    part = low[:, lo:hi] @ c[lo:hi]
                    if i:
                        e_rows.add_(part)
                    else:
                        e_rows.copy_(part)
                elif i:
                    e_rows.addmm_(low[:, lo:hi], c[lo:hi])
                else:
                    torch.mm(low[:, lo:hi], c[lo:hi], out=e_rows)
        if self.c is not None:
            for lo, hi in columns:
                if self.c_written:
                    self.c[lo:hi].addmm_(low[:, lo:hi].T, e_chunk)
                else:
                    torch.mm(low[:, lo:hi].T, e_chunk, out=self.c[lo:hi])
            self.c_written = True
        if self.bias is not None:
            for lo, hi in columns:
                self.bias[lo:hi] += logit_grad[:, lo:hi].sum(0)

    def finish(self, e: Tensor, bias: Optional[Tensor], p: _Params, reduce_e: bool = True):
        """The gradients in the inputs' dtypes; the hidden states' reduced over the vocab group
        unless ``reduce_e`` is off (kept in the accumulation dtype, for ``_reduced_e_grad`` later)."""
        grad_e = self.e
        if grad_e is not None and reduce_e:
            grad_e = _reduced_e_grad(grad_e, e.dtype, p)
        grad_bias = None if self.bias is None else self.bias.to(bias.dtype)
        return grad_e, self.c, grad_bias


def _reduced_e_grad(grad_e: Tensor, dtype: torch.dtype, p: _Params) -> Tensor:
    """Sum the shards' parts of the hidden-state gradient (if ``reduce_e_grad``), in ``dtype``."""
    if p.reduce_e_grad:
        _all_reduce(grad_e, dist.ReduceOp.SUM, p.group)
    return grad_e.to(dtype)


def _backprop_chunk(grads, rows, e_chunk, c, logits, lse, col, owned, token_weight, p):
    vocab = c.shape[0]
    slab_max = None
    if p.filter_eps is not None:
        slab_max = torch.zeros(-(-vocab // FILTER_SLAB), dtype=torch.float32, device=c.device)
    logit_grad = p.ops.logit_grad(
        logits, lse, col, owned, token_weight,
        p.vocab_size, p.softcap, p.z_loss_weight, p.label_smoothing, slab_max,
    )  # fmt: skip
    columns = [(0, vocab)] if slab_max is None else _kept_columns(slab_max, p.filter_eps, vocab)
    grads.add_chunk(rows, logit_grad, e_chunk, c, columns)


def _kept_columns(slab_max: Tensor, filter_eps: float, vocab: int) -> list[tuple[int, int]]:
    """Runs ``(start, stop)`` of the columns in slabs with a gradient of at least ``filter_eps``.

    Reading them waits for the GPU once per chunk: the GEMMs' shapes depend on them."""
    runs = []
    for slab, kept in enumerate((slab_max >= filter_eps).tolist()):
        lo, hi = slab * FILTER_SLAB, min((slab + 1) * FILTER_SLAB, vocab)
        if not kept:
            continue
        if runs and runs[-1][1] == lo:
            runs[-1] = (runs[-1][0], hi)
        else:
            runs.append((lo, hi))
    return runs


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """With reduction mean/sum the gradients are computed in the forward, while each
    chunk's logits are at hand, and the backward only scales them by grad_output: no
    second pass over the vocabulary. With reduction "none" the per-token grad_output
    is unknown in the forward, so the backward recomputes each chunk's logits from
    the saved log-sum-exp (no collectives needed but the e-gradient reduction)."""

    @staticmethod
    def forward(ctx, e: Tensor, c: Tensor, bias: Optional[Tensor], targets: Tensor, p: _Params):
        n = e.shape[0]
        needs = ctx.needs_input_grad[:3]
        grads_now = p.grad_enabled and any(needs) and p.reduction != "none"
        grads = _Grads(e, c, bias, needs, p) if grads_now else None
        acc = torch.promote_types(e.dtype, torch.float32)
        scale = 1 / mean_divisor(targets, p.ignore_index).to(acc) if p.reduction == "mean" else 1.0

        col, owned, valid = _local_targets(targets, p.vocab_start, c.shape[0], p.ignore_index)
        weight = valid.to(acc) * scale if grads_now else None
        lse = torch.empty(n, dtype=acc, device=e.device)
        token_sums = []  # per chunk: the target logit and, for label smoothing, the sum of logits
        for start in range(0, n, p.chunk_size):
            rows = slice(start, start + p.chunk_size)
            logits = p.ops.logits(e[rows], c, bias, p.softcap)
            row_max, sums = p.ops.row_stats(logits, col[rows], owned[rows], p.label_smoothing > 0, p.softcap)
            if p.group is not None:  # rescale each shard's exponential sum to the global maximum
                global_max = row_max.clone()
                _all_reduce(global_max, dist.ReduceOp.MAX, p.group)
                sums[0] *= (row_max - global_max).exp()
                row_max = global_max
                _all_reduce(sums, dist.ReduceOp.SUM, p.group)
            torch.add(row_max, sums[0].log(), out=lse[rows])
            token_sums.append(sums[1:])
            if grads_now:
                _backprop_chunk(grads, rows, e[rows], c, logits, lse[rows], col[rows], owned[rows], weight[rows], p)
            del logits, row_max, sums  # before the next chunk allocates its block: one block alive, not two
        token_sums = torch.cat(token_sums, dim=1).to(acc)
        logit_sum = token_sums[1] if p.label_smoothing > 0 else None
        token_loss = p.ops.token_loss(
            lse, token_sums[0], logit_sum, valid, p.vocab_size, p.z_loss_weight, p.label_smoothing
        )

        ctx.p = p
        ctx.stash = None
        if grads_now:
            # The hidden-state gradient is reduced over the group only in the backward, after
            # each rank scaled its shard's part by its own upstream gradient (upstream CCE's rule).
            e_dtype = e.dtype

            def reduce_e(grads: list) -> list:
                return [None if grads[0] is None else _reduced_e_grad(grads[0], e_dtype, p), *grads[1:]]

            ctx.stash = ForwardGradients(
                list(grads.finish(e, bias, p, reduce_e=False)), "chunked", after_scaling=reduce_e
            )
        elif p.reduction == "none":
            ctx.save_for_backward(e, c, bias, targets, lse)
        if p.reduction == "none":
            return token_loss
        return token_loss.sum() * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        p: _Params = ctx.p
        if ctx.stash is not None:
            return (*ctx.stash.hand_out(ctx, grad_loss), None, None)

        e, c, bias, targets, lse = ctx.saved_tensors
        grads = _Grads(e, c, bias, ctx.needs_input_grad[:3], p)
        col, owned, valid = _local_targets(targets, p.vocab_start, c.shape[0], p.ignore_index)
        weight = grad_loss.to(lse.dtype) * valid
        for start in range(0, e.shape[0], p.chunk_size):
            rows = slice(start, start + p.chunk_size)
            logits = p.ops.logits(e[rows], c, bias, p.softcap)
            _backprop_chunk(grads, rows, e[rows], c, logits, lse[rows], col[rows], owned[rows], weight[rows], p)
            del logits
        return (*grads.finish(e, bias, p), None, None)


def chunked_linear_cross_entropy(
    e: Tensor,
    c: Tensor,
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
    kernels: Optional[str] = None,
    filter_eps: Optional[float] = None,
) -> Tensor:
    """Cross-entropy of ``e [N, D] @ c.T`` against ``targets [N]``, ``chunk_size`` tokens at a time.

    ``group=None``: ``c`` is the whole classifier ``[V, D]``. With a group: ``c`` is
    this rank's rows ``[vocab_start, vocab_start + V_local)`` of a ``vocab_size``-row
    classifier (only label smoothing needs ``vocab_size``; it is all-reduced when not
    given) and ``bias`` the same slice of its bias. Every rank passes the same ``e``
    and ``targets`` and gets the same loss. The gradient of ``e`` is all-reduced over
    the group when ``reduce_e_grad``, else left partial for the caller to reduce
    (e.g. reduce-scatter); each rank gets only its shard's classifier (and bias)
    gradient. ``kernels`` runs the per-chunk math in the Triton kernels of
    ``chunked_triton.py`` ("triton"), in PyTorch ops ("torch") or in PyTorch ops through
    ``torch.compile`` ("compile"); None takes what ``chunked_kernels`` picks for ``e``.
    ``filter_eps`` (None or 0: exact) leaves a chunk's slab of ``FILTER_SLAB`` vocabulary columns
    out of both gradient GEMMs when every token's unweighted logit gradient in it is below it
    (CCE's ``filter_eps``, on slabs of the chunk instead of its kernel's tiles); the loss is exact.

    Returns a scalar for "mean"/"sum" and ``[N]`` for "none", in fp32 (fp64 for fp64
    inputs). "mean" divides by the number of non-ignored targets, and is 0 with zero
    gradients when there are none. With "mean"/"sum" the result can be backpropagated
    once (its stashed gradients are scaled in place).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0: sized by memory), got {chunk_size}")
    if e.dim() != 2 or c.dim() != 2 or e.shape[1] != c.shape[1] or targets.shape != e.shape[:1]:
        raise ValueError(f"expected e [N, D], c [V, D], targets [N]; got {e.shape}, {c.shape}, {targets.shape}")
    if e.dtype != c.dtype:
        raise ValueError(f"e and c must share a dtype, got {e.dtype} and {c.dtype}")
    if bias is not None and bias.shape != c.shape[:1]:
        raise ValueError(f"bias must be [{c.shape[0]}], got {list(bias.shape)}")
    if filter_eps is not None and not filter_eps >= 0:
        raise ValueError(f"filter_eps must be None or >= 0, got {filter_eps}")
    kernels = _check_kernels(kernels, e)
    if chunk_size == 0:  # the Triton kernels keep the block in the GEMM's dtype, PyTorch in >= fp32
        chunk_size = auto_chunk_size(c.shape[0], e.element_size() if kernels == "triton" else max(4, e.element_size()))
    if vocab_size is None and label_smoothing > 0:
        vocab_size = _global_vocab_size(c, group)
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
        ops=_chunk_ops(kernels),
        filter_eps=filter_eps or None,
    )
    return _ChunkedLinearCrossEntropy.apply(e, c, bias, targets.long(), params)


def _global_vocab_size(c: Tensor, group: Optional[dist.ProcessGroup]) -> int:
    if group is None:
        return c.shape[0]
    size = torch.tensor([c.shape[0]], device=c.device)
    dist.all_reduce(size, group=group)
    return int(size.item())
