"""The recipe's ``[loss] name`` -> loss class, and the config-time check of its options.

Every mistake in ``[loss]`` (a misspelt name or option, a bad value, an option the
chosen entry cannot honour) is a ``ConfigError`` raised before any model is built.
"""

import difflib
import logging
from typing import Iterable

import torch
from torch import nn

from losses.base import OutputLoss
from losses.cce import CCELoss, CCETorchCompileLoss
from losses.chunked import ChunkedCrossEntropy
from losses.chunked_linear_cross_entropy import TRITON_AVAILABLE
from losses.cross_entropy import MaterializedCrossEntropy
from losses.options import COMMON_OPTIONS, OPTIONS
from config.errors import ConfigError

logger = logging.getLogger(__name__)

ENTRIES: dict[str, type[OutputLoss]] = {
    cls.name: cls for cls in (ChunkedCrossEntropy, MaterializedCrossEntropy, CCELoss, CCETorchCompileLoss)
}
# "auto" picks an entry at build time (today always "chunked"); it takes the common
# options plus "compile", so a recipe saying "auto" keeps working whatever it picks.
# Backend-specific sizes (chunk_size, filter_eps) need a named entry.
AUTO = "auto"
LOSS_NAMES: tuple[str, ...] = (*ENTRIES, AUTO)


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
                f"loss.{key}", f"unknown option{_did_you_mean(key, OPTIONS)}; {name!r} takes {sorted(supported)}"
            )
        option = OPTIONS[key]
        problem = option.check(value)
        if problem is not None:
            raise ConfigError(f"loss.{key}", problem)
        if key not in supported and value != option.default:
            able = [entry for entry in ENTRIES if key in ENTRIES[entry].options]
            raise ConfigError(f"loss.{key}", f"{name!r} cannot {option.capability}; use {_either(able)}")


def build_loss(
    name: str, head: nn.Module, options: dict, *, reduction: str = "mean", device: torch.device
) -> OutputLoss:
    """Check ``options``, resolve ``auto`` for ``device`` and build the loss around ``head``."""
    validate_loss_options(name, options)
    device = torch.device(device)
    if name == AUTO:
        name, reason = _pick_for_auto(device)
        logger.info("loss 'auto' resolved to %r: %s", name, reason)
    cls = ENTRIES[name]
    if cls.needs_cuda and device.type != "cuda":
        raise ConfigError("loss.name", f"{name!r} needs a CUDA device, not {device.type}; use 'chunked' or 'auto'")
    return cls(head, reduction=reduction, **{k: v for k, v in options.items() if k in cls.options})


def _pick_for_auto(device: torch.device) -> tuple[str, str]:
    """``chunked`` everywhere: on CUDA its Triton kernels are the fastest entry measured
    (docs/performance.md) with a bounded logits block; elsewhere it is the lean PyTorch path."""
    if device.type == "cuda" and TRITON_AVAILABLE:
        return "chunked", "its Triton kernels on CUDA"
    return "chunked", f"its PyTorch path on {device.type}"


def _check_name(name: str) -> None:
    if name not in LOSS_NAMES:
        suggestion = _did_you_mean(name, LOSS_NAMES)
        raise ConfigError("loss.name", f"unknown loss {name!r}{suggestion}; choose from {list(LOSS_NAMES)}")


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _either(names: list[str]) -> str:
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
