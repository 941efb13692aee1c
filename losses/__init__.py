"""Losses that apply the model's output head to hidden states, chosen by ``[loss] name``."""

from losses.base import OutputLoss
from losses.chunked_linear_cross_entropy import chunked_linear_cross_entropy
from losses.registry import LOSS_NAMES, build_loss, loss_option_names, validate_loss_options
from losses.vocab_parallel import VocabParallelOptions, vocab_parallel_linear_cross_entropy

__all__ = [
    "LOSS_NAMES",
    "OutputLoss",
    "VocabParallelOptions",
    "build_loss",
    "chunked_linear_cross_entropy",
    "loss_option_names",
    "validate_loss_options",
    "vocab_parallel_linear_cross_entropy",
]
