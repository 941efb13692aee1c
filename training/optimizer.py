"""AdamW and its warmup + decay schedule, and what a resumed run takes from a checkpoint: state, never settings."""

import math
from typing import Any, Optional

import torch
from torch.optim.lr_scheduler import LambdaLR

from config.job_config import LRScheduler, Optimizer
from training.flat_adamw import FlatAdamW

# What a param group holds besides its settings.
_NOT_SETTINGS = ("params", "param_names")
_RECIPE_KEYS = {
    "initial_lr": "optimizer.lr",
    "betas": "optimizer.betas",
    "eps": "optimizer.eps",
    "weight_decay": "optimizer.weight_decay",
}


def build_optimizer(
    params: list[torch.nn.Parameter], cfg: Optimizer, copies: Optional[dict[torch.Tensor, torch.Tensor]] = None
) -> torch.optim.AdamW:
    """The recipe's AdamW implementation (``optimizer.implementation``): ``FlatAdamW``, or torch's, fused (one
    kernel for all parameters, on CUDA and CPU). Both skip an update on the device when the caller sets
    ``optimizer.found_inf`` nonzero (the non-finite policy, training/step.py), which foreach cannot.
    ``copies``: bf16 compute weights for ``FlatAdamW`` to write (``ComputeWeights.copies()``; none for torch's).

    Weight decay applies to every parameter, as in TorchTitan.
    """
    settings = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.implementation == "flat":
        return FlatAdamW(params, **settings, copies=copies)
    return torch.optim.AdamW(params, **settings, fused=True)


def lr_factor(step: int, total_steps: int, cfg: LRScheduler) -> float:
    """Multiplier of the base LR after ``step`` optimizer steps: linear warmup, then decay to ``min_lr_factor``."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.decay_type == "constant":
        return 1.0
    if cfg.decay_type == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_factor + (1.0 - cfg.min_lr_factor) * shape


def warmup_warning(total_steps: int, cfg: LRScheduler) -> Optional[str]:
    """One line when the run ends inside its warmup (obeyed: a short benchmark of a long recipe does)."""
    if cfg.warmup_steps < total_steps:
        return None
    return (
        f"lr_scheduler.warmup_steps {cfg.warmup_steps} >= training.steps {total_steps}: the run ends inside its "
        f"warmup, at lr x {lr_factor(total_steps - 1, total_steps, cfg):.2f}; lower warmup_steps for a run that decays"
    )


class WarmupDecayLR(LambdaLR):
    """The recipe's schedule (``lr_factor``) over the optimizer's LR.

    A checkpoint holds LambdaLR's state plus ``settings`` (the schedule's length and shape); resuming
    (``load_state_dict``) takes only the position from it, the number of steps taken. LambdaLR would
    also restore the saving run's ``base_lrs`` and last LR, so a changed ``optimizer.lr``, ``training.steps``
    or schedule shape would be ignored; here the LR of every resumed step is the one a fresh run of this
    recipe has at that step. (TorchTitan restores the whole LambdaLR state and asks that the schedule
    keys stay unchanged.)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, cfg: LRScheduler):
        # Plain values under names without dots: a checkpoint stores them as entries of the state.
        self.settings = {
            "steps": total_steps,
            "warmup_steps": cfg.warmup_steps,
            "decay_type": cfg.decay_type,
            "min_lr_factor": cfg.min_lr_factor,
        }
        super().__init__(optimizer, lambda step: lr_factor(step, total_steps, cfg))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue after the saved number of steps (``last_epoch``) with this schedule's base LR, length and shape."""
        position = state_dict["last_epoch"]
        lrs = [base * factor(position) for base, factor in zip(self.base_lrs, self.lr_lambdas)]
        super().load_state_dict(
            {
                **self.state_dict(),
                "last_epoch": position,
                "_step_count": state_dict.get("_step_count", position + 1),
                "_last_lr": lrs,
            }
        )
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr


def build_lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: LRScheduler) -> WarmupDecayLR:
    return WarmupDecayLR(optimizer, total_steps, cfg)


def recipe_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimizer's settings per param group (the recipe's hyperparameters, and fused or foreach as chosen for
    this device), taken before a checkpoint's are loaded over them."""
    return [{k: v for k, v in group.items() if k not in _NOT_SETTINGS} for group in optimizer.param_groups]


def keep_recipe_hyperparameters(optimizer: torch.optim.Optimizer, recipe: list[dict[str, Any]]) -> dict[str, tuple]:
    """Put the recipe's settings back after a checkpoint's optimizer state was loaded over them (the moments and
    step counts stay the checkpoint's); returns ``{recipe key: (checkpoint's, recipe's)}`` for those that differed.
    The LR itself is then set by the schedule (``WarmupDecayLR.load_state_dict``)."""
    changed = {}
    for group, kept in zip(optimizer.param_groups, recipe):
        for name, key in _RECIPE_KEYS.items():
            saved, now = group.get(name), kept[name]
            if saved is not None and _value(saved) != _value(now):
                changed.setdefault(key, (_value(saved), _value(now)))
        group.update(kept)
    return changed


def schedule_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple]:
    """``{recipe key: (checkpoint's, recipe's)}`` for the schedule settings that differ (``WarmupDecayLR.settings``)."""
    return {
        ("training." if name == "steps" else "lr_scheduler.") + name: (saved[name], value)
        for name, value in now.items()
        if name in saved and saved[name] != value
    }


def _value(value: Any) -> Any:
    """A hyperparameter as the recipe spells it (betas: a list of floats; tensors as numbers)."""
    if isinstance(value, (tuple, list)):
        return [_value(v) for v in value]
    return value.item() if isinstance(value, torch.Tensor) else value
