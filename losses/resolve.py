"""The one place that decides how a loss is computed: ``auto``'s entry and every entry's kernels.

The registry asks it when it builds a loss, the vocab-parallel function when it is
called, ``chunked_linear_cross_entropy`` when it runs, and the memory estimate
(``--dry_run``) when it counts bytes, so all four give the same answer for the same
device, dtype and options, and the run log can say what was chosen and why.
"""

import functools
import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch

AUTO = "auto"
# Dtypes the chunked loss's Triton kernels take; cut-cross-entropy 25.1.1 backpropagates only 16-bit ones.
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CCE_BACKWARD_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LossChoice:
    """``entry``: the registry entry that computes the loss (never ``auto``). ``kernels``: how:
    ``triton`` / ``torch`` / ``compile`` for ``chunked``, ``cce`` / ``torch_compile`` for the
    cut-cross-entropy entries, ``torch`` for ``cross_entropy``."""

    entry: str
    kernels: str
    reason: str

    def describe(self, vocab_parallel: bool = False) -> str:
        head = "vocab-parallel head, " if vocab_parallel else ""
        return f"{head}{self.entry!r} on {self.kernels} kernels ({self.reason})"


@functools.cache
def triton_available() -> bool:
    """Looked up, not imported: importing triton takes seconds."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def cce_problem() -> Optional[str]:
    """Why cut-cross-entropy's kernels cannot be called here (missing, no Triton, another
    release than the one they are called as), or None."""
    from losses.kernels.cce_vocab_parallel import cce_kernels

    try:
        cce_kernels()
    except ImportError as err:
        return str(err)
    return None


def why_not_cce(
    device_type: str,
    dtype: torch.dtype,
    *,
    needs_grad: bool,
    bias: bool,
    z_loss_weight: float,
    label_smoothing: float,
    gpu_kernels: Optional[bool] = None,
) -> Optional[str]:
    """Why cut-cross-entropy 25.1.1's kernels cannot compute this loss, or None when they can."""
    if bias:
        return "CCE 25.1.1's kernels take no bias"
    if z_loss_weight:
        return "CCE 25.1.1's kernels have no z-loss"
    if label_smoothing:
        return "CCE 25.1.1's kernels have no label smoothing"
    if device_type != "cuda":
        return f"its Triton kernels need CUDA, not {device_type}"
    if needs_grad and dtype not in CCE_BACKWARD_DTYPES:
        return f"CCE's backward takes only bf16/fp16 hidden states, got {dtype}"
    if gpu_kernels is None:
        return cce_problem()
    return None if gpu_kernels else "triton and cut-cross-entropy are not installed"


def chunked_kernels(
    device_type: str, dtype: torch.dtype, compile: bool = False, gpu_kernels: Optional[bool] = None
) -> tuple[str, str]:
    """(kernels, reason) for the chunked loss: its Triton kernels on CUDA, else PyTorch ops
    (through ``torch.compile`` when asked)."""
    triton = triton_available() if gpu_kernels is None else gpu_kernels
    if device_type == "cuda" and triton and dtype in TRITON_DTYPES:
        return "triton", "its Triton kernels on CUDA"
    kernels = "compile" if compile else "torch"
    return kernels, f"PyTorch ops{' through torch.compile' if compile else ''} on {device_type}"


def resolve_loss(
    name: str,
    *,
    device_type: str,
    dtype: torch.dtype,
    vocab_parallel: bool = False,
    needs_grad: bool = True,
    bias: bool = False,
    z_loss_weight: float = 0.0,
    label_smoothing: float = 0.0,
    compile: bool = False,
    gpu_kernels: Optional[bool] = None,
) -> LossChoice:
    """How loss ``name`` (an entry or ``auto``) computes on ``device_type`` with ``dtype`` hidden states.

    ``auto`` is ``chunked``, whose Triton kernels were the fastest exact entry measured
    (docs/performance.md), except on the vocab-parallel head, where it is ``cce`` wherever
    cut-cross-entropy's kernels can compute the loss (no logits at all; the chunked backend
    otherwise). ``gpu_kernels``: whether triton and cut-cross-entropy are installed, where the
    caller knows better than this machine (``--dry_run`` plans for a GPU machine); None looks here.
    """
    if name == AUTO:
        if vocab_parallel:
            why = why_not_cce(
                device_type,
                dtype,
                needs_grad=needs_grad,
                bias=bias,
                z_loss_weight=z_loss_weight,
                label_smoothing=label_smoothing,
                gpu_kernels=gpu_kernels,
            )
            if why is None:
                return LossChoice("cce", "cce", "auto: the vocab-parallel head's kernels write no logits")
            kernels, reason = chunked_kernels(device_type, dtype, compile, gpu_kernels)
            return LossChoice("chunked", kernels, f"auto: {why}; {reason}")
        kernels, reason = chunked_kernels(device_type, dtype, compile, gpu_kernels)
        return LossChoice("chunked", kernels, f"auto: {reason}")
    if name == "chunked":
        return LossChoice(name, *chunked_kernels(device_type, dtype, compile, gpu_kernels))
    if name == "cce":
        return LossChoice(name, "cce", "cut-cross-entropy's Triton kernels")
    if name == "cce_torch_compile":
        return LossChoice(name, "torch_compile", "cut-cross-entropy's torch.compile path")
    return LossChoice(name, "torch", "materialized logits")
