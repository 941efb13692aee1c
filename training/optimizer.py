"""AdamW and its warmup + decay schedule."""

import math
from typing import Optional

import torch
from torch.optim.lr_scheduler import LambdaLR

from config.job_config import LRScheduler, Optimizer


def build_optimizer(params: list[torch.nn.Parameter], cfg: Optimizer, device: torch.device) -> torch.optim.AdamW:
    """Fused AdamW on CUDA (one kernel for all parameters), foreach elsewhere.

    Weight decay applies to every parameter, as in TorchTitan.
    """
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=fused,
        foreach=not fused,
    )


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


def build_lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: LRScheduler) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
