"""AdamW on fp32 parameters from bf16 gradients on CUDA, each gradient read once in its own dtype.

On one data-parallel rank a parameter's gradient stays in the bf16 the backward made it in
(parallelisms/compute_weights.py). torch's fused AdamW takes gradients only in their parameter's dtype:
each would first be cast into fp32, 6 more bytes per parameter written and read again beside the
update's own 28. This kernel reads the bf16 gradient where the update needs it (26 bytes per parameter
in all), every parameter of a ``FlatAdamW`` bucket in one launch. Its math is torch's fused AdamW's, in
fp32 throughout where torch forms some intermediates in float64, so the two agree to fp32 rounding;
``FlatAdamW`` on the CPU casts and calls torch's kernel, and the tests compare the two.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# Elements and warps per program: the fastest of 1024-8192 elements and 4-16 warps on an H100 for Qwen3-1.7B
# (docs/performance.md, 2026-12-07: 18.8 ms a step with the copies, where 4096 took 21.6-23.1).
_BLOCK = 1024
_WARPS = 8


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else -math.inf  # beta ** step = 0 for beta 0


class Bf16GradAdamW:
    """Launches the kernel for the parameters of one bucket (fp32, with their moments and step counts as views
    of ``FlatAdamW``'s flat buffers). Which program updates which elements is worked out once per set of
    parameters; the addresses are taken at each step, the gradients' being new each time."""

    def __init__(self, params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], steps: Tensor):
        self.params, self.exp_avgs, self.exp_avg_sqs, self.steps = params, exp_avgs, exp_avg_sqs, steps
        self.device = steps.device
        self._programs: dict[tuple[int, ...], tuple[Tensor, Tensor, Tensor]] = {}

    def _programs_of(self, chosen: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """Per program, the position in ``chosen`` of its tensor and its first element; per chosen tensor, its
        number of elements."""
        if chosen not in self._programs:
            numels = [self.params[i].numel() for i in chosen]
            blocks = torch.tensor([-(-n // _BLOCK) for n in numels])
            which = torch.repeat_interleave(torch.arange(len(chosen), dtype=torch.int32), blocks)
            first = torch.cat([torch.arange(int(b), dtype=torch.int32) * _BLOCK for b in blocks])
            self._programs[chosen] = tuple(
                t.to(self.device) for t in (which, first, torch.tensor(numels, dtype=torch.int32))
            )
        return self._programs[chosen]

    def step(
        self,
        chosen: list[int],
        grads: list[Tensor],
        copies: list[Optional[Tensor]],
        *,
        lr: float,
        beta1: float,
        beta2: float,
        weight_decay: float,
        eps: float,
        grad_scale: Optional[Tensor],
        found_inf: Optional[Tensor],
    ) -> None:
        """One update of the parameters at the bucket's indices ``chosen`` from ``grads`` (bf16, one per chosen
        index), their steps already counted; each gradient divided by ``grad_scale``; nothing where
        ``found_inf`` is nonzero. ``copies``: per chosen index, a bf16 tensor laid out as the parameter that the
        update also writes the new weights into (one rank's compute weights, parallelisms/compute_weights.py:
        the cast the next forward would make, from the values in registers, 2 bytes per parameter instead of
        6), or None."""
        for i, grad, copy in zip(chosen, grads, copies):
            for t in (grad, copy):
                if t is not None and (
                    t.dtype != torch.bfloat16 or t.shape != self.params[i].shape or not t.is_contiguous()
                ):
                    raise ValueError(f"a bf16 tensor laid out as its parameter, got {t.dtype} {tuple(t.shape)}")
        has_copies = any(c is not None for c in copies)
        which, first, numels = self._programs_of(tuple(chosen))
        addresses = torch.tensor(
            [
                [t.data_ptr() for t in column]
                for column in (
                    [self.params[i] for i in chosen],
                    grads,
                    [self.exp_avgs[i] for i in chosen],
                    [self.exp_avg_sqs[i] for i in chosen],
                    [self.steps[i] for i in chosen],
                )
            ]
            + ([[0 if c is None else c.data_ptr() for c in copies]] if has_copies else []),
            dtype=torch.int64,
        )
        if self.device.type == "cuda":  # pinned, so the copy is queued and the host does not wait for the device
            addresses = addresses.pin_memory()
        addresses = addresses.to(self.device, non_blocking=True)
        unused = self.steps  # where an optional operand is absent
        _adamw_kernel[(len(which),)](
            which,
            first,
            numels,
            *addresses,
            *([] if has_copies else [unused]),
            unused if grad_scale is None else grad_scale,
            unused if found_inf is None else found_inf,
            lr,
            lr * weight_decay,
            beta1,
            beta2,
            _log2(beta1),
            _log2(beta2),
            eps,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            HAS_COPIES=has_copies,
            BLOCK=_BLOCK,
            num_warps=_WARPS,
        )


@triton.jit
def _update(
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    copy_ptr,
    write_copy,
    offsets,
    numel,
    grad_scale,
    step_size,
    bias_correction2_sqrt,
    lr_weight_decay,
    beta1,
    beta2,
    eps,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_COPIES: tl.constexpr,
    MASKED: tl.constexpr,
):
    """torch's fused AdamW, in its order, on one block (masked only where it is a tensor's last and short)."""
    mask = offsets < numel if MASKED else None
    param = tl.load(param_ptr + offsets, mask=mask)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask)
    if HAS_GRAD_SCALE:
        grad = tl.div_rn(grad, grad_scale)
    param = param - lr_weight_decay * param
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
    param = param - tl.div_rn(step_size * exp_avg, denom)
    tl.store(param_ptr + offsets, param, mask=mask)
    tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
    if HAS_COPIES:
        if write_copy:
            tl.store(copy_ptr + offsets, _bf16_bits(param), mask=mask)


@triton.jit
def _bf16_bits(x):
    """The bits of ``x`` rounded to bf16 as torch casts it: to nearest even, a NaN kept a NaN. (Spelled out
    because Triton's interpreter truncates where the compiled cast rounds, and the CPU test checks the bits.)"""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)


@triton.jit
def _address(table, t, dtype: tl.constexpr):
    """The ``t``-th address of ``table`` as a pointer to ``dtype``."""
    return tl.load(table + t).to(tl.pointer_type(dtype))


@triton.jit
def _adamw_kernel(
    which_ptr,  # per program: the position of its tensor in the tables below
    first_ptr,  # per program: its first element
    numel_ptr,
    param_ptrs,  # per tensor, addresses
    grad_ptrs,
    exp_avg_ptrs,
    exp_avg_sq_ptrs,
    step_ptrs,
    copy_ptrs,  # 0 where there is none
    grad_scale_ptr,
    found_inf_ptr,
    lr,
    lr_weight_decay,
    beta1,
    beta2,
    log2_beta1,
    log2_beta2,
    eps,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_COPIES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    pid = tl.program_id(0)
    t = tl.load(which_ptr + pid)
    first = tl.load(first_ptr + pid)
    offsets = first + tl.arange(0, BLOCK)
    numel = tl.load(numel_ptr + t)
    param_ptr = _address(param_ptrs, t, tl.float32)
    grad_ptr = _address(grad_ptrs, t, tl.bfloat16)
    exp_avg_ptr = _address(exp_avg_ptrs, t, tl.float32)
    exp_avg_sq_ptr = _address(exp_avg_sq_ptrs, t, tl.float32)
    copy_ptr = grad_ptr.to(tl.pointer_type(tl.uint16))  # never written without copies
    write_copy = False
    if HAS_COPIES:
        copy_address = tl.load(copy_ptrs + t)
        copy_ptr = copy_address.to(tl.pointer_type(tl.uint16))  # bf16, written as bits
        write_copy = copy_address != 0
    step = tl.load(_address(step_ptrs, t, tl.float32))
    step_size = tl.div_rn(lr, 1 - tl.exp2(step * log2_beta1))
    bias_correction2_sqrt = tl.sqrt_rn(1 - tl.exp2(step * log2_beta2))
    grad_scale = tl.load(grad_scale_ptr) if HAS_GRAD_SCALE else 1.0
    pointers = (param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, copy_ptr, write_copy, offsets, numel)
    args = (grad_scale, step_size, bias_correction2_sqrt, lr_weight_decay, beta1, beta2, eps)
    if first + BLOCK <= numel:
        _update(*pointers, *args, HAS_GRAD_SCALE, HAS_COPIES, False)
    else:
        _update(*pointers, *args, HAS_GRAD_SCALE, HAS_COPIES, True)
