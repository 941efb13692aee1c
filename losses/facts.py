"""What a loss entry says about itself: where it runs, what it cannot compute, what it costs.

Every registry entry declares one ``LossFacts`` as its class's ``facts``; the registry
refuses, when it is imported, an entry that leaves a fact out. The resolver
(``losses/resolve.py``), the memory model (``planning/memory.py``) and the cost model
(``planning/cost.py``) read these facts and nothing else about an entry, so adding a
loss is its file, its registry line and its tests.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor


class _Unset:
    def __repr__(self) -> str:
        return "<not declared>"


UNSET: Any = _Unset()  # a fact the entry has not declared; the registry refuses it


@dataclass(frozen=True)
class LossSetting:
    """What the choice of an entry and its kernels depends on besides the entry itself."""

    device_type: str
    dtype: torch.dtype  # of the hidden states
    needs_grad: bool = True
    bias: bool = False  # the head has a bias
    vocab_parallel: bool = False  # computed on a vocabulary shard (the vocab-parallel head)
    options: Mapping[str, object] = field(default_factory=dict)  # the [loss] options given
    # Whether the GPU kernels' packages (triton, cut-cross-entropy, ...) are installed, where the
    # caller knows better than this machine (--dry_run plans for a GPU machine); None looks here.
    gpu_kernels: Optional[bool] = None

    @property
    def compile(self) -> bool:
        """``torch.compile`` asked for the loss's own math (the vocab-parallel head takes no compile)."""
        return bool(self.options.get("compile", False)) and not self.vocab_parallel


@dataclass(frozen=True)
class LossShape:
    """What an entry's workspace depends on: one loss call of ``tokens`` hidden states against
    ``rows`` classifier rows (the whole vocabulary, or a shard of it on the vocab-parallel head)."""

    rows: int
    tokens: int
    dim: int
    act_bytes: int  # bytes per element of the hidden states, the classifier and their gradients
    chunk_size: int  # the recipe's [loss] chunk_size (0: the entry sizes its chunks itself)
    vocab_parallel: bool
    # Bytes FSDP holds for the gathered classifier's gradient once the loss has handed it over
    # (its copy, and the fp32 copy reduce-scattered at once); 0 on the vocab-parallel head.
    classifier_grad: int


def gradients_held(s: LossShape, transient: float) -> float:
    """Peak of an entry that produces the classifier's and the hidden states' gradients in its
    own buffers, holding ``transient`` bytes beside them at its peak; FSDP's copy of the
    classifier gradient may be larger than both."""
    return max(s.act_bytes * (s.rows + s.tokens) * s.dim + transient, s.classifier_grad)


def fixed_kernels(kernels: str, reason: str) -> Callable[[LossSetting], tuple[str, str]]:
    """``LossFacts.kernels`` of an entry that always computes with the same kernels."""
    return lambda setting: (kernels, reason)


@dataclass(frozen=True, kw_only=True)
class LossFacts:
    """An entry's facts. Every field must be declared (None is a declaration where it is allowed)."""

    devices: Optional[frozenset[str]] = UNSET
    """Device types its kernels run on, e.g. ``frozenset({"cuda"})``; None: any."""
    forward_dtypes: Optional[tuple[torch.dtype, ...]] = UNSET
    """Hidden-state dtypes its forward takes; None: any."""
    backward_dtypes: Optional[tuple[torch.dtype, ...]] = UNSET
    """Hidden-state dtypes its backward takes; None: any."""
    bias: bool = UNSET
    """Whether it applies the output head's bias. (The ``[loss]`` options it honours are the
    class's ``options``: an option it does not list is one it cannot compute.)"""
    requires: Optional[Callable[[], Optional[str]]] = UNSET
    """What its kernels need installed: a function that says what is missing on this machine
    (None when nothing is), called only when it is chosen; None: nothing beyond PyTorch."""
    kernels: Callable[[LossSetting], tuple[str, str]] = UNSET
    """``(kernels, why)`` it computes with in a setting it can compute, for the run log."""
    vocab_parallel: Optional[Callable[..., Tensor]] = UNSET
    """Its loss on a vocabulary shard, the vocab-parallel head's backend
    (``losses/vocab_parallel.py`` calls it); None: it cannot serve that head."""
    head_gemms: tuple[int, int] = UNSET
    """[T, D] x [D, V] GEMMs (2·T·D·V FLOPs each) of the head and loss, (forward, backward), in training."""
    logit_bytes: tuple[int, int] = UNSET
    """Bytes moved per logit beyond the GEMMs, (forward, backward); timed at the logits rate."""
    rate_key: str = UNSET
    """The key of its head + loss rate in the cost model (``head_tflops`` of every table in ``planning/rates/``)."""
    workspace: Callable[[LossShape], float] = UNSET
    """Peak bytes of its forward + backward beyond its inputs (the hidden states and the classifier)."""

    def missing(self) -> list[str]:
        """The facts left out."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is UNSET]
