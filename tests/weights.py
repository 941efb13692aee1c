"""A run's parameters gathered whole, for bitwise comparisons across layouts, and the error a run is refused with
(call inside ``run_distributed``)."""

import torch
from torch.distributed.tensor import DTensor

from config.errors import CheckpointError, ConfigError
from models.initialize import canonical_name
from train import train
from training.checkpoint import CheckpointManager
from training.recipe import load_recipe


def whole_parameters(parts) -> dict[str, torch.Tensor]:
    """Every parameter of this rank's parts, gathered whole, by name (a tied head copy as ``output.weight``)."""
    out = {}
    for part in parts:
        for name, param in part.named_parameters():
            full = param.full_tensor() if isinstance(param, DTensor) else param
            out[canonical_name(name)] = full.detach().clone()
    return out


def loaded_parameters(argvs: list[list[str]]) -> list[dict[str, torch.Tensor]]:
    """Train each recipe and return its parameters as ``CheckpointManager.load`` left them, before any step."""
    captured, load = [], CheckpointManager.load

    def capture(self):
        step = load(self)
        captured.append(whole_parameters(self.parts))
        return step

    CheckpointManager.load = capture
    try:
        for argv in argvs:
            train(load_recipe(argv))
    finally:
        CheckpointManager.load = load
    return captured


def refusal(argv: list[str]) -> str:
    """The one-line error a run stops with before its first step (``"not refused"`` if it runs)."""
    try:
        train(load_recipe(argv))
    except (CheckpointError, ConfigError) as err:
        return str(err)
    return "not refused"
