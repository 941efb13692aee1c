"""Every ``[loss]`` option any entry knows: its default, its valid values, what it does.

Entries declare which of these names they honour; the registry uses the table to
check a recipe before anything is built, ``OutputLoss`` to refuse a common option
its entry cannot honour.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from config.job_config import Loss

# Returns what is wrong with a value, or None when it is valid.
Check = Callable[[object], Optional[str]]


@dataclass(frozen=True)
class LossOption:
    name: str
    default: object
    check: Check
    # Completes "'<entry>' cannot ...", for entries that do not honour the option.
    capability: str


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(minimum: Optional[int] = None) -> Check:
    def check(value):
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be an integer, got {value!r}"
        if minimum is not None and value < minimum:
            return f"must be >= {minimum}, got {value}"
        return None

    return check


def _number(low: float, high: float = math.inf) -> Check:
    """A finite number in ``[low, high)``."""

    def check(value):
        if not _is_number(value):
            return f"must be a number, got {value!r}"
        if not low <= value < high:
            upper = "" if high == math.inf else f" and < {high}"
            return f"must be >= {low}{upper}, got {value}"
        return None

    return check


def _boolean(value: object) -> Optional[str]:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


# "default": each entry's own (cce: CCE_FILTER_EPS; chunked: exact); then what cut_cross_entropy 25.1.1
# accepts (its "auto" and "high" are the same threshold).
FILTER_EPS_NAMES = ("default", "high", "auto")
CCE_FILTER_EPS = "high"  # cut-cross-entropy's own default
_DEFAULTS = Loss()  # the recipe's defaults are every entry's defaults
DEFAULT_FILTER_EPS = _DEFAULTS.filter_eps


def filter_threshold(value: object, dtype: torch.dtype) -> Optional[float]:
    """``chunked``'s threshold for a ``filter_eps`` value: None (exact) for "default", None and 0;
    "high" and "auto" as cut-cross-entropy reads them, ``finfo(dtype).eps / 32``."""
    if value in (None, "default") or value == 0:
        return None
    if value in ("high", "auto"):
        return torch.finfo(dtype).eps / 32
    return float(value)


def _filter_eps(value: object) -> Optional[str]:
    if value is None or value in FILTER_EPS_NAMES or (_is_number(value) and value >= 0):
        return None
    return f"must be one of {FILTER_EPS_NAMES}, a number >= 0, or unset (no filtering); got {value!r}"


OPTIONS: dict[str, LossOption] = {
    option.name: option
    for option in (
        LossOption("ignore_index", _DEFAULTS.ignore_index, _integer(), "ignore a label id"),
        LossOption("z_loss_weight", _DEFAULTS.z_loss_weight, _number(0.0), "apply z-loss"),
        LossOption("label_smoothing", _DEFAULTS.label_smoothing, _number(0.0, 1.0), "apply label smoothing"),
        LossOption("logit_softcap", _DEFAULTS.logit_softcap, _number(0.0), "softcap the logits"),
        LossOption("chunk_size", _DEFAULTS.chunk_size, _integer(minimum=0), "set a token chunk size"),
        LossOption("compile", _DEFAULTS.compile, _boolean, "compile its chunk math"),
        LossOption("filter_eps", _DEFAULTS.filter_eps, _filter_eps, "filter small gradients (filter_eps)"),
    )
}

# Options OutputLoss itself takes; an entry takes its own others as keyword arguments.
COMMON_OPTIONS = frozenset({"ignore_index", "z_loss_weight", "label_smoothing", "logit_softcap"})
