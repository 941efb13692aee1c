"""Rotary position embeddings in the Hugging Face "rotate half" layout.

Using the same layout as the published checkpoints means their q/k weights
load without permutation.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from models.args import RopeScaling


def _scale_llama3(inv_freq: Tensor, s: RopeScaling) -> Tensor:
    """Llama 3.1's scaling: keep high frequencies, divide low ones, blend between."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(middle, blended, out)


def rope_cos_sin(
    head_dim: int, seq_len: int, theta: float, scaling: Optional[RopeScaling], device: Optional[torch.device] = None
) -> Tensor:
    """``[seq_len, 2, head_dim]`` fp32 table of cos and sin."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    if scaling is not None:
        inv_freq = _scale_llama3(inv_freq, scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return torch.stack([angles.cos(), angles.sin()], dim=1).float()


def apply_rope(x: Tensor, cos_sin: Tensor) -> Tensor:
    """x: ``[batch, seq, heads, head_dim]``."""
    seq = x.shape[1]
    cos = cos_sin[:seq, 0][None, :, None, :]
    sin = cos_sin[:seq, 1][None, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)
