"""Where the loss is chosen: the recipe's ``[loss] name`` -> the module that computes it.

``build_loss`` is the one way to build a loss, with or without the vocab-parallel head.
Every mistake in ``[loss]`` (a misspelt name or option, a bad value, an option the
chosen entry cannot honour) is a ``ConfigError`` raised before any model is built.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from config.errors import ConfigError, did_you_mean
from config.job_config import Compile, Loss
from losses.base import OutputLoss
from losses.entries.cce import CCELoss, CCETorchCompileLoss
from losses.entries.chunked import ChunkedCrossEntropy
from losses.entries.cross_entropy import MaterializedCrossEntropy
from losses.entries.vocab_parallel import VocabParallelLoss
from losses.options import COMMON_OPTIONS, OPTIONS
from losses.resolve import AUTO, LossChoice, resolve_loss, why_not_cce

ENTRIES: dict[str, type[OutputLoss]] = {
    cls.name: cls for cls in (ChunkedCrossEntropy, MaterializedCrossEntropy, CCELoss, CCETorchCompileLoss)
}
# "auto" takes the common options plus "compile", so a recipe saying "auto" keeps working
# whatever it resolves to; backend-specific sizes (chunk_size, filter_eps) need a named entry.
LOSS_NAMES: tuple[str, ...] = (*ENTRIES, AUTO)
# What the vocab-parallel head computes with (losses/vocab_parallel.py's backends).
VOCAB_PARALLEL_NAMES = (AUTO, "chunked", "cce")


def loss_option_names(name: str) -> set[str]:
    """The ``[loss]`` options entry ``name`` honours."""
    _check_name(name)
    return set(COMMON_OPTIONS | {"compile"} if name == AUTO else ENTRIES[name].options)


def validate_loss_options(name: str, options: dict[str, object]) -> None:
    """Raise ``ConfigError("loss.<key>", ...)`` for the first problem in ``[loss]``."""
    supported = loss_option_names(name)
    for key, value in options.items():
        if key not in OPTIONS:
            raise ConfigError(
                f"loss.{key}", f"unknown option{did_you_mean(key, OPTIONS)}; {name!r} takes {sorted(supported)}"
            )
        option = OPTIONS[key]
        problem = option.check(value)
        if problem is not None:
            raise ConfigError(f"loss.{key}", problem)
        if key not in supported and value != option.default:
            able = [entry for entry in ENTRIES if key in ENTRIES[entry].options]
            raise ConfigError(f"loss.{key}", f"{name!r} cannot {option.capability}; use {_either(able)}")


def recipe_options(loss: Loss, compile: Compile) -> dict:
    """The options a recipe's ``[loss]`` gives its entry (``compile`` on when ``[compile]`` asks for the loss)."""
    options = {k: v for k, v in vars(loss).items() if k in loss_option_names(loss.name)}
    if compile.enable and "loss" in compile.components and "compile" in options:
        options["compile"] = True
    return options


def build_loss(
    name: str,
    head: nn.Module,
    options: dict,
    *,
    reduction: str = "mean",
    device: torch.device,
    dtype: Optional[torch.dtype] = None,
    vocab_group: Optional[dist.ProcessGroup] = None,
) -> OutputLoss:
    """Check ``options``, choose how to compute ``name`` (``losses/resolve.py``) and build the loss
    around ``head``. ``dtype``: of the hidden states it will see (default: the head's weight's).
    ``vocab_group``: ``head``'s classifier is sharded by vocabulary over this group (the
    vocab-parallel head). The result's ``choice`` says what was chosen and why."""
    validate_loss_options(name, options)
    device = torch.device(device)
    choice = choose_loss(
        name,
        options,
        device_type=device.type,
        dtype=dtype or head.weight.dtype,
        vocab_parallel=vocab_group is not None,
        bias=getattr(head, "bias", None) is not None,
    )
    if vocab_group is not None:
        common = {k: v for k, v in options.items() if k in COMMON_OPTIONS}
        loss = VocabParallelLoss(head, group=vocab_group, backend=choice.entry, reduction=reduction, **common)
    else:
        cls = ENTRIES[choice.entry]
        if cls.needs_cuda and device.type != "cuda":
            raise ConfigError("loss.name", f"{name!r} needs a CUDA device, not {device.type}; use 'chunked' or 'auto'")
        own = {k: v for k, v in options.items() if k in cls.options}
        if choice.entry == "chunked":
            own["kernels"] = choice.kernels
        loss = cls(head, reduction=reduction, **own)
    loss.choice = choice
    return loss


def choose_loss(
    name: str,
    options: dict,
    *,
    device_type: str,
    dtype: torch.dtype,
    vocab_parallel: bool,
    bias: bool = False,
    gpu_kernels: Optional[bool] = None,
) -> LossChoice:
    """``resolve_loss`` for a recipe's ``[loss]`` section; the memory estimate asks it too. What the
    vocab-parallel head cannot compute is a ``ConfigError`` naming the fix."""
    z_loss_weight, label_smoothing = options.get("z_loss_weight", 0.0), options.get("label_smoothing", 0.0)
    if vocab_parallel and name not in VOCAB_PARALLEL_NAMES:
        raise ConfigError(
            "loss.name", f"the vocab-parallel head runs {_either(list(VOCAB_PARALLEL_NAMES))}, not {name!r}"
        )
    if vocab_parallel and name == "cce":
        why = why_not_cce(
            device_type,
            dtype,
            needs_grad=True,
            bias=bias,
            z_loss_weight=z_loss_weight,
            label_smoothing=label_smoothing,
            gpu_kernels=gpu_kernels,
        )
        if why is not None:
            raise ConfigError("loss.name", f"'cce' cannot compute this loss: {why}; use 'chunked' or 'auto'")
    return resolve_loss(
        name,
        device_type=device_type,
        dtype=dtype,
        vocab_parallel=vocab_parallel,
        bias=bias,
        z_loss_weight=z_loss_weight,
        label_smoothing=label_smoothing,
        compile=bool(options.get("compile", False)),
        gpu_kernels=gpu_kernels,
    )


def _check_name(name: str) -> None:
    if name not in LOSS_NAMES:
        suggestion = did_you_mean(name, LOSS_NAMES)
        raise ConfigError("loss.name", f"unknown loss {name!r}{suggestion}; choose from {list(LOSS_NAMES)}")


def _either(names: list[str]) -> str:
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
