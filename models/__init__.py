"""Model definitions. ``build_model_args`` resolves a recipe's [model] section."""

import dataclasses

from models.args import ModelArgs
from models.flavors import MODEL_FLAVORS
from models.transformer import Transformer

__all__ = ["MODEL_FLAVORS", "ModelArgs", "Transformer", "build_model_args"]


def build_model_args(name: str, flavor: str, vocab_size: int = 0) -> ModelArgs:
    """The flavor's numbers, with ``vocab_size`` rows unless 0; an unknown flavor is a ValueError naming the known."""
    flavors = MODEL_FLAVORS[name]
    if flavor not in flavors:
        raise ValueError(f"{name} has no flavor {flavor!r}; choose one of {', '.join(flavors)}")
    args = flavors[flavor]
    return dataclasses.replace(args, vocab_size=vocab_size) if vocab_size else args
