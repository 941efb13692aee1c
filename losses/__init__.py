"""Losses that apply the model's output head to hidden states, chosen by ``[loss] name``.

The layer, top to bottom:

- ``registry.py``: where the loss is chosen. ``build_loss`` (the one way to build one,
  with or without the vocab-parallel head) and the recipe's option checks.
- ``resolve.py``: how it computes: what ``auto`` means and which kernels every entry
  runs, for a device, dtype and vocab-parallel head (also asked by ``--dry_run``).
- ``base.py``: ``OutputLoss``, the contract ``loss(hidden, labels)`` every entry keeps.
- ``entries/``: the registry's entries (``cross_entropy``, ``chunked``, ``cce``,
  ``cce_torch_compile``) and the vocab-parallel head's loss.
- ``vocab_parallel.py``: the vocab-parallel math with upstream cut-cross-entropy's API
  (``VocabParallelOptions``, ``vocab_parallel_linear_cross_entropy``).
- ``kernels/``: the autograd functions and Triton kernels behind them: the chunked loss
  (``chunked.py``, ``chunked_triton.py``) and the vocab-parallel one on CCE's kernels
  (``cce_vocab_parallel.py``).
- ``options.py``, ``functional.py``: the option table and small shared rules.

The classifier is ``c`` ``[V, D]`` (or a shard of its rows) everywhere in this layer.
"""

from losses.base import OutputLoss
from losses.kernels.chunked import chunked_linear_cross_entropy
from losses.registry import (
    LOSS_NAMES,
    build_loss,
    choose_loss,
    loss_option_names,
    recipe_options,
    validate_loss_options,
)
from losses.resolve import LossChoice, resolve_loss
from losses.vocab_parallel import VocabParallelOptions, vocab_parallel_linear_cross_entropy

__all__ = [
    "LOSS_NAMES",
    "LossChoice",
    "OutputLoss",
    "VocabParallelOptions",
    "build_loss",
    "choose_loss",
    "chunked_linear_cross_entropy",
    "loss_option_names",
    "recipe_options",
    "resolve_loss",
    "validate_loss_options",
    "vocab_parallel_linear_cross_entropy",
]
