"""The registry: every loss entry a recipe's ``[loss] name`` can pick, and the recipe's option checks.

An entry is one file in ``losses/entries/`` plus its line in ``ENTRIES``; it describes
itself (``name``, ``options``, ``facts``: ``losses/facts.py``), and an entry that leaves a
fact out is refused here, when the registry is imported. Every mistake in ``[loss]`` (a
misspelt name or option, a bad value, an option the chosen entry cannot honour) is a
``ConfigError`` raised before any model is built. How a loss computes is ``losses/resolve.py``'s;
building it is ``losses/build.py``'s.
"""

from typing import Optional

from config.errors import ConfigError, did_you_mean
from config.job_config import Compile, Loss
from losses.base import OutputLoss
from losses.entries.cce import CCELoss, CCETorchCompileLoss
from losses.entries.chunked import ChunkedCrossEntropy
from losses.entries.cross_entropy import MaterializedCrossEntropy
from losses.entries.liger import LigerLoss
from losses.facts import LossFacts
from losses.options import COMMON_OPTIONS, OPTIONS

AUTO = "auto"


def registered(*classes: type[OutputLoss]) -> dict[str, type[OutputLoss]]:
    """``{name: entry}``, refusing (``TypeError``) an entry that does not describe itself fully."""
    entries: dict[str, type[OutputLoss]] = {}
    for cls in classes:
        name = vars(cls).get("name")
        if not isinstance(name, str) or name == AUTO or name in entries:
            raise TypeError(f"loss entry {cls.__name__} needs a name of its own, not {name!r}")
        what = f"loss entry {name!r} ({cls.__module__}.{cls.__name__})"
        facts = vars(cls).get("facts")
        if not isinstance(facts, LossFacts):
            raise TypeError(f"{what} declares no facts: set its class's facts = LossFacts(...) (losses/facts.py)")
        if missing := facts.missing():
            raise TypeError(f"{what} leaves out its facts {', '.join(missing)} (losses/facts.py says what each is)")
        if unknown := set(cls.options) - set(OPTIONS):
            raise TypeError(f"{what} honours options losses/options.py does not know: {sorted(unknown)}")
        entries[name] = cls
    return entries


ENTRIES: dict[str, type[OutputLoss]] = registered(
    ChunkedCrossEntropy, MaterializedCrossEntropy, CCELoss, CCETorchCompileLoss, LigerLoss
)
# "auto" takes the common options plus "compile", so a recipe saying "auto" keeps working
# whatever it resolves to; backend-specific sizes (chunk_size, filter_eps) need a named entry.
LOSS_NAMES: tuple[str, ...] = (*ENTRIES, AUTO)
# What "auto" tries, in order, with why it prefers each (None: what its kernels are says it); the
# first that can compute the loss here wins (losses/resolve.py). chunked's Triton kernels were the
# fastest exact entry measured (docs/performance.md); on the vocab-parallel head cce writes no logits.
AUTO_PREFERENCE: dict[bool, tuple[tuple[str, Optional[str]], ...]] = {
    False: (("chunked", None),),
    True: (("cce", "the vocab-parallel head's kernels write no logits"), ("chunked", None)),
}


def loss_option_names(name: str) -> set[str]:
    """The ``[loss]`` options entry ``name`` (or ``auto``) honours."""
    check_name(name)
    return set(COMMON_OPTIONS | {"compile"} if name == AUTO else ENTRIES[name].options)


def honours(name: str, key: str, value: object) -> bool:
    """Whether entry ``name`` computes option ``key`` at ``value``: it takes the option, or the
    value is the option's default (which every entry computes)."""
    return key in loss_option_names(name) or value == OPTIONS[key].default


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
        if not honours(name, key, value):
            able = [entry for entry in ENTRIES if key in ENTRIES[entry].options]
            raise ConfigError(f"loss.{key}", f"{name!r} cannot {option.capability}; use {either(able)}")


def recipe_options(loss: Loss, compile: Compile) -> dict:
    """The options a recipe's ``[loss]`` gives its entry (``compile`` on when ``[compile]`` asks for the loss)."""
    options = {k: v for k, v in vars(loss).items() if k in loss_option_names(loss.name)}
    if compile.enable and "loss" in compile.components and "compile" in options:
        options["compile"] = True
    return options


def check_name(name: str) -> None:
    """A ``ConfigError`` for a name that is neither an entry nor ``auto``."""
    if name not in LOSS_NAMES:
        suggestion = did_you_mean(name, LOSS_NAMES)
        raise ConfigError("loss.name", f"unknown loss {name!r}{suggestion}; choose from {list(LOSS_NAMES)}")


def either(names: list[str]) -> str:
    """``'a'``, ``'a' or 'b'``, ``'a', 'b' or 'c'``."""
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
