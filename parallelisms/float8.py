"""Float8 linear layers in the blocks (torchao's ``Float8Linear``), applied before AC, compile and FSDP.

Only the matmuls change: a converted layer keeps its ``weight`` parameter (same name, dtype and
shape), so initialization, the optimizer, checkpoints and HF export see the model they always do.
The output head is never converted: the loss applies it. ``check_float8`` runs before anything is
built and turns every reason the recipe cannot run into one line.
"""

import importlib.util
from dataclasses import replace
from typing import Optional

import torch
from torch import nn

from config.errors import ConfigError
from config.job_config import Float8

TORCHAO_INSTALL = "pip install -r requirements-cuda.txt (torchao)"


def check_float8(cfg: Float8, device: torch.device) -> None:
    """One line if ``[float8]`` is on and cannot run here: torchao missing, or (unless emulated) no CUDA
    device of compute capability 8.9+ (float8 ``torch._scaled_mm``)."""
    if not cfg.enable:
        return
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("float8.enable", f"needs torchao, which is not installed: {TORCHAO_INSTALL}")
    if cfg.emulate:
        return
    if device.type != "cuda":
        raise ConfigError(
            "float8.enable",
            f"float8 matmuls need a CUDA GPU of compute capability 8.9+, and this run is on {device.type}; "
            "set float8.emulate = true to check the numerics without one (no speed-up), or float8.enable = false",
        )
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ConfigError(
            "float8.enable",
            f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}; float8 matmuls need sm_89 or newer "
            "(H100, H200, L40S, RTX 4090): set float8.enable = false",
        )


def float8_all_gather(cfg: Float8, dp_shard: int) -> bool:
    """FSDP gathers converted weights in float8 (half the bytes): tensorwise scaling, sharded weights."""
    return cfg.enable and cfg.recipe == "tensorwise" and dp_shard > 1


def describe_float8(cfg: Float8, dp_shard: int) -> str:
    """The run log's line: what is float8 and how its weights are gathered."""
    kept = f", except names containing {cfg.filter_fqns}" if cfg.filter_fqns else ""
    how = "emulated in float32 matmuls" if cfg.emulate else "torch._scaled_mm"
    gather = "FSDP gathers them in float8" if float8_all_gather(cfg, dp_shard) else "gathered as the other weights"
    return f"float8 {cfg.recipe} ({how}) in the blocks' linear layers{kept}; {gather}; the output head unconverted"


def converts(fqn: str, module: nn.Module, cfg: Float8) -> bool:
    """A block's linear layer with both dimensions multiples of 16, not kept by ``filter_fqns``."""
    return (
        isinstance(module, nn.Linear)
        and fqn.startswith("layers.")
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
        and not any(kept in fqn for kept in cfg.filter_fqns)
    )


def convert_to_float8(part: nn.Module, cfg: Float8, dp_shard: int) -> list[str]:
    """Swap ``part``'s convertible linear layers for ``Float8Linear`` in place; returns their names."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if cfg.recipe == "tensorwise":
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=float8_all_gather(cfg, dp_shard))
    else:
        config = Float8LinearConfig.from_recipe_name(cfg.recipe)
    config = replace(config, emulate=cfg.emulate)
    names = [fqn for fqn, module in part.named_modules() if converts(fqn, module, cfg)]
    chosen = set(names)
    convert_to_float8_training(part, config=config, module_filter_fn=lambda module, fqn: fqn in chosen)
    return names


class Float8ScaleUpdate:
    """After each optimizer step, tensorwise float8 all-gather wants every converted weight's scale: torchao
    computes them in one fused reduction (``precompute_float8_dynamic_scale_for_fsdp``) instead of one
    per layer inside the next forward, as TorchTitan does."""

    def __init__(self, parts: list[nn.Module]):
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        self._precompute = precompute_float8_dynamic_scale_for_fsdp
        self.parts = parts

    def __call__(self) -> None:
        for part in self.parts:
            self._precompute(part)


def float8_scale_update(cfg: Float8, dp_shard: int, parts: list[nn.Module]) -> Optional[Float8ScaleUpdate]:
    return Float8ScaleUpdate(parts) if float8_all_gather(cfg, dp_shard) else None
