"""The one decision: which entry and kernels compute a loss here, and why (``choose_loss``).

``build_loss`` asks it, the vocab-parallel function when it is called, the run log, and
``--dry_run``'s memory and cost models (for the GPU machine the recipe plans), so all of
them give the same answer for the same device, dtype and options. It reads the entries'
facts (``losses/facts.py``) and nothing else about them. The vocab-parallel head's rules
are here too, once: which entries it runs and which recipe options it does not take.
"""

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from config.errors import ConfigError
from losses.facts import LossSetting
from losses.options import COMMON_OPTIONS, OPTIONS
from losses.registry import AUTO, AUTO_PREFERENCE, ENTRIES, check_name, either, honours

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


@dataclass(frozen=True)
class LossChoice:
    """``entry``: the registry entry that computes the loss (never ``auto``). ``kernels``: how
    (its facts' ``kernels``: ``triton`` / ``torch`` / ``compile`` for ``chunked``, ``cce`` /
    ``torch_compile`` for the cut-cross-entropy entries, ``torch`` for ``cross_entropy``, ...).
    ``reason``: why, for the run log."""

    entry: str
    kernels: str
    reason: str

    def describe(self, vocab_parallel: bool = False) -> str:
        head = "vocab-parallel head, " if vocab_parallel else ""
        return f"{head}{self.entry!r} on {self.kernels} kernels ({self.reason})"


def vocab_parallel_entries() -> list[str]:
    """The entries the vocab-parallel head can compute with: those whose facts give a vocab-parallel function."""
    return [name for name, cls in ENTRIES.items() if cls.facts.vocab_parallel is not None]


def check_vocab_parallel(name: str, options: Mapping[str, object]) -> None:
    """The vocab-parallel head's rules for a recipe's ``[loss]``, a ``ConfigError`` for the first broken one:
    it runs ``auto`` or an entry with a vocab-parallel function, and takes no chunk_size, compile or filter_eps yet.
    What a chosen entry cannot compute there is ``choose_loss``'s to say (its facts)."""
    runs = [AUTO, *vocab_parallel_entries()]
    if name not in runs:
        raise ConfigError("loss.name", f"the vocab-parallel head runs {either(runs)}, not {name!r}")
    chunk_size, compile = options.get("chunk_size", OPTIONS["chunk_size"].default), options.get("compile", False)
    if chunk_size != OPTIONS["chunk_size"].default or compile:
        raise ConfigError("loss.chunk_size", "the vocab-parallel head does not take chunk_size or compile yet")
    if options.get("filter_eps", OPTIONS["filter_eps"].default) != OPTIONS["filter_eps"].default:
        raise ConfigError(
            "loss.filter_eps",
            'the vocab-parallel head does not take filter_eps yet (cce filters at "high" there, chunked is exact); '
            'remove it or set "default"',
        )


def _why_not(name: str, setting: LossSetting) -> Optional[str]:
    """Why entry ``name`` cannot compute the loss in ``setting`` (its facts against it), or None."""
    facts = ENTRIES[name].facts
    if setting.bias and not facts.bias:
        return "its kernels take no bias"
    for key, value in setting.options.items():
        if key in COMMON_OPTIONS and not honours(name, key, value):
            return f"it cannot {OPTIONS[key].capability}"
    if facts.devices is not None and setting.device_type not in facts.devices:
        devices = " or ".join(sorted(device.upper() for device in facts.devices))
        return f"its kernels run on {devices} only, not on {setting.device_type}"
    for dtypes, needed, what in (
        (facts.forward_dtypes, True, "forward"),
        (facts.backward_dtypes, setting.needs_grad, "backward"),
    ):
        if needed and dtypes is not None and setting.dtype not in dtypes:
            names = "/".join(_DTYPE_NAMES.get(dtype, str(dtype)) for dtype in dtypes)
            return f"its {what} takes only {names} hidden states, got {setting.dtype}"
    if facts.requires is not None:
        if setting.gpu_kernels is None:
            return facts.requires()
        if not setting.gpu_kernels:
            return "its kernels' packages are not installed"
    return None


def choose_loss(
    name: str,
    options: Mapping[str, object],
    *,
    device_type: str,
    dtype: torch.dtype,
    vocab_parallel: bool = False,
    needs_grad: bool = True,
    bias: bool = False,
    gpu_kernels: Optional[bool] = None,
) -> LossChoice:
    """Which entry computes loss ``name`` (an entry or ``auto``) with the recipe's ``options``, on
    ``device_type`` with ``dtype`` hidden states, and with which kernels.

    ``auto`` takes the first entry of ``AUTO_PREFERENCE`` (losses/registry.py) whose facts allow
    the loss here. A named entry that cannot compute it (``vocab_parallel``: on a vocabulary shard;
    ``bias``: the head has one) is a ``ConfigError`` naming why and what to use. ``gpu_kernels``:
    whether the entries' GPU packages are installed, where the caller knows better than this
    machine (``--dry_run`` plans for a GPU machine); None looks here.
    """
    check_name(name)
    if vocab_parallel:  # which entries it runs; the recipe's chunk_size and compile were checked with the recipe
        check_vocab_parallel(name, {})
    return _choose(name, LossSetting(device_type, dtype, needs_grad, bias, vocab_parallel, dict(options), gpu_kernels))


def _choose(name: str, setting: LossSetting) -> LossChoice:
    if name != AUTO:
        why = _why_not(name, setting)
        if why is not None:
            instead = _choose(AUTO, setting).entry
            raise ConfigError("loss.name", f"{name!r} cannot compute this loss here: {why}; use {instead!r} or 'auto'")
        return LossChoice(name, *ENTRIES[name].facts.kernels(setting))
    skipped = []
    for entry, preferred_because in AUTO_PREFERENCE[setting.vocab_parallel]:
        why = _why_not(entry, setting)
        if why is None:
            kernels, reason = ENTRIES[entry].facts.kernels(setting)
            return LossChoice(entry, kernels, "auto: " + "; ".join([*skipped, preferred_because or reason]))
        skipped.append(f"not {entry!r}: {why}")
    raise ConfigError("loss.name", f"'auto' finds no entry that computes this loss here ({'; '.join(skipped)})")
