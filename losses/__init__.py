"""Losses that apply the model's output head to hidden states, chosen by ``[loss] name``.

The layer, bottom to top (each file imports only the ones above it in this list):

- ``options.py``, ``functional.py``: the option table and small shared rules.
- ``facts.py``: ``LossFacts``, what an entry says about itself (devices, dtypes, what it
  cannot compute, its vocab-parallel function, head FLOPs, workspace bytes, cost-model rate key).
- ``kernels/``: the autograd functions and Triton kernels: the chunked loss (``chunked.py``,
  ``chunked_triton.py``), the vocab-parallel one on CCE's kernels (``cce_vocab_parallel.py``),
  and gradients computed in a forward, handed out by its backward (``forward_grads.py``).
- ``base.py``: ``OutputLoss``, the contract ``loss(hidden, labels)`` every entry keeps.
- ``entries/``: one file per registry entry (``cross_entropy``, ``chunked``, ``cce`` and
  ``cce_torch_compile``, ``liger``), each with its facts.
- ``registry.py``: ``ENTRIES`` (refusing an entry that leaves a fact out), ``LOSS_NAMES``,
  what ``auto`` prefers, and the recipe's option checks.
- ``resolve.py``: the one decision, ``choose_loss`` -> ``LossChoice``: which entry and kernels
  compute a loss here, and why (asked by ``build_loss``, the vocab-parallel function, the run
  log and ``--dry_run``); and the vocab-parallel head's rules.
- ``vocab_parallel.py``: the vocab-parallel math with upstream cut-cross-entropy's API
  (``VocabParallelOptions``, ``vocab_parallel_linear_cross_entropy``); ``entries/vocab_parallel.py``:
  the vocab-parallel head's loss module (not a registry entry).
- ``build.py``: ``build_loss``, the one way to build a loss.

Adding a loss is one file in ``entries/`` (its class with ``name``, ``options``, ``facts`` and
``linear_loss``), its line in ``ENTRIES`` and its tests; the resolver, the memory and the cost
models read its facts. The classifier is ``c`` ``[V, D]`` (or a shard of its rows) everywhere in this layer.
"""

from losses.base import OutputLoss
from losses.build import build_loss
from losses.facts import LossFacts
from losses.kernels.chunked import chunked_linear_cross_entropy
from losses.registry import ENTRIES, LOSS_NAMES, loss_option_names, recipe_options, validate_loss_options
from losses.resolve import LossChoice, check_vocab_parallel, choose_loss
from losses.vocab_parallel import VocabParallelOptions, vocab_parallel_linear_cross_entropy

__all__ = [
    "ENTRIES",
    "LOSS_NAMES",
    "LossChoice",
    "LossFacts",
    "OutputLoss",
    "VocabParallelOptions",
    "build_loss",
    "check_vocab_parallel",
    "choose_loss",
    "chunked_linear_cross_entropy",
    "loss_option_names",
    "recipe_options",
    "validate_loss_options",
    "vocab_parallel_linear_cross_entropy",
]
